"""Prefill / chunked prefill of one sequence over the paged FP4 KV cache: gather its pages into
contiguous buffers, then run the contiguous prefill kernel (``kernels/prefill.py``).

The FP4 blocks are decoded once per call: to bf16 (``bulk_math="bf16"``: exact FP4 semantics,
the reference's function) or to e4m3 with a power-of-two factor per row (``"fp8"``: Hopper's
fast path; P is kept in e4m3 instead of FP4, so it approximates the semantics, as the operator's
fp8 mode: ``thrift_vllm.api``), or not at all (``"native"``, Blackwell, ``auto`` layout only:
the packed pages go to the block-scaled MMA; the ``nvfp4`` layout's V is grouped along
head_dim, not along the tokens the P x V product sums over). The gather costs one pass over the
sequence's context per chunk and layer, a few per cent of a 2K chunk's attention at 128K.
"""

from __future__ import annotations

import torch

from thrift_vllm.formats import QuantizedTensor
from thrift_vllm.kernels.prefill import _thrift_prefill_kernel
from thrift_vllm.kv_layout import KVLayout
from thrift_vllm.ops.attention import LOG2E, PREFILL_LAUNCH
from thrift_vllm.ops.quantize import dequantize_fp4, quantize_fp4, triton_interpreted
from thrift_vllm.ops.select import select_blocks_triton
from thrift_vllm.selection import BlockGrid, budget_to_k

PAGED_BULK_MATHS = ("bf16", "fp8", "native")


