"""Quantise-on-write into the paged FP4 KV cache (layout contract: ``notes/paged_kv.md``).

Two launches per step (the second reads what the first wrote for other tokens of the step):

1. ``_kv_write_tokens_kernel``, one program per (BLOCK_T tokens, KV head): the per-token parts,
   i.e. the model-dtype copies ``k_hi``/``v_hi`` (auto layout), ``k4`` (and ``v4`` in the nvfp4
   layout) quantised along head_dim exactly as ``formats.quantize(x, fmt, axis=-1)``.
2. ``_kv_write_groups_kernel``, one program per (token, KV head): the token that wrote the
   largest offset of a V group (auto layout) re-quantises that group from ``v_hi`` over offsets
   ``<=`` its own, and the one that wrote the largest offset of a selection unit recomputes the
   unit's fp32 summaries. "Largest" is decided from the slots within one group / unit length
   of the token in ``slot_mapping`` (a request's tokens are contiguous there, in vLLM), so it
   costs O(T * U) and does not depend on the order inside a run; slots must be distinct.

The cache is addressed as raw bytes (``Cache``: uint8 base pointer; region offsets in bytes,
``KVLayout.region_offset``), with typed pointers cast per region.
"""

import triton
import triton.language as tl
from thrift_vllm.kernels.fp4 import (
    _e2m1_code,
    _e8m0_ceil,
    _e8m0_value,
    _pack,
    _round_e4m3,
)
from thrift_vllm.kernels.tiles import _load_dequant


