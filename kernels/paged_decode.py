"""ThriftAttention decode over the paged FP4 KV cache (layout: ``notes/paged_kv.md``).

Split-KV like ``kernels/decode.py``: grid (B * Hkv, num_splits), each program walks
``tiles_per_split`` selection units (tile = unit = U tokens) of one sequence for the whole GQA
group of query heads, FP4 first (selected units are no-ops), then the selected units of its
range in FP16, and writes an unnormalised partial (acc, m, l). Pages are found through the block
table per unit; the grid is fixed by the largest possible sequence and programs past their
sequence's end do nothing (the reduce kernel ignores their splits), so a launch needs no host
value that depends on the batch's contents.

FP4 units: K from ``k4`` (per token), V from ``v4`` along tokens (auto layout, [D, P/2]) or
along head_dim (nvfp4 layout, [P, D/2]), P quantised per G keys as in ``kernels/tiles.py``.
FP16 units: auto layout ``k_hi``/``v_hi``; nvfp4 layout dequantised ``k4``/``v4`` in the model
dtype, except the step's own token (position seq_len - 1), which comes from the forward's
``key``/``value``.
"""

import triton
import triton.language as tl
from thrift_vllm.kernels.decode import _merge_splits
from thrift_vllm.kernels.fp4 import _dequant_tile_mma
from thrift_vllm.kernels.kv_write import _fp4_encode
from thrift_vllm.kernels.tiles import _dot, _fp4_pv, _fp4_softmax, _load_dequant, _load_dequant_mma


