"""ThriftAttention decode over the paged FP4 KV cache (layout: ``notes/paged_kv.md``).

Split-KV like ``kernels/decode.py``: grid (B * Hkv, num_splits), each program walks
``tiles_per_split`` selection units (tile = unit = U tokens) of one sequence for the whole GQA
group of query heads, FP4 first (selected units are no-ops), then the selected units of its
range in FP16, and writes an unnormalised partial (acc, m, l). Pages are found through the block
table per unit; the grid is fixed by the largest possible sequence and programs past their
sequence's end do nothing (the reduce kernel ignores their splits), so a launch needs no host
value that depends on the batch's contents.

FP4 units: K from ``k4`` (per token), V from ``v4`` along tokens (auto layout, [D, P/2]) or
along head_dim (nvfp4 layout, [P, D/2]), P quantised per G keys as in ``kernels/tiles.py``;
decoded to fp16 for the MMAs, or (NATIVE, sm_120) packed into the block-scaled MMA for q x K
and, in the auto layout, P x V.
FP16 units: auto layout ``k_hi``/``v_hi``; nvfp4 layout dequantised ``k4``/``v4`` in the model
dtype, except the step's own token (position seq_len - 1), which comes from the forward's
``key``/``value``.
"""

import triton
import triton.language as tl
from thrift_vllm.kernels.decode import _merge_splits
from thrift_vllm.kernels.fp4 import _dequant_tile_mma
from thrift_vllm.kernels.kv_write import _fp4_encode
from thrift_vllm.kernels.tiles import (
    _dot,
    _fp4_dot,
    _fp4_pv,
    _fp4_pv_native,
    _fp4_softmax,
    _load_dequant_mma,
)


