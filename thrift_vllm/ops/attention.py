"""Launch ThriftAttention: quantise (Triton), select (Triton), then the prefill or decode kernel.

Inputs are validated by ``thrift_vllm.api.attention``; this layer allocates and launches.
"""

from __future__ import annotations

import math

import torch
import triton

from thrift_vllm.formats import GROUP_SIZE, QuantizedTensor
from thrift_vllm.kernels.decode import _decode_reduce_kernel, _thrift_decode_kernel
from thrift_vllm.kernels.prefill import _thrift_prefill_kernel
from thrift_vllm.ops.quantize import dequantize_fp4, quantize_fp4, triton_interpreted
from thrift_vllm.selection import BlockGrid, budget_to_k

LOG2E = 1.4426950408889634
# Split partials the decode reduce merges per step of its loop (kernels/decode.py
# _merge_splits): a fixed width, so the reduce compiles once whatever the split count.
SPLIT_CHUNK = 32
# Prefill launch per bulk_math: H200 sweep at 32K (BENCHMARKS.md) for bf16/fp8; native from the
# sm_120 AOT compile (8 warps avoid the register spills 4 warps show).
PREFILL_LAUNCH = {
    "bf16": {"num_warps": 4, "num_stages": 3},
    "fp8": {"num_warps": 4, "num_stages": 3},
    "native": {"num_warps": 8, "num_stages": 2},
}
# Decode: enough (batch, KV head, split) programs to cover the H200's 132 SMs about twice.
DECODE_TARGET_PROGRAMS = 264


def decode_split_plan(batch: int, num_kv_heads: int, num_kv_blocks: int,
                      target_programs: int = DECODE_TARGET_PROGRAMS,
                      min_tiles_per_split: int = 1) -> tuple[int, int]:
    """(num_splits, tiles_per_split) for the split-KV decode: plain arithmetic, no tensors.
    About ``target_programs`` (batch, KV head, split) programs, each walking at least
    ``min_tiles_per_split`` tiles (small batches: fewer, longer programs)."""
    if target_programs < 1 or min_tiles_per_split < 1:
        raise ValueError(f"target_programs {target_programs} and min_tiles_per_split "
                         f"{min_tiles_per_split} must be >= 1")
    want = max(1, math.ceil(target_programs / max(1, batch * num_kv_heads)))
    per = max(1, min_tiles_per_split, math.ceil(num_kv_blocks / want))
    return math.ceil(num_kv_blocks / per), per


def quantize_operands(q, k, v, quant_format: str, block_size: int):
    """FP4 copies for the kernels: q, k along head_dim; v along tokens, padded to whole tiles."""
    return (
        quantize_fp4(q, quant_format, -1),
        quantize_fp4(k, quant_format, -1),
        quantize_fp4(v, quant_format, -2, pad_to=block_size),
    )


def _u8(scales: torch.Tensor) -> torch.Tensor:
    """Scales as raw bytes: the kernels bitcast them (masked fp8 loads cannot take `other`)."""
    return scales.view(torch.uint8)


def _strides(t: torch.Tensor, n: int = 3) -> tuple[int, ...]:
    return tuple(t.stride()[:n])


