"""Paged decode with the Hopper math (``math="fp16"``, "FP4 as storage"; notes/kernels.md,
"Fifth pass"): K/V decoded from the FP4 pages to the model dtype, q not quantised, scores in
fp32, P = exp2(s - m) cast to the model dtype for the P x V dot, l from the fp32 p.

Same grid, split plan and partial outputs as ``kernels/paged_decode.py`` (the reduce kernel is
shared). Per program: tiles of UPI units (UPI * U tokens) read from the pages, then
- auto layout: the selected units are excluded from the FP4 tiles (scores -inf) and read from
  ``k_hi``/``v_hi`` in a second loop (the selection is the op's ``paged_select_triton``);
- nvfp4 layout: no selection at all; position seq_len - 1 (the step's own token) is excluded from
  the pages and added from the forward's ``key``/``value`` by the program holding the last unit.
SWAP computes S^T = K q^T (tokens in M, the GQA group's query heads in N = BLOCK_H >= 8), so the
softmax runs on [T, BLOCK_H] instead of [16, T]; acc is then [D, BLOCK_H].
"""

import triton
import triton.language as tl
from thrift_vllm.kernels.fp4 import _dequant_tile_mma
from thrift_vllm.kernels.paged_decode import _page, _selected_bounds, _tile_bytes
from thrift_vllm.kernels.tiles import _dot