@triton.jit
def _fp4_encode(x, R: tl.constexpr, C: tl.constexpr, G: tl.constexpr, FMT: tl.constexpr):
    """fp32 [R, C] quantised along C -> (packed uint8 [R, C/2], scale bytes uint8 [R, C/G]);
    the rules of ``formats.quantize`` (correctly rounded divisions, RNE e4m3, ceil e8m0)."""
    xg = tl.reshape(x, [R, C // G, G])
    amax = tl.max(tl.abs(xg), axis=2)
    if FMT == "nvfp4":
        scale = _round_e4m3(tl.div_rn(amax, tl.full(amax.shape, 6.0, tl.float32)))
        stored = scale.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    else:
        e = _e8m0_ceil(tl.div_rn(amax, tl.full(amax.shape, 6.0, tl.float32)))
        scale = _e8m0_value(e)
        stored = e.to(tl.uint8)
    safe = tl.where(scale > 0, scale, 1.0)
    y = tl.where(scale[:, :, None] > 0, tl.div_rn(xg, safe[:, :, None]), 0.0)
    packed = _pack(tl.reshape(_e2m1_code(y), [R, C]), R, C)
    return packed, stored


@triton.jit
def _store_fp4_rows(page, rows, x, ok, OFF_P: tl.constexpr, OFF_S: tl.constexpr, R: tl.constexpr,
                    D: tl.constexpr, G: tl.constexpr, FMT: tl.constexpr):
    """Quantise x [R, D] (fp32) per row and store the bytes at row ``rows`` of the per-token
    regions [P, D/2] / [P, D/G] of the pages starting at byte offsets ``page`` [R]."""
    packed, stored = _fp4_encode(x, R, D, G, FMT)
    base = page + OFF_P + rows * (D // 2)
    tl.store(base[:, None] + tl.arange(0, D // 2)[None, :], packed, mask=ok[:, None])
    base = page + OFF_S + rows * (D // G)
    tl.store(base[:, None] + tl.arange(0, D // G)[None, :], stored, mask=ok[:, None])


# Batch-dependent ints/strides unspecialised: one compiled variant per engine, not per batch.
@triton.jit(do_not_specialize=["T", "stride_kt", "stride_vt"])
def _kv_write_tokens_kernel(
    Key, Value, Slots, Cache, T,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_ch,
    BLOCK_T: tl.constexpr, D: tl.constexpr, G: tl.constexpr, P: tl.constexpr,
    FMT: tl.constexpr, AUTO: tl.constexpr,
    OFF_KHI: tl.constexpr, OFF_VHI: tl.constexpr, OFF_K4: tl.constexpr, OFF_K4S: tl.constexpr,
    OFF_V4: tl.constexpr, OFF_V4S: tl.constexpr,
):
    """Key/Value [T, Hkv, D] fp16/bf16 (last dim contiguous); Slots int64 [T] (-1: skip);
    Cache uint8 base of [num_blocks, Hkv, P, C] with byte strides (stride_cb, stride_ch).
    AUTO: write k_hi, v_hi (model dtype) and k4; else (nvfp4 layout) k4 and v4 along head_dim.
    Grid (cdiv(T, BLOCK_T), Hkv)."""
    h = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    slot = tl.load(Slots + t, mask=t < T, other=-1).to(tl.int64)
    ok = slot >= 0
    slot = tl.where(ok, slot, 0)
    row = slot % P
    page = Cache + (slot // P) * stride_cb + h * stride_ch  # uint8 pointers [BLOCK_T]
    offs_d = tl.arange(0, D)
    t64 = t.to(tl.int64)
    k = tl.load(Key + t64[:, None] * stride_kt + h * stride_kh + offs_d[None, :],
                mask=ok[:, None], other=0.0)
    v = tl.load(Value + t64[:, None] * stride_vt + h * stride_vh + offs_d[None, :],
                mask=ok[:, None], other=0.0)
    _store_fp4_rows(page, row, k.to(tl.float32), ok, OFF_K4, OFF_K4S, BLOCK_T, D, G, FMT)
    if AUTO:
        hi = (row * D)[:, None] + offs_d[None, :]
        dt = tl.pointer_type(Key.dtype.element_ty)
        tl.store((page[:, None] + OFF_KHI).to(dt) + hi, k, mask=ok[:, None])
        tl.store((page[:, None] + OFF_VHI).to(dt) + hi, v, mask=ok[:, None])
    else:
        _store_fp4_rows(page, row, v.to(tl.float32), ok, OFF_V4, OFF_V4S, BLOCK_T, D, G, FMT)


@triton.jit
def _later_writes(Slots, T, t, slot, SPAN: tl.constexpr):
    """Number of slots among Slots[t - SPAN .. t + SPAN) in the same aligned SPAN-token run as
    ``slot`` (the same V group / unit of the same page, as SPAN divides P) at a larger offset.
    The tokens writing one run lie within SPAN positions of each other in ``slot_mapping``
    (vLLM: a request's tokens are contiguous), in any order."""
    offs = t - SPAN + tl.arange(0, 2 * SPAN)
    s = tl.load(Slots + offs, mask=(offs >= 0) & (offs < T), other=-1).to(tl.int64)
    return tl.sum(((s >= 0) & (s // SPAN == slot // SPAN) & (s > slot)).to(tl.int32), axis=0)


@triton.jit
def _requant_v_group(page, row, Key, G: tl.constexpr, P: tl.constexpr, D: tl.constexpr,
                     FMT: tl.constexpr, OFF_VHI: tl.constexpr, OFF_V4: tl.constexpr,
                     OFF_V4S: tl.constexpr):
    """Auto layout: re-quantise the V group holding page row ``row`` from v_hi along tokens,
    rows past ``row`` counting as zeros; store its [D, G/2] bytes and [D] scales."""
    g0 = (row // G) * G
    toks = g0 + tl.arange(0, G)
    offs_d = tl.arange(0, D)
    vhi = (page + OFF_VHI).to(tl.pointer_type(Key.dtype.element_ty))
    vt = tl.load(vhi + toks[None, :] * D + offs_d[:, None], mask=(toks <= row)[None, :],
                 other=0.0).to(tl.float32)  # [D, G]
    packed, stored = _fp4_encode(vt, D, G, G, FMT)
    tl.store(page + OFF_V4 + offs_d[:, None] * (P // 2) + (g0 // 2 + tl.arange(0, G // 2))[None, :],
             packed)
    tl.store(page + OFF_V4S + offs_d[:, None] * (P // G) + g0 // G, stored)


@triton.jit
def _unit_summaries(page, row, Key, U: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
                    FMT: tl.constexpr, AUTO: tl.constexpr, MINMAX: tl.constexpr,
                    OFF_KHI: tl.constexpr, OFF_K4: tl.constexpr, OFF_K4S: tl.constexpr,
                    OFF_SUM: tl.constexpr, OFF_MAX: tl.constexpr):
    """fp32 mean (or min and max) over page rows [unit start, row] of the stored keys (auto:
    k_hi; nvfp4: dequantised k4), stored at the unit's row of the summary region(s): k_mean
    (or k_min) at OFF_SUM, k_max at OFF_MAX."""
    u = row // U
    toks = u * U + tl.arange(0, U)
    ok = toks <= row
    offs_d = tl.arange(0, D)
    if AUTO:
        khi = (page + OFF_KHI).to(tl.pointer_type(Key.dtype.element_ty))
        x = tl.load(khi + toks[:, None] * D + offs_d[None, :], mask=ok[:, None],
                    other=0.0).to(tl.float32)
    else:
        x = _load_dequant(page + OFF_K4, page + OFF_K4S, toks, D // 2, D // G, ok[:, None], U,
                          D, G, FMT)
    at = u * D + offs_d
    if MINMAX:
        # NaN-propagating like torch's amin / amax (tl.min / tl.max skip NaNs).
        has_nan = tl.max((x != x).to(tl.int32), axis=0) > 0
        kmin = tl.min(tl.where(ok[:, None], x, float("inf")), axis=0)
        kmax = tl.max(tl.where(ok[:, None], x, float("-inf")), axis=0)
        tl.store((page + OFF_SUM).to(tl.pointer_type(tl.float32)) + at,
                 tl.where(has_nan, float("nan"), kmin))
        tl.store((page + OFF_MAX).to(tl.pointer_type(tl.float32)) + at,
                 tl.where(has_nan, float("nan"), kmax))
    else:
        count = (row - u * U + 1).to(tl.float32)
        tl.store((page + OFF_SUM).to(tl.pointer_type(tl.float32)) + at,
                 tl.sum(x, axis=0) / count)


# Batch-dependent ints/strides unspecialised: one compiled variant per engine, not per batch.
@triton.jit(do_not_specialize=["T"])
def _kv_write_groups_kernel(
    Key, Slots, Cache, T, stride_cb, stride_ch,
    D: tl.constexpr, G: tl.constexpr, P: tl.constexpr, U: tl.constexpr, FMT: tl.constexpr,
    AUTO: tl.constexpr, SUMMARY: tl.constexpr,
    OFF_KHI: tl.constexpr, OFF_VHI: tl.constexpr, OFF_K4: tl.constexpr, OFF_K4S: tl.constexpr,
    OFF_V4: tl.constexpr, OFF_V4S: tl.constexpr, OFF_SUM: tl.constexpr, OFF_MAX: tl.constexpr,
):
    """Second pass of the write (after ``_kv_write_tokens_kernel``): per (token, KV head), if
    the token holds the largest offset written this step into its V group (AUTO) / selection
    unit (SUMMARY "mean" or "minmax"; "none" for local), rebuild that group / unit. Key only
    gives the model dtype. Grid (T, Hkv)."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(Slots + t).to(tl.int64)
    if slot >= 0:
        row = slot % P
        page = Cache + (slot // P) * stride_cb + h * stride_ch
        if AUTO:
            if _later_writes(Slots, T, t, slot, G) == 0:
                _requant_v_group(page, row, Key, G, P, D, FMT, OFF_VHI, OFF_V4, OFF_V4S)
        if SUMMARY != "none":
            if _later_writes(Slots, T, t, slot, U) == 0:
                _unit_summaries(page, row, Key, U, D, G, FMT, AUTO, SUMMARY == "minmax",
                                OFF_KHI, OFF_K4, OFF_K4S, OFF_SUM, OFF_MAX)
