"""Gather a batch's context out of the paged FP4 KV cache into contiguous model-dtype K and V.

The FlashAttention prefill route (``thrift_vllm.ops.flash_prefill``) needs each prefill
sequence's keys and values as ``[total_k, Hkv, D]`` rows in the model dtype. In the ``nvfp4``
layout the pages hold only FP4, so every context token is decoded here (exact: e2m1 x e4m3 and
e2m1 x e8m0 fit fp16 / bf16); the tokens of the step's own chunk come from the forward's fresh
``key`` / ``value`` instead, so the prompt's attention to itself is computed on the values the
model produced, as FlashAttention would. Grid: (tiles, Hkv), one tile = ``T`` tokens of one
sequence inside one page (``T`` divides the page size, so a tile never straddles pages).
"""

import triton
import triton.language as tl
from thrift_vllm.kernels.fp4 import _dequant_tile


@triton.jit(do_not_specialize=["stride_btb", "stride_cb", "stride_ch", "stride_kb",
                               "stride_kh", "stride_vb", "stride_vh", "stride_ob", "stride_oh"])
def _gather_dequant_kernel(
    Cache, BT, TileSeq, TileStart, SeqLens, CtxLens, QStart, KStart, Key, Value, OutK, OutV,
    stride_btb, stride_cb, stride_ch, stride_kb, stride_kh, stride_vb, stride_vh,
    stride_ob, stride_oh,
    T: tl.constexpr, P: tl.constexpr, D: tl.constexpr, G: tl.constexpr, FMT: tl.constexpr,
    OFF_K4: tl.constexpr, OFF_K4S: tl.constexpr, OFF_V4: tl.constexpr, OFF_V4S: tl.constexpr,
):
    """Cache uint8 [nb, Hkv, P, C] (byte strides; nvfp4 layout: k4/v4 [P, D/2] per token, scale
    bytes [P, D/G]); BT int32 [S, max_pages] (the prefill sequences' block-table rows);
    TileSeq / TileStart int32 [tiles]: the tile's sequence and first position; SeqLens int32
    [S] (context incl. the chunk), CtxLens int32 [S] (positions before the chunk), QStart int32
    [S] (the chunk's first row in Key / Value), KStart int32 [S] (the sequence's first row in
    OutK / OutV). Key / Value [rows, Hkv, D] and OutK / OutV [total_k, Hkv, D] model dtype."""
    tile = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.load(TileSeq + tile)
    t0 = tl.load(TileStart + tile)
    seq_len = tl.load(SeqLens + s)
    ctx = tl.load(CtxLens + s)
    pos = t0 + tl.arange(0, T)
    in_seq = pos < seq_len
    from_page = in_seq & (pos < ctx)
    fresh = in_seq & (pos >= ctx)
    blk = tl.load(BT + s * stride_btb + t0 // P).to(tl.int64)
    page = Cache + blk * stride_cb + h * stride_ch
    row = (t0 % P) + tl.arange(0, T)
    cb = tl.arange(0, D // 2)
    cs = tl.arange(0, D // G)
    offs_d = tl.arange(0, D)
    m2 = from_page[:, None]
    kb = tl.load(page + OFF_K4 + row[:, None] * (D // 2) + cb[None, :], mask=m2, other=0)
    ks = tl.load(page + OFF_K4S + row[:, None] * (D // G) + cs[None, :], mask=m2, other=0)
    vb = tl.load(page + OFF_V4 + row[:, None] * (D // 2) + cb[None, :], mask=m2, other=0)
    vs = tl.load(page + OFF_V4S + row[:, None] * (D // G) + cs[None, :], mask=m2, other=0)
    k = _dequant_tile(kb, ks, T, D, G, FMT)
    v = _dequant_tile(vb, vs, T, D, G, FMT)
    # The chunk's own tokens: the forward's fresh K/V rows (QStart + pos - ctx).
    q_row = (tl.load(QStart + s) + pos - ctx).to(tl.int64)
    mf = fresh[:, None]
    kn = tl.load(Key + q_row[:, None] * stride_kb + h * stride_kh + offs_d[None, :], mask=mf,
                 other=0.0)
    vn = tl.load(Value + q_row[:, None] * stride_vb + h * stride_vh + offs_d[None, :], mask=mf,
                 other=0.0)
    k = tl.where(mf, kn.to(tl.float32), k)
    v = tl.where(mf, vn.to(tl.float32), v)
    o_row = (tl.load(KStart + s) + pos).to(tl.int64)
    o = o_row[:, None] * stride_ob + h * stride_oh + offs_d[None, :]
    m_out = in_seq[:, None]
    tl.store(OutK + o, k.to(OutK.dtype.element_ty), mask=m_out)
    tl.store(OutV + o, v.to(OutV.dtype.element_ty), mask=m_out)