@triton.jit
def _softmax_pv(acc, l_i, m_i, q, k, v, ok, qk_scale, V_T: tl.constexpr, SWAP: tl.constexpr,
                MASK: tl.constexpr, DOT_FP32: tl.constexpr):
    """One online-softmax step over a tile: k [T, D], v [T, D] or (V_T) [D, T], model dtype;
    ok [T] (MASK): tokens that count. q [BLOCK_H, D], acc [BLOCK_H, D]; SWAP: q [D, BLOCK_H],
    acc [D, BLOCK_H]. m_i, l_i [BLOCK_H], log2 domain; P is rounded to the model dtype."""
    if SWAP:
        s = _dot(k, q, DOT_FP32) * qk_scale  # [T, BLOCK_H]
        if MASK:
            s = tl.where(ok[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[None, :])
        if V_T:
            pv = _dot(v, p.to(k.dtype), DOT_FP32)
        else:
            pv = _dot(tl.trans(v), p.to(k.dtype), DOT_FP32)
        return acc * alpha[None, :] + pv, l_i * alpha + tl.sum(p, axis=0), m_new
    else:
        s = _dot(q, tl.trans(k), DOT_FP32) * qk_scale  # [BLOCK_H, T]
        if MASK:
            s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        if V_T:
            pv = _dot(p.to(k.dtype), tl.trans(v), DOT_FP32)
        else:
            pv = _dot(p.to(k.dtype), v, DOT_FP32)
        return acc * alpha[:, None] + pv, l_i * alpha + tl.sum(p, axis=1), m_new


@triton.jit
def _fp4_tile(acc, l_i, m_i, q, kb, ks, vb, vs, ok, qk_scale, T: tl.constexpr, D: tl.constexpr,
              G: tl.constexpr, FMT: tl.constexpr, AUTO: tl.constexpr, SWAP: tl.constexpr,
              MASK: tl.constexpr, DOT_FP32: tl.constexpr):
    """Decode one tile's bytes to the model dtype (exact for NVFP4; MXFP4 goes through bf16)
    and run :func:`_softmax_pv` on it."""
    k = _dequant_tile_mma(kb, ks, T, D, G, FMT, not DOT_FP32).to(q.dtype)
    if AUTO:
        v = _dequant_tile_mma(vb, vs, D, T, G, FMT, not DOT_FP32).to(q.dtype)  # [D, T]
    else:
        v = _dequant_tile_mma(vb, vs, T, D, G, FMT, not DOT_FP32).to(q.dtype)  # [T, D]
    return _softmax_pv(acc, l_i, m_i, q, k, v, ok, qk_scale, AUTO, SWAP, MASK, DOT_FP32)


@triton.jit
def _skip_selected(ok, tok, j, ptr, nxt, nxt2, sel_row, hi, U: tl.constexpr, UPI: tl.constexpr):
    """Auto layout: clear ``ok`` on the tile's selected units (units j..j+UPI-1; the ascending
    list's next two entries nxt, nxt2 at ptr, ptr + 1) and move past them. Both entries are
    loaded once per tile, after the tile's checks: two dependent loads per iteration broke
    Triton's software pipeliner (3.9, sm90 AOT) (assertion "Op used before defined") on sm90."""
    first = nxt == j
    ok = ok & ((tok // U != 0) | (j != nxt))
    ptr += first.to(tl.int32)
    if UPI == 2:
        cand = tl.where(first, nxt2, nxt)
        second = cand == j + 1
        ok = ok & ((tok // U != 1) | (j + 1 != cand))
        ptr += second.to(tl.int32)
    nxt = tl.load(sel_row + ptr, mask=ptr < hi, other=-1)
    nxt2 = tl.load(sel_row + ptr + 1, mask=ptr + 1 < hi, other=-1)
    return ok, ptr, nxt, nxt2


# Batch-dependent ints/strides unspecialised: one compiled variant per engine, not per batch.
@triton.jit(do_not_specialize=["tiles_per_split", "K_SEL", "stride_selb", "stride_selh",
                              "stride_mb", "stride_mh"])
def _paged_decode_fp16_kernel(
    Q, Kn, Vn, Cache, BT, SeqLens, Sel, Acc, ML,
    qk_scale, tiles_per_split, K_SEL,
    stride_qb, stride_qh, stride_knb, stride_knh, stride_vnb, stride_vnh, stride_btb,
    stride_cb, stride_ch, stride_selb, stride_selh,
    stride_ab, stride_ah, stride_as, stride_mb, stride_mh, stride_ms,
    Hkv: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr, U: tl.constexpr,
    P: tl.constexpr, D: tl.constexpr, G: tl.constexpr, FMT: tl.constexpr, AUTO: tl.constexpr,
    DOT_FP32: tl.constexpr, UPI: tl.constexpr, SWAP: tl.constexpr, OPS_F16: tl.constexpr,
    OFF_KHI: tl.constexpr, OFF_VHI: tl.constexpr, OFF_K4: tl.constexpr, OFF_K4S: tl.constexpr,
    OFF_V4: tl.constexpr, OFF_V4S: tl.constexpr,
):
    """Arguments as ``_paged_decode_kernel``'s (Sel read in the auto layout only; Kn/Vn in the
    nvfp4 layout only); tiles_per_split must be a multiple of UPI. Writes the same (acc, m, l)
    partials for ``_paged_reduce_kernel``. OPS_F16 (bf16 models, NVFP4): the FP4 tiles' dots
    in fp16 (q rounded to fp16 once, P rounded to fp16) so the decoded values skip the
    fp16 -> bf16 conversion; the selected units and the fresh token keep the model dtype."""
    T: tl.constexpr = U * UPI
    SAME_PAGE: tl.constexpr = P % T == 0
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
        if SWAP:
            q = tl.load(Q + b * stride_qb + h[None, :] * stride_qh + offs_d[:, None],
                        mask=row_ok[None, :], other=0.0)  # [D, BLOCK_H]
            acc = tl.zeros([D, BLOCK_H], dtype=tl.float32)
        else:
            q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + offs_d[None, :],
                        mask=row_ok[:, None], other=0.0)  # [BLOCK_H, D]
            acc = tl.zeros([BLOCK_H, D], dtype=tl.float32)
        qf = q.to(tl.float16) if OPS_F16 else q  # the FP4 tiles' q
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
        tok = tl.arange(0, T)

        if AUTO:
            # Selected units before / inside this split (as the FP4 kernel counts them).
            sel_row = Sel + b * stride_selb + kvh * stride_selh
            lo, hi, _ = _selected_bounds(sel_row, K_SEL, j0, j1, seq_len * 0)
            lim = seq_len
            ptr = lo
            nxt = tl.load(sel_row + ptr, mask=ptr < hi, other=-1)
            nxt2 = tl.load(sel_row + ptr + 1, mask=ptr + 1 < hi, other=-1)
        else:
            lim = seq_len - 1  # the step's own token comes from Kn / Vn
        # Whole tiles before `lim` unmasked; then at most one masked tile (j_tail < j1).
        j_tail = j0 + (tl.minimum(j1, lim // U) - j0) // UPI * UPI
        for j in range(j0, j_tail, UPI):
            kb, ks, vb, vs = _tile_bytes(Cache, BT, b, kvh, j * U, T, seq_len, stride_btb,
                                         stride_cb, stride_ch, T, P, D, G, AUTO, False,
                                         SAME_PAGE, OFF_K4, OFF_K4S, OFF_V4, OFF_V4S)
            ok = tok < T
            if AUTO:  # selected units are read from k_hi / v_hi below
                ok, ptr, nxt, nxt2 = _skip_selected(ok, tok, j, ptr, nxt, nxt2, sel_row, hi,
                                                    U, UPI)
            acc, l_i, m_i = _fp4_tile(acc, l_i, m_i, qf, kb, ks, vb, vs, ok, qk_scale, T, D, G,
                                      FMT, AUTO, SWAP, AUTO, DOT_FP32)
        if j_tail < j1:
            n_valid = lim - j_tail * U
            kb, ks, vb, vs = _tile_bytes(Cache, BT, b, kvh, j_tail * U, n_valid, seq_len,
                                         stride_btb, stride_cb, stride_ch, T, P, D, G, AUTO,
                                         True, SAME_PAGE, OFF_K4, OFF_K4S, OFF_V4, OFF_V4S)
            ok = (tok < n_valid) & (tok < (j1 - j_tail) * U)
            if AUTO:
                ok, ptr, nxt, nxt2 = _skip_selected(ok, tok, j_tail, ptr, nxt, nxt2, sel_row,
                                                    hi, U, UPI)
            acc, l_i, m_i = _fp4_tile(acc, l_i, m_i, qf, kb, ks, vb, vs, ok, qk_scale, T, D, G,
                                      FMT, AUTO, SWAP, True, DOT_FP32)

        if AUTO:
            dt = tl.pointer_type(q.dtype)
            u = tl.arange(0, U)
            for i in range(lo, hi):
                js = tl.load(sel_row + i)
                page = _page(Cache, BT, b, js, kvh, stride_btb, stride_cb, stride_ch, P // U)
                hi_off = ((js % (P // U)) * U + u)[:, None] * D + offs_d[None, :]
                ok_s = js * U + u < seq_len
                k = tl.load((page + OFF_KHI).to(dt) + hi_off, mask=ok_s[:, None], other=0.0)
                v = tl.load((page + OFF_VHI).to(dt) + hi_off, mask=ok_s[:, None], other=0.0)
                acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, q, k, v, ok_s, qk_scale, False, SWAP,
                                            True, DOT_FP32)
        else:
            if j1 == n_units:  # this program holds position seq_len - 1
                kn = tl.load(Kn + b * stride_knb + kvh * stride_knh + offs_d).to(tl.float32)
                vn = tl.load(Vn + b * stride_vnb + kvh * stride_vnh + offs_d).to(tl.float32)
                if SWAP:
                    s = tl.sum(q.to(tl.float32) * kn[:, None], axis=0) * qk_scale
                else:
                    s = tl.sum(q.to(tl.float32) * kn[None, :], axis=1) * qk_scale
                m_new = tl.maximum(m_i, s)
                alpha = tl.math.exp2(m_i - m_new)
                p = tl.math.exp2(s - m_new)
                pr = p.to(q.dtype).to(tl.float32)
                if SWAP:
                    acc = acc * alpha[None, :] + vn[:, None] * pr[None, :]
                else:
                    acc = acc * alpha[:, None] + pr[:, None] * vn[None, :]
                l_i = l_i * alpha + p
                m_i = m_new

        if SWAP:
            tl.store(Acc + b * stride_ab + h[None, :] * stride_ah + split * stride_as
                     + offs_d[:, None], acc, mask=row_ok[None, :])
        else:
            tl.store(Acc + b * stride_ab + h[:, None] * stride_ah + split * stride_as
                     + offs_d[None, :], acc, mask=row_ok[:, None])
        ml = ML + b * stride_mb + h * stride_mh + split * stride_ms
        tl.store(ml, m_i, mask=row_ok)
        tl.store(ml + 1, l_i, mask=row_ok)