def _rows(t: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
    """``t [nb, H, R, X]`` at ``pages`` -> ``[H, n_pages * R, X]``."""
    g = t[pages].transpose(0, 1)
    return g.reshape(g.shape[0], -1, g.shape[-1])


def _cols(t: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
    """``t [nb, H, D, X]`` (the auto layout's V, grouped along tokens) at ``pages`` -> ``[H, D,
    n_pages * X]``: the pages side by side along tokens."""
    return t[pages].permute(1, 2, 0, 3).flatten(-2)


def _deq(data: torch.Tensor, scales: torch.Tensor, layout: KVLayout) -> torch.Tensor:
    """Stored FP4 bytes ``[..., R, X/2]`` + scale bytes -> bf16 ``[..., R, X]`` (exact)."""
    sc = scales.view(torch.float8_e4m3fn) if layout.quant_format == "nvfp4" else scales
    qt = QuantizedTensor(data.contiguous(), sc.contiguous(), layout.quant_format,
                         data.dim() - 1, (*data.shape[:-1], data.shape[-1] * 2), torch.bfloat16)
    return dequantize_fp4(qt)


def _model_dtype_kv(views, pages: torch.Tensor, skv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The auto layout's model-dtype K and V of the context, ``[H, skv, D]`` each."""
    return _rows(views.k_hi, pages)[:, :skv], _rows(views.v_hi, pages)[:, :skv]


def _packed_v_tokens(views, pages: torch.Tensor, skv: int, s_pad: int, group: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The auto layout's V codes and scale bytes, pages side by side along tokens: uint8
    ``[H, D, s_pad/2]`` and ``[H, D, s_pad/G]``, with the codes of positions >= ``skv`` and
    the scales of groups starting there zeroed (the decoded path's zeros: stale slots of the
    last unit never enter; a stale scale byte could even be a NaN)."""
    vp = _cols(views.v4, pages)[:, :, :s_pad // 2].clone()
    vs = _cols(views.v4_scales, pages)[:, :, :s_pad // group].view(torch.uint8).clone()
    vp[:, :, -(-skv // 2):] = 0
    if skv % 2:  # the byte holding position skv - 1 (low nibble) and skv (high)
        vp[:, :, skv // 2] &= 0x0F
    vs[:, :, -(-skv // group):] = 0
    return vp, vs


def fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 ``[..., R, C]`` -> (float8_e4m3fn ``[..., R, C]``, fp32 factor ``[..., R]``) with
    ``x ~= e4m3 * factor``: per row the power of two that puts the row's largest magnitude in
    (128, 256] (the operator's ``_fp8_rows`` rule; all-zero rows get factor 1)."""
    amax = x.abs().amax(dim=-1).float()
    fac = torch.exp2(torch.ceil(torch.log2(amax.clamp(min=2.0**-126))) - 8.0)
    fac = torch.where(amax > 0, fac, torch.ones_like(fac))
    return (x.float() / fac[..., None]).to(torch.float8_e4m3fn), fac.contiguous()


def prefill_sequence(layout: KVLayout, views, q: torch.Tensor, key: torch.Tensor | None,
                     value: torch.Tensor | None, pages: torch.Tensor, skv: int, budget: float,
                     scale: float, force_sink_recent: bool = False,
                     bulk_math: str = "bf16") -> torch.Tensor:
    """One sequence's queries against its pages (the step's K/V already written).

    q ``[1, Hq, sq, D]`` (model dtype; the sequence's last ``sq`` positions); key/value
    ``[sq, Hkv, D]``: the step's fresh K/V (read in the nvfp4 layout only); pages int64
    ``[n_pages]`` (block-table row); skv: context length including the chunk; budget: FP16
    fraction; bulk_math: one of ``PAGED_BULK_MATHS`` (checked once per batch by the caller,
    ``paged_attention_triton``). Returns ``[1, Hq, sq, D]``.
    """
    sq, D, U = q.shape[2], layout.head_size, layout.unit
    s_pad = -(-skv // U) * U
    z3 = (0, 0, 0)
    if bulk_math == "native":  # auto layout (checked by the caller): packed pages, no decode
        kp = _rows(views.k4, pages)[None, :, :skv].contiguous()
        ks = _rows(views.k4_scales, pages)[None, :, :skv].view(torch.uint8).contiguous()
        vp, vs = (t[None].contiguous() for t in _packed_v_tokens(views, pages, skv, s_pad,
                                                                   layout.group))
        packed = (kp, ks, vp, vs)
        packed_strides = (*kp.stride()[:3], *ks.stride()[:3], *vp.stride()[:3],
                          *vs.stride()[:3])
        k16, v16 = _model_dtype_kv(views, pages, skv)
        k_sel = k16[None].contiguous()
        k4, kf, v4t, vf = kp, kp, vp, vp  # unused by the kernel
    else:
        packed, packed_strides = None, z3 * 4
        k4, kf, v4t, vf, k16, v16, k_sel = _decoded_operands(layout, views, q, key, value,
                                                             pages, skv, s_pad, bulk_math)
    k16, v16 = k16[None].contiguous(), v16[None].contiguous()
    grid = BlockGrid(sq, skv, U, True)
    if budget_to_k(budget, grid) == 0:
        sel = torch.empty(1, q.shape[1], grid.num_q_blocks, 0, dtype=torch.int32,
                          device=q.device)
    else:
        sel = select_blocks_triton(q, k_sel, fp16_budget=budget, selection=layout.selection,
                                   block_size=U, causal=True, force_sink_recent=force_sink_recent)
    k_n = sel.shape[-1]
    use_fp4 = int(k_n < budget_to_k(1.0, grid))
    qq = quantize_fp4(q, layout.quant_format, -1)
    sel_arg = sel if k_n else torch.full((1, 1, 1, 1), -1, dtype=torch.int32, device=q.device)
    out = torch.empty_like(q)
    u8 = qq.scales.view(torch.uint8)
    kp, ks, vp, vs = packed or (qq.data, u8, qq.data, u8)
    _thrift_prefill_kernel[(grid.num_q_blocks, q.shape[1])](
        q, k16, v16, qq.data, u8, kp, ks, vp, vs, k4, kf, v4t, vf, sel_arg, out,
        sq, skv, grid.num_kv_blocks, grid.first_q_block, grid.q_offset, k_n, scale * LOG2E,
        use_fp4, *q.stride()[:3], *k16.stride()[:3], *qq.data.stride()[:3], *u8.stride()[:3],
        *packed_strides, *k4.stride()[:3], *kf.stride()[:2], *v4t.stride()[:3],
        *vf.stride()[:2], *sel_arg.stride()[:3], *out.stride()[:3],
        Hq=q.shape[1], GROUP=q.shape[1] // k16.shape[1], BLOCK=U, D=D, G=layout.group,
        FMT=layout.quant_format, FP4_MATH=bulk_math, CAUSAL=True, DOT_FP32=triton_interpreted(),
        **PREFILL_LAUNCH[bulk_math],
    )
    return out


def _decoded_operands(layout: KVLayout, views, q: torch.Tensor, key: torch.Tensor | None,
                      value: torch.Tensor | None, pages: torch.Tensor, skv: int, s_pad: int,
                      bulk_math: str):
    """(k4, kf, v4t, vf, k16, v16, k_sel) for bulk_math bf16 / fp8: FP4 K [1, H, skv, D] and
    V^T [1, H, D, s_pad] decoded to bf16, or e4m3 with fp32 factors kf [1, H, skv] / vf
    [1, H, D]; model-dtype K/V [H, skv, D] for the FP16 blocks; the selection's keys."""
    sq = q.shape[2]
    k4 = _deq(_rows(views.k4, pages), _rows(views.k4_scales, pages), layout)[:, :skv]
    if layout.kv_layout == "auto":
        v4t = _deq(_cols(views.v4, pages), _cols(views.v4_scales, pages), layout)
        (k16, v16), k_sel = _model_dtype_kv(views, pages, skv), None
    else:
        v4 = _deq(_rows(views.v4, pages), _rows(views.v4_scales, pages), layout)
        v4t = v4.transpose(1, 2)
        k_sel = k4
        k16 = torch.cat([k4[:, :skv - sq].to(q.dtype), key.transpose(0, 1)], 1)
        v16 = torch.cat([v4[:, :skv - sq].to(q.dtype), value.transpose(0, 1)], 1)
    v4t = v4t[:, :, :s_pad].clone()
    v4t[:, :, skv:] = 0  # stale slots of the last unit never enter
    k_sel = k16[None].contiguous() if k_sel is None else k_sel[None]
    if bulk_math == "fp8":
        (k4, kf), (v4t, vf) = fp8_rows(k4), fp8_rows(v4t)
        kf, vf = kf[None], vf[None]
    k4, v4t = k4[None].contiguous(), v4t[None].contiguous()
    if bulk_math != "fp8":
        kf, vf = k4, v4t  # unused by the kernel
    return k4, kf, v4t, vf, k16, v16, k_sel