@triton.jit
def _page(Cache, BT, b, j, kvh, stride_btb, stride_cb, stride_ch, NU: tl.constexpr):
    """uint8 pointer to the (block, head) page holding unit j of sequence b."""
    blk = tl.load(BT + b * stride_btb + j // NU).to(tl.int64)
    return Cache + blk * stride_cb + kvh * stride_ch


@triton.jit
def _tile_bytes(
    Cache, BT, b, kvh, start, n_valid, seq_len, stride_btb, stride_cb, stride_ch,
    T: tl.constexpr, P: tl.constexpr, D: tl.constexpr, G: tl.constexpr, AUTO: tl.constexpr,
    MASKED: tl.constexpr, SAME_PAGE: tl.constexpr,
    OFF_K4: tl.constexpr, OFF_K4S: tl.constexpr, OFF_V4: tl.constexpr, OFF_V4S: tl.constexpr,
):
    """Raw bytes of T tokens from position ``start`` (a multiple of U; the first ``n_valid``
    are read, the rest are zeros when MASKED): K [T, D/2] + [T, D/G]; V [D, T/2] + [D, T/G]
    along tokens (auto) or [T, D/2] + [T, D/G] (nvfp4). SAME_PAGE: the T tokens lie in one page
    (P % T == 0 and tiles aligned to T), one block-table read; else one per row / column,
    masked at ``seq_len`` (the table may end inside the tile). Shared by both decode kernels.
    (Loading unit j+1 before unit j's math was measured on the H200, commit 8065f9f: slower
    everywhere in the FP4 kernel, the extra live registers cost more occupancy than the latency
    it hid.)"""
    t = tl.arange(0, T)
    rmask = (t < n_valid)[:, None]
    cb = tl.arange(0, D // 2)
    cs = tl.arange(0, D // G)
    if SAME_PAGE:
        blk = tl.load(BT + b * stride_btb + start // P).to(tl.int64)
        base_r = Cache + blk * stride_cb + kvh * stride_ch
        row = (start % P) + t
        # V along tokens: byte column c holds tokens 2c, 2c + 1; scale column c tokens c*G..
        base_c = base_r
        col = (start % P) // 2 + tl.arange(0, T // 2)
        base_s = base_r
        scol = (start % P) // G + tl.arange(0, T // G)
    else:
        pos = start + t
        blk = tl.load(BT + b * stride_btb + pos // P, mask=pos < seq_len, other=0).to(tl.int64)
        base_r = (Cache + blk * stride_cb + kvh * stride_ch)[:, None]
        row = pos % P
        pc = start + 2 * tl.arange(0, T // 2)
        base_c = (Cache + tl.load(BT + b * stride_btb + pc // P, mask=pc < seq_len,
                                  other=0).to(tl.int64) * stride_cb
                  + kvh * stride_ch)[None, :]
        col = (pc % P) // 2
        ps = start + G * tl.arange(0, T // G)
        base_s = (Cache + tl.load(BT + b * stride_btb + ps // P, mask=ps < seq_len,
                                  other=0).to(tl.int64) * stride_cb
                  + kvh * stride_ch)[None, :]
        scol = (ps % P) // G
    pk = base_r + OFF_K4 + row[:, None] * (D // 2) + cb[None, :]
    psk = base_r + OFF_K4S + row[:, None] * (D // G) + cs[None, :]
    if AUTO:
        offs_d = tl.arange(0, D)
        pv = base_c + OFF_V4 + offs_d[:, None] * (P // 2) + col[None, :]
        psv = base_s + OFF_V4S + offs_d[:, None] * (P // G) + scol[None, :]
        vmask = (tl.arange(0, T // 2) * 2 < n_valid)[None, :]
        vsmask = (tl.arange(0, T // G) * G < n_valid)[None, :]
    else:
        pv = base_r + OFF_V4 + row[:, None] * (D // 2) + cb[None, :]
        psv = base_r + OFF_V4S + row[:, None] * (D // G) + cs[None, :]
        vmask = rmask
        vsmask = rmask
    if MASKED:
        return (tl.load(pk, mask=rmask, other=0), tl.load(psk, mask=rmask, other=0),
                tl.load(pv, mask=vmask, other=0), tl.load(psv, mask=vsmask, other=0))
    else:
        return tl.load(pk), tl.load(psk), tl.load(pv), tl.load(psv)


@triton.jit
def _selected_bounds(sel_row, K_SEL, j0, j1, zero):
    """Of the ascending selected-unit list at ``sel_row`` (K_SEL entries, -1 padded): how many
    lie before unit j0, before unit j1, and in all. Counted in chunks with a runtime bound: a
    constexpr list width would compile one kernel variant per power of two of k. ``zero``: an
    int32 0 of the program's scalar type."""
    lo = zero
    hi = zero
    n_sel = zero
    for c in range(0, K_SEL, 16):
        idx = c + tl.arange(0, 16)
        sel = tl.load(sel_row + idx, mask=idx < K_SEL, other=-1)
        lo += tl.sum(((sel >= 0) & (sel < j0)).to(tl.int32), axis=0)
        hi += tl.sum(((sel >= 0) & (sel < j1)).to(tl.int32), axis=0)
        n_sel += tl.sum((sel >= 0).to(tl.int32), axis=0)
    return lo, hi, n_sel


@triton.jit
def _paged_fp4_tile(
    acc, l_i, m_i, q4, qp, qs, kb, ks, vb, vs, start, seq_len, qk_scale, keep,
    BLOCK_H: tl.constexpr, U: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
    FMT: tl.constexpr, AUTO: tl.constexpr, MASKED: tl.constexpr, DOT_FP32: tl.constexpr,
    NATIVE: tl.constexpr,
):
    """One FP4 unit from its raw bytes (``_tile_bytes``) = sequence positions
    start..start+U-1. ``keep`` False makes it a no-op (the unit is computed in FP16).
    NATIVE (sm_120): packed q (qp + scale bytes qs) and K straight into the block-scaled MMA,
    and P x V too in the auto layout (its V is grouped along tokens, the contraction); the
    nvfp4 layout's V (grouped along head_dim) is decoded. Else q4 (decoded q) and decoded K."""
    offs_n = start + tl.arange(0, U)
    if NATIVE:
        s = _fp4_dot(qp, qs, kb, ks, BLOCK_H, U, D, G, FMT, DOT_FP32) * qk_scale
    else:
        k = _dequant_tile_mma(kb, ks, U, D, G, FMT, not DOT_FP32)
        s = _dot(q4, tl.trans(k), DOT_FP32) * qk_scale
    q_pos = tl.full([BLOCK_H], 0, tl.int32) + seq_len - 1
    p, beta, alpha, m_new = _fp4_softmax(s, m_i, offs_n, q_pos, seq_len, keep, MASKED, False)
    if NATIVE and AUTO:
        pv, psum = _fp4_pv_native(p, vb, vs, beta, BLOCK_H, U, D, G, FMT, DOT_FP32)
    else:
        if AUTO:
            vt = _dequant_tile_mma(vb, vs, D, U, G, FMT, not DOT_FP32)
        else:
            vt = tl.trans(_dequant_tile_mma(vb, vs, U, D, G, FMT, not DOT_FP32))
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
        # Decoded straight to 16-bit (exact: e2m1 x e4m3 needs 6 significant bits, e2m1 x e8m0
        # is bf16 here), not through fp32: two fp32 [U, D] tiles held the kernel at 255
        # registers (two CTAs per SM) although this loop runs for ~5 % of the units.
        fresh = (offs_n == seq_len - 1)[:, None]
        k = _load_dequant_mma(page + OFF_K4, page + OFF_K4S, rows, D // 2, D // G, ok[:, None],
                              U, D, G, FMT, not DOT_FP32).to(q.dtype)
        v = _load_dequant_mma(page + OFF_V4, page + OFF_V4S, rows, D // 2, D // G, ok[:, None],
                              U, D, G, FMT, not DOT_FP32).to(q.dtype)
        k = tl.where(fresh, kn[None, :], k)
        v = tl.where(fresh, vn[None, :], v)
    s = _dot(q, tl.trans(k), DOT_FP32) * qk_scale
    s = tl.where(ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_FP32)
    return acc, l_i * alpha + tl.sum(p, axis=1), m_new


# Batch-dependent ints/strides unspecialised: one compiled variant per engine, not per batch.
@triton.jit(do_not_specialize=["tiles_per_split", "K_SEL", "stride_selb", "stride_selh",
                              "stride_mb", "stride_mh"])
def _paged_decode_kernel(
    Q, Kn, Vn, Cache, BT, SeqLens, Sel, Acc, ML,
    qk_scale, tiles_per_split, K_SEL,
    stride_qb, stride_qh, stride_knb, stride_knh, stride_vnb, stride_vnh, stride_btb,
    stride_cb, stride_ch, stride_selb, stride_selh,
    stride_ab, stride_ah, stride_as, stride_mb, stride_mh, stride_ms,
    Hkv: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr, U: tl.constexpr,
    P: tl.constexpr, D: tl.constexpr, G: tl.constexpr, FMT: tl.constexpr, AUTO: tl.constexpr,
    DOT_FP32: tl.constexpr, NATIVE: tl.constexpr,
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
        if NATIVE:
            q4 = q  # unused: the FP4 dots take qp / qsc
        else:
            q4 = _dequant_tile_mma(qp, qsc, BLOCK_H, D, G, FMT, False)  # fp16 / bf16, exact

        sel_row = Sel + b * stride_selb + kvh * stride_selh
        lo, hi, n_sel = _selected_bounds(sel_row, K_SEL, j0, j1, seq_len * 0)

        acc = tl.zeros([BLOCK_H, D], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)

        j_end = tl.where(n_sel < n_units, j1, j0)  # every unit selected: no FP4 loop
        j_full = tl.minimum(j_end, seq_len // U)  # the partial last unit needs masks
        ptr = lo
        nxt = tl.load(sel_row + ptr, mask=ptr < hi, other=-1)
        for j in range(j0, j_full):
            kb, ks, vb, vs = _tile_bytes(Cache, BT, b, kvh, j * U, U, seq_len, stride_btb,
                                         stride_cb, stride_ch, U, P, D, G, AUTO, False, True,
                                         OFF_K4, OFF_K4S, OFF_V4, OFF_V4S)
            acc, l_i, m_i = _paged_fp4_tile(
                acc, l_i, m_i, q4, qp, qsc, kb, ks, vb, vs, j * U, seq_len, qk_scale, j != nxt,
                BLOCK_H, U, D, G, FMT, AUTO, False, DOT_FP32, NATIVE)
            ptr += (j == nxt).to(tl.int32)
            nxt = tl.load(sel_row + ptr, mask=ptr < hi, other=-1)
        if j_full < j_end:
            kb, ks, vb, vs = _tile_bytes(Cache, BT, b, kvh, j_full * U, seq_len - j_full * U,
                                         seq_len, stride_btb, stride_cb, stride_ch, U, P, D, G,
                                         AUTO, True, True, OFF_K4, OFF_K4S, OFF_V4, OFF_V4S)
            acc, l_i, m_i = _paged_fp4_tile(
                acc, l_i, m_i, q4, qp, qsc, kb, ks, vb, vs, j_full * U, seq_len, qk_scale,
                j_full != nxt, BLOCK_H, U, D, G, FMT, AUTO, True, DOT_FP32, NATIVE)

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


# Batch-dependent ints/strides unspecialised: one compiled variant per engine, not per batch.
@triton.jit(do_not_specialize=["tiles_per_split", "stride_mb", "stride_mh"])
def _paged_reduce_kernel(
    Acc, ML, SeqLens, Out, tiles_per_split,
    stride_ab, stride_ah, stride_as, stride_mb, stride_mh, stride_ms, stride_ob, stride_oh,
    Hq: tl.constexpr, U: tl.constexpr, D: tl.constexpr, SPLIT_CHUNK: tl.constexpr,
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
                  SPLIT_CHUNK)