def thrift_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    fp16_budget: float,
    selection: str,
    quant_format: str,
    block_size: int,
    sm_scale: float | None,
    force_sink_recent: bool = False,
    bulk_math: str = "bf16",
    sel: torch.Tensor | None = None,
    fp4: tuple[QuantizedTensor, QuantizedTensor, QuantizedTensor] | None = None,
    out: torch.Tensor | None = None,
    launch: dict | None = None,
) -> torch.Tensor:
    """ThriftAttention on the Triton kernels. Shapes as ``thrift_vllm.attention``; ``sel``
    (int32 [B, Hq, n_q_blocks, k]) and ``fp4`` (from :func:`quantize_operands`) may be passed
    precomputed, e.g. by benchmarks that time their parts; ``out`` (like q) receives the result;
    ``launch`` overrides the prefill kernel's ``num_warps``/``num_stages`` (tuning sweeps)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    grid = BlockGrid(Sq, Skv, block_size, causal)
    if sel is None:
        if budget_to_k(fp16_budget, grid) == 0:
            sel = torch.empty(B, Hq, grid.num_q_blocks, 0, dtype=torch.int32, device=q.device)
        else:
            from thrift_vllm.ops.select import select_blocks_triton

            sel = select_blocks_triton(
                q,
                k,
                fp16_budget=fp16_budget,
                selection=selection,
                block_size=block_size,
                causal=causal,
                force_sink_recent=force_sink_recent,
            )
    k_sel = sel.shape[-1]
    # Budget 1 selects every candidate of every row: skip the FP4 loop entirely.
    use_fp4 = int(k_sel < budget_to_k(1.0, grid))
    if fp4 is None:
        fp4 = quantize_operands(q, k, v, quant_format, block_size)
    qq, kq, vq = fp4
    sel_arg = sel if k_sel else torch.full((1,), -1, dtype=torch.int32, device=q.device)
    sel_strides = _strides(sel) if k_sel else (0, 0, 0)
    scale = (sm_scale if sm_scale is not None else D**-0.5) * LOG2E
    G = GROUP_SIZE[quant_format]
    out = torch.empty_like(q) if out is None else out
    common = dict(
        DOT_FP32=triton_interpreted(),
        GROUP=Hq // Hkv,
        BLOCK=block_size,
        D=D,
        G=G,
        FMT=quant_format,
        FP4_MATH=bulk_math,
    )
    if Sq > 1:
        if bulk_math == "native":
            k4, kf, v4, vf = kq.data, kq.data, vq.data, vq.data  # unused by the kernel
        elif bulk_math == "fp8":
            (k4, kf), (v4, vf) = dequantize_fp4(kq, True), dequantize_fp4(vq, True)
        else:
            k4, v4 = dequantize_fp4(kq), dequantize_fp4(vq)
            kf, vf = k4, v4  # unused by the kernel
        _thrift_prefill_kernel[(grid.num_q_blocks, B * Hq)](
            q, k, v, qq.data, _u8(qq.scales), kq.data, _u8(kq.scales), vq.data, _u8(vq.scales),
            k4, kf, v4, vf, sel_arg, out,
            Sq, Skv, grid.num_kv_blocks, grid.first_q_block, grid.q_offset, k_sel, scale,
            use_fp4,
            *_strides(q), *_strides(k),
            *_strides(qq.data), *_strides(qq.scales), *_strides(kq.data),
            *_strides(kq.scales), *_strides(vq.data), *_strides(vq.scales),
            *_strides(k4), *_strides(kf, 2), *_strides(v4), *_strides(vf, 2),
            *sel_strides, *_strides(out),
            Hq=Hq, CAUSAL=causal, **(launch or PREFILL_LAUNCH[bulk_math]), **common,
        )
        return out
    splits, per = decode_split_plan(B, Hkv, grid.num_kv_blocks)
    acc = torch.empty(B, Hq, splits, D, dtype=torch.float32, device=q.device)
    ml = torch.empty(B, Hq, splits, 2, dtype=torch.float32, device=q.device)
    _thrift_decode_kernel[(B * Hkv, splits)](
        q,
        k,
        v,
        qq.data,
        _u8(qq.scales),
        kq.data,
        _u8(kq.scales),
        vq.data,
        _u8(vq.scales),
        sel_arg,
        acc,
        ml,
        Skv,
        grid.num_kv_blocks,
        k_sel,
        per,
        scale,
        use_fp4,
        q.stride(0),
        q.stride(1),
        *_strides(k),
        qq.data.stride(0),
        qq.data.stride(1),
        qq.scales.stride(0),
        qq.scales.stride(1),
        *_strides(kq.data),
        *_strides(kq.scales),
        *_strides(vq.data),
        *_strides(vq.scales),
        sel_strides[0],
        sel_strides[1],
        *_strides(acc),
        *_strides(ml),
        Hkv=Hkv,
        BLOCK_H=max(16, triton.next_power_of_2(Hq // Hkv)),
        K_POW2=triton.next_power_of_2(max(k_sel, 1)),
        num_warps=4,
        num_stages=2,
        **common,
    )
    _decode_reduce_kernel[(B * Hq,)](
        acc,
        ml,
        out,
        splits,
        *_strides(acc),
        *_strides(ml),
        out.stride(0),
        out.stride(1),
        Hq=Hq,
        D=D,
        SPLIT_CHUNK=SPLIT_CHUNK,
    )
    return out