@triton.jit
def _page(Cache, BT, b, j, kvh, stride_btb, stride_cb, stride_ch, NU: tl.constexpr):
    """uint8 pointer to the (block, head) page holding unit j of sequence b."""
    blk = tl.load(BT + b * stride_btb + j // NU).to(tl.int64)
    return Cache + blk * stride_cb + kvh * stride_ch


@triton.jit
def _load_v_tokens(vp, vs, n_valid, D: tl.constexpr, U: tl.constexpr, P: tl.constexpr,
                   G: tl.constexpr, FMT: tl.constexpr, MASKED: tl.constexpr, ASM: tl.constexpr):
    """Auto layout V tile: bytes [D, U/2] and scales [D, U/G] of rows of stride P/2 and P/G,
    decoded to the dot type ([D, U]). MASKED: bytes / groups starting at or past ``n_valid``
    read as zeros (the written tail of the last group already holds zero codes)."""
    offs_d = tl.arange(0, D)
    cb = tl.arange(0, U // 2)
    cs = tl.arange(0, U // G)
    pb = vp + offs_d[:, None] * (P // 2) + cb[None, :]
    ps = vs + offs_d[:, None] * (P // G) + cs[None, :]
    if MASKED:
        vb = tl.load(pb, mask=(cb * 2 < n_valid)[None, :], other=0)
        sb = tl.load(ps, mask=(cs * G < n_valid)[None, :], other=0)
    else:
        vb = tl.load(pb)
        sb = tl.load(ps)
    return _dequant_tile_mma(vb, sb, D, U, G, FMT, ASM)


@triton.jit
def _paged_fp4_tile(
    acc, l_i, m_i, q4, page, u0, start, seq_len, qk_scale, keep,
    BLOCK_H: tl.constexpr, U: tl.constexpr, P: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
    FMT: tl.constexpr, AUTO: tl.constexpr, MASKED: tl.constexpr, DOT_FP32: tl.constexpr,
    OFF_K4: tl.constexpr, OFF_K4S: tl.constexpr, OFF_V4: tl.constexpr, OFF_V4S: tl.constexpr,
):
    """One FP4 unit: page rows u0..u0+U-1 = sequence positions start..start+U-1. ``keep``
    False makes it a no-op (the unit is computed in FP16)."""
    offs_n = start + tl.arange(0, U)
    rows = u0 + tl.arange(0, U)
    kmask = (offs_n < seq_len)[:, None]
    k = _load_dequant_mma(page + OFF_K4, page + OFF_K4S, rows, D // 2, D // G, kmask, U, D, G,
                          FMT, not DOT_FP32)
    s = _dot(q4, tl.trans(k), DOT_FP32) * qk_scale
    q_pos = tl.full([BLOCK_H], 0, tl.int32) + seq_len - 1
    p, beta, alpha, m_new = _fp4_softmax(s, m_i, offs_n, q_pos, seq_len, keep, MASKED, False)
    if AUTO:
        vt = _load_v_tokens(page + OFF_V4 + u0 // 2, page + OFF_V4S + u0 // G, seq_len - start,
                            D, U, P, G, FMT, MASKED, not DOT_FP32)
    else:
        vt = tl.trans(_load_dequant_mma(page + OFF_V4, page + OFF_V4S, rows, D // 2, D // G,
                                        kmask, U, D, G, FMT, not DOT_FP32))
    pv, psum = _fp4_pv(p, vt, m_i, beta, BLOCK_H, U, G, FMT, False, DOT_FP32)
    return acc * alpha[:, None] + pv, l_i * alpha + psum, m_new


@triton.jit
def _paged_fp16_tile(
    acc, l_i, m_i, q, kn, vn, page, u0, start, seq_len, qk_scale,
    U: tl.constexpr, D: tl.constexpr, G: tl.constexpr, FMT: tl.constexpr, AUTO: tl.constexpr,
    DOT_FP32: tl.constexpr, OFF_KHI: tl.constexpr, OFF_VHI: tl.constexpr,
    OFF_K4: tl.constexpr, OFF_K4S: tl.constexpr, OFF_V4: tl.constexpr, OFF_V4S: tl.constexpr,
):
    """One selected unit in the model dtype (always masked: the last unit may be partial).
    kn/vn [D]: the step's fresh key/value (nvfp4 layout: replaces position seq_len - 1)."""
    offs_n = start + tl.arange(0, U)
    rows = u0 + tl.arange(0, U)
    offs_d = tl.arange(0, D)
    ok = offs_n < seq_len
    if AUTO:
        hi = rows[:, None] * D + offs_d[None, :]
        dt = tl.pointer_type(q.dtype)
        k = tl.load((page + OFF_KHI).to(dt) + hi, mask=ok[:, None], other=0.0)
        v = tl.load((page + OFF_VHI).to(dt) + hi, mask=ok[:, None], other=0.0)
    else:
        fresh = (offs_n == seq_len - 1)[:, None]
        k = _load_dequant(page + OFF_K4, page + OFF_K4S, rows, D // 2, D // G, ok[:, None], U,
                          D, G, FMT)
        v = _load_dequant(page + OFF_V4, page + OFF_V4S, rows, D // 2, D // G, ok[:, None], U,
                          D, G, FMT)
        k = tl.where(fresh, kn[None, :].to(tl.float32), k).to(q.dtype)
        v = tl.where(fresh, vn[None, :].to(tl.float32), v).to(q.dtype)
    s = _dot(q, tl.trans(k), DOT_FP32) * qk_scale
    s = tl.where(ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_FP32)
    return acc, l_i * alpha + tl.sum(p, axis=1), m_new


@triton.jit
def _paged_decode_kernel(
    Q, Kn, Vn, Cache, BT, SeqLens, Sel, Acc, ML,
    qk_scale, tiles_per_split, K_SEL,
    stride_qb, stride_qh, stride_knb, stride_knh, stride_vnb, stride_vnh, stride_btb,
    stride_cb, stride_ch, stride_selb, stride_selh,
    stride_ab, stride_ah, stride_as, stride_mb, stride_mh, stride_ms,
    Hkv: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr, U: tl.constexpr,
    P: tl.constexpr, D: tl.constexpr, G: tl.constexpr, FMT: tl.constexpr, AUTO: tl.constexpr,
    K_POW2: tl.constexpr, DOT_FP32: tl.constexpr,
    OFF_KHI: tl.constexpr, OFF_VHI: tl.constexpr, OFF_K4: tl.constexpr, OFF_K4S: tl.constexpr,
    OFF_V4: tl.constexpr, OFF_V4S: tl.constexpr,
):
    """Q [B, Hq, D] and Kn/Vn [B, Hkv, D] (fresh key/value; read in the nvfp4 layout) fp16/bf16;
    Cache uint8 base of [nb, Hkv, P, C] (byte strides); BT int32 [B, max_pages]; SeqLens int32
    [B] (0 = idle row); Sel int32 [B, Hkv, K_SEL] ascending units, -1 padded. Acc fp32
    [B, Hq, splits, D], ML fp32 [B, Hq, splits, 2] = (m, l), log2 domain; only splits that
    start before the sequence's end are written."""
    bkv = tl.program_id(0)
    split = tl.program_id(1)
    b = (bkv // Hkv).to(tl.int64)
    kvh = bkv % Hkv
    seq_len = tl.load(SeqLens + b)
    n_units = (seq_len + U - 1) // U
    j0 = split * tiles_per_split
    if j0 < n_units:
        j1 = tl.minimum(j0 + tiles_per_split, n_units)
        rows = tl.arange(0, BLOCK_H)
        row_ok = rows < GROUP
        h = kvh * GROUP + rows
        offs_d = tl.arange(0, D)
        q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        qp, qsc = _fp4_encode(q.to(tl.float32), BLOCK_H, D, G, FMT)
        q4 = _dequant_tile_mma(qp, qsc, BLOCK_H, D, G, FMT, False)  # fp16 / bf16, exact

        sel_row = Sel + b * stride_selb + kvh * stride_selh
        sel = tl.load(sel_row + tl.arange(0, K_POW2), mask=tl.arange(0, K_POW2) < K_SEL,
                      other=-1)
        lo = tl.sum(((sel >= 0) & (sel < j0)).to(tl.int32), axis=0)
        hi = tl.sum(((sel >= 0) & (sel < j1)).to(tl.int32), axis=0)
        n_sel = tl.sum((sel >= 0).to(tl.int32), axis=0)

        acc = tl.zeros([BLOCK_H, D], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)

        j_end = tl.where(n_sel < n_units, j1, j0)  # every unit selected: no FP4 loop
        j_full = tl.minimum(j_end, seq_len // U)  # the partial last unit needs masks
        ptr = lo
        nxt = tl.load(sel_row + ptr, mask=ptr < hi, other=-1)
        for j in range(j0, j_full):
            page = _page(Cache, BT, b, j, kvh, stride_btb, stride_cb, stride_ch, P // U)
            acc, l_i, m_i = _paged_fp4_tile(
                acc, l_i, m_i, q4, page, (j % (P // U)) * U, j * U, seq_len, qk_scale, j != nxt,
                BLOCK_H, U, P, D, G, FMT, AUTO, False, DOT_FP32,
                OFF_K4, OFF_K4S, OFF_V4, OFF_V4S)
            ptr += (j == nxt).to(tl.int32)
            nxt = tl.load(sel_row + ptr, mask=ptr < hi, other=-1)
        if j_full < j_end:
            page = _page(Cache, BT, b, j_full, kvh, stride_btb, stride_cb, stride_ch, P // U)
            acc, l_i, m_i = _paged_fp4_tile(
                acc, l_i, m_i, q4, page, (j_full % (P // U)) * U, j_full * U, seq_len, qk_scale,
                j_full != nxt, BLOCK_H, U, P, D, G, FMT, AUTO, True, DOT_FP32,
                OFF_K4, OFF_K4S, OFF_V4, OFF_V4S)

        kn = tl.load(Kn + b * stride_knb + kvh * stride_knh + offs_d)
        vn = tl.load(Vn + b * stride_vnb + kvh * stride_vnh + offs_d)
        for i in range(lo, hi):
            j = tl.load(sel_row + i)
            page = _page(Cache, BT, b, j, kvh, stride_btb, stride_cb, stride_ch, P // U)
            acc, l_i, m_i = _paged_fp16_tile(
                acc, l_i, m_i, q, kn, vn, page, (j % (P // U)) * U, j * U, seq_len, qk_scale,
                U, D, G, FMT, AUTO, DOT_FP32, OFF_KHI, OFF_VHI, OFF_K4, OFF_K4S, OFF_V4, OFF_V4S)

        tl.store(Acc + b * stride_ab + h[:, None] * stride_ah + split * stride_as
                 + offs_d[None, :], acc, mask=row_ok[:, None])
        ml = ML + b * stride_mb + h * stride_mh + split * stride_ms
        tl.store(ml, m_i, mask=row_ok)
        tl.store(ml + 1, l_i, mask=row_ok)


@triton.jit
def _paged_reduce_kernel(
    Acc, ML, SeqLens, Out, tiles_per_split,
    stride_ab, stride_ah, stride_as, stride_mb, stride_mh, stride_ms, stride_ob, stride_oh,
    Hq: tl.constexpr, U: tl.constexpr, D: tl.constexpr, SPLIT_POW2: tl.constexpr,
):
    """Merge the written splits of one (sequence, query head): Out [B, Hq, D] (rows of idle
    sequences, seq_len 0, get zeros). Grid (B * Hq,)."""
    bh = tl.program_id(0)
    b = (bh // Hq).to(tl.int64)
    h = bh % Hq
    seq_len = tl.load(SeqLens + b)
    n_units = (seq_len + U - 1) // U
    n_act = (n_units + tiles_per_split - 1) // tiles_per_split
    _merge_splits(Acc + b * stride_ab + h * stride_ah, ML + b * stride_mb + h * stride_mh,
                  Out + b * stride_ob + h * stride_oh, n_act, stride_as, stride_ms, D,
                  SPLIT_POW2)
