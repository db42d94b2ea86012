"""Launch the FP4 quantisation kernel (same semantics as ``thrift_vllm.formats.quantize``)."""

from __future__ import annotations

import os

import torch
import triton

from thrift_vllm.formats import QuantizedTensor, check_axis, check_format, scales_to_float
from thrift_vllm.kernels.fp4 import _dequantize_kernel, _quantize_kernel


def triton_interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (Triton's own switch, read once per
    launch; the interpreter needs fp32 dots, see kernels/tiles.py `_dot`)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def quantize_fp4(
    x: torch.Tensor, quant_format: str = "nvfp4", axis: int = -1, pad_to: int | None = None
) -> QuantizedTensor:
    """Quantise ``x [..., n]`` (fp16/bf16/fp32) along ``axis`` with the Triton kernel.

    Output layout as :func:`thrift_vllm.formats.quantize`: the quantised axis moved last and padded
    with zeros to a multiple of ``pad_to`` (default: the group size; must be a multiple of it).
    ``x`` is read through its strides; no copy is made for ``axis != -1``.

    Validation matches ``quantize`` (unknown format, non-float input, an ``axis`` that is not an
    int or is out of range raise ValueError) except for values: NaN / inf inputs are *not*
    checked on this path (the check would force a host sync on GPU); their codes and scales are
    unspecified. Callers that need the check use the public :func:`thrift_vllm.formats.quantize`.
    """
    group = check_format(quant_format)
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
        got = (f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor)
               else type(x).__name__)
        raise ValueError(f"quantize_fp4 expects a float tensor of rank >= 2, got {got}")
    axis = check_axis(axis)
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis {axis} out of range for a tensor of rank {x.dim()}")
    ax = axis % x.dim()
    pad_to = pad_to or group
    if pad_to % group:
        raise ValueError(f"pad_to={pad_to} must be a multiple of the group size {group}")
    xm = x.movedim(ax, -1)
    lead = xm.shape[:-2]
    R, C = xm.shape[-2], xm.shape[-1]
    P = 1
    for s in lead:
        P *= s
    x3 = xm.reshape(P, R, C)  # a view when the leading dims are contiguous with each other
    cpad = -(-C // pad_to) * pad_to
    data = torch.empty(P, R, cpad // 2, dtype=torch.uint8, device=x.device)
    sdtype = torch.float8_e4m3fn if quant_format == "nvfp4" else torch.uint8
    scales = torch.empty(P, R, cpad // group, dtype=sdtype, device=x.device)
    block_c = 64 if cpad % 64 == 0 else group
    block_r = 16
    grid = (triton.cdiv(R, block_r), P, cpad // block_c)
    _quantize_kernel[grid](
        x3, data, scales, R, C,
        x3.stride(0), x3.stride(1), x3.stride(2),
        data.stride(0), data.stride(1), scales.stride(0), scales.stride(1),
        G=group, FMT=quant_format, BLOCK_R=block_r, BLOCK_C=block_c,
    )
    return QuantizedTensor(
        data.view(*lead, R, cpad // 2), scales.view(*lead, R, cpad // group), quant_format, ax,
        tuple(x.shape), x.dtype,
    )


def fp8_row_factors(qt: QuantizedTensor) -> torch.Tensor:
    """Per-row power-of-two factors (fp32 ``[..., R]``) that put each stored row's largest FP4
    value (6 * max scale) in (128, 256], for e4m3 copies: x ~= e4m3 * factor."""
    amax = scales_to_float(qt.scales, qt.quant_format).amax(dim=-1) * 6.0
    bits = amax.view(torch.int32)
    exp = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    fac = torch.exp2(exp.to(torch.float32) - 127.0 - 8.0)
    return torch.where(amax > 0, fac, torch.ones_like(fac)).contiguous()


def dequantize_fp4(qt: QuantizedTensor, to_fp8: bool = False):
    """Decode a :class:`QuantizedTensor` in its stored layout (quantised axis last, padded) to
    a dense bf16 tensor ``[..., R, C_pad]`` — exact: e2m1 times an e4m3/e8m0 scale fits bf16 — or,
    with ``to_fp8``, to ``(float8_e4m3fn [..., R, C_pad], fac fp32 [..., R])`` with
    ``x ~= e4m3 * fac``. The prefill kernels read these copies (FP4 is storage on Hopper)."""
    *lead, R, half = qt.data.shape
    C = half * 2
    P = 1
    for s in lead:
        P *= s
    data = qt.data.reshape(P, R, half)
    scales = qt.scales.view(torch.uint8).reshape(P, R, -1)
    dtype = torch.float8_e4m3fn if to_fp8 else torch.bfloat16
    out = torch.empty(P, R, C, dtype=dtype, device=data.device)
    fac = fp8_row_factors(qt).reshape(P, R) if to_fp8 else out.new_empty(1, dtype=torch.float32)
    block_r, block_c = 32, 64
    _dequantize_kernel[(triton.cdiv(R, block_r), P, triton.cdiv(C, block_c))](
        data, scales, fac, out, R, C,
        data.stride(0), data.stride(1), scales.stride(0), scales.stride(1),
        fac.stride(0) if to_fp8 else 0, out.stride(0), out.stride(1),
        G=qt.group_size, FMT=qt.quant_format, TO_FP8=to_fp8, BLOCK_R=block_r, BLOCK_C=block_c,
    )
    out = out.view(*lead, R, C)
    return (out, fac.view(*lead, R)) if to_fp8 else out
