"""ThriftAttention decode (Sq == 1): split-KV, all query heads of a KV group in one tile.

Grid (B * Hkv, num_splits). Each program walks ``tiles_per_split`` key tiles of one KV head for
the group's query heads (rows padded to BLOCK_H >= 16 for tl.dot), FP4 loop first, then the
selected tiles of its range in FP16, and writes an unnormalised partial (acc, m, l); a second
kernel merges the splits. Selection is per KV head (one list for the group).
"""

import triton
import triton.language as tl
from thrift_vllm.kernels.fp4 import _dequant_tile, _dequant_tile_mma
from thrift_vllm.kernels.tiles import _fp4_tile, _fp8_rows, _fp16_tile


@triton.jit
def _thrift_decode_kernel(
    Q,
    K,
    V,
    Qp,
    Qs,
    Kp,
    Ks,
    Vp,
    Vs,
    Sel,
    Acc,
    ML,
    Skv,
    n_kv_blocks,
    K_SEL,
    tiles_per_split,
    qk_scale,
    use_fp4,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_qpb,
    stride_qph,
    stride_qsb,
    stride_qsh,
    stride_kpb,
    stride_kph,
    stride_kps,
    stride_ksb,
    stride_ksh,
    stride_kss,
    stride_vpb,
    stride_vph,
    stride_vpd,
    stride_vsb,
    stride_vsh,
    stride_vsd,
    stride_selb,
    stride_selh,
    stride_ab,
    stride_ah,
    stride_as,
    stride_mb,
    stride_mh,
    stride_ms,
    Hkv: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK: tl.constexpr,
    D: tl.constexpr,
    G: tl.constexpr,
    FMT: tl.constexpr,
    FP4_MATH: tl.constexpr,
    K_POW2: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """Q: [B, Hq, 1, D]; K/V, Qp/Qs, Kp/Ks, Vp/Vs, Sel as in the prefill kernel (Sel rows of one
    group are equal; the group's first row is read). Acc: fp32 [B, Hq, num_splits, D];
    ML: fp32 [B, Hq, num_splits, 2] holding (m, l) in the log2 domain."""
    bkv = tl.program_id(0)
    split = tl.program_id(1)
    b = (bkv // Hkv).to(tl.int64)
    kvh = bkv % Hkv
    rows = tl.arange(0, BLOCK_H)
    row_ok = rows < GROUP
    h = kvh * GROUP + rows
    offs_d = tl.arange(0, D)
    offs_dp = tl.arange(0, D // 2)
    offs_dg = tl.arange(0, D // G)
    q = tl.load(
        Q + b * stride_qb + h[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    qp = tl.load(
        Qp + b * stride_qpb + h[:, None] * stride_qph + offs_dp[None, :],
        mask=row_ok[:, None],
        other=0,
    )
    qs = tl.load(
        Qs + b * stride_qsb + h[:, None] * stride_qsh + offs_dg[None, :],
        mask=row_ok[:, None],
        other=0,
    )
    q_fac = tl.full([BLOCK_H], 1.0, dtype=tl.float32)
    if FP4_MATH == "native":
        q4 = q  # unused: dot_scaled reads qp/qs
    elif FP4_MATH == "fp8":
        q4, q_fac = _fp8_rows(_dequant_tile(qp, qs, BLOCK_H, D, G, FMT))
    else:
        q4 = _dequant_tile_mma(qp, qs, BLOCK_H, D, G, FMT, False)  # fp16 (NVFP4) / bf16
    q_pos = tl.full([BLOCK_H], Skv - 1, dtype=tl.int32)

    j0 = split * tiles_per_split
    j1 = tl.minimum(j0 + tiles_per_split, n_kv_blocks)
    sel_row = Sel + b * stride_selb + (kvh * GROUP) * stride_selh
    sel = tl.load(sel_row + tl.arange(0, K_POW2), mask=tl.arange(0, K_POW2) < K_SEL, other=-1)
    lo = tl.sum(((sel >= 0) & (sel < j0)).to(tl.int32), axis=0)
    hi = tl.sum(((sel >= 0) & (sel < j1)).to(tl.int32), axis=0)

    kp_base = Kp + b * stride_kpb + kvh * stride_kph
    ks_base = Ks + b * stride_ksb + kvh * stride_ksh
    vp_base = Vp + b * stride_vpb + kvh * stride_vph
    vs_base = Vs + b * stride_vsb + kvh * stride_vsh

    acc = tl.zeros([BLOCK_H, D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)

    j_end = j0 + (j1 - j0) * use_fp4
    j_full = j_end
    if j_end == n_kv_blocks:
        j_full = tl.minimum(j_end, Skv // BLOCK)  # the partial last tile needs a mask
    ptr = lo
    nxt = tl.load(sel_row + ptr, mask=ptr < hi, other=-1)
    for j in range(j0, j_full):
        acc, l_i, m_i = _fp4_tile(
            acc,
            l_i,
            m_i,
            q4,
            q_fac,
            qp,
            qs,
            kp_base,
            ks_base,
            vp_base,
            vs_base,
            stride_kps,
            stride_kss,
            stride_vpd,
            stride_vsd,
            j * BLOCK,
            q_pos,
            Skv,
            qk_scale,
            j != nxt,
            BLOCK_H,
            BLOCK,
            D,
            G,
            FMT,
            FP4_MATH,
            False,
            False,
            DOT_FP32,
        )
        ptr += (j == nxt).to(tl.int32)
        nxt = tl.load(sel_row + ptr, mask=ptr < hi, other=-1)
    if j_full < j_end:
        acc, l_i, m_i = _fp4_tile(
            acc,
            l_i,
            m_i,
            q4,
            q_fac,
            qp,
            qs,
            kp_base,
            ks_base,
            vp_base,
            vs_base,
            stride_kps,
            stride_kss,
            stride_vpd,
            stride_vsd,
            j_full * BLOCK,
            q_pos,
            Skv,
            qk_scale,
            j_full != nxt,
            BLOCK_H,
            BLOCK,
            D,
            G,
            FMT,
            FP4_MATH,
            True,
            False,
            DOT_FP32,
        )

    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_kb + kvh * stride_kh
    for i in range(lo, hi):
        j = tl.load(sel_row + i)
        acc, l_i, m_i = _fp16_tile(
            acc,
            l_i,
            m_i,
            q,
            k_base,
            v_base,
            stride_ks,
            stride_ks,
            j * BLOCK,
            q_pos,
            Skv,
            qk_scale,
            BLOCK,
            D,
            False,
            DOT_FP32,
        )

    tl.store(
        Acc + b * stride_ab + h[:, None] * stride_ah + split * stride_as + offs_d[None, :],
        acc,
        mask=row_ok[:, None],
    )
    ml = ML + b * stride_mb + h * stride_mh + split * stride_ms
    tl.store(ml, m_i, mask=row_ok)
    tl.store(ml + 1, l_i, mask=row_ok)


@triton.jit
def _decode_reduce_kernel(
    Acc,
    ML,
    Out,
    num_splits,
    stride_ab,
    stride_ah,
    stride_as,
    stride_mb,
    stride_mh,
    stride_ms,
    stride_ob,
    stride_oh,
    Hq: tl.constexpr,
    D: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr,
):
    """Merge split partials: Out[b, h, 0, :] = sum_s 2**(m_s - M) acc_s / sum_s 2**(m_s - M) l_s.
    Grid (B * Hq,)."""
    bh = tl.program_id(0)
    b = (bh // Hq).to(tl.int64)
    h = bh % Hq
    _merge_splits(Acc + b * stride_ab + h * stride_ah, ML + b * stride_mb + h * stride_mh,
                  Out + b * stride_ob + h * stride_oh, num_splits, stride_as, stride_ms,
                  D, SPLIT_CHUNK)


@triton.jit
def _merge_splits(acc_ptr, ml_ptr, out_ptr, n_splits, stride_as, stride_ms, D: tl.constexpr,
                  SPLIT_CHUNK: tl.constexpr):
    """One (sequence, query head): out[:] = sum_s 2**(m_s - M) acc_s / sum_s 2**(m_s - M) l_s
    over the first ``n_splits`` partials (no partial, or no weight: zeros). The partials are
    merged SPLIT_CHUNK at a time with a running maximum, so the tile does not grow with the
    split count (a [splits, D] tile at 256+ splits spilled at 255 registers on sm90 and cost
    3.6 ms per 32-layer step inside vLLM, H200, 2026-11-30)."""
    offs_d = tl.arange(0, D)
    zero = tl.sum(tl.zeros([SPLIT_CHUNK], dtype=tl.float32), axis=0)
    m_run = zero - 1.0e30
    den = zero
    out = tl.zeros([D], dtype=tl.float32)
    for c in range(0, n_splits, SPLIT_CHUNK):
        offs_s = c + tl.arange(0, SPLIT_CHUNK)
        smask = offs_s < n_splits
        m = tl.load(ml_ptr + offs_s * stride_ms, mask=smask, other=-1.0e30)
        l_s = tl.load(ml_ptr + offs_s * stride_ms + 1, mask=smask, other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, axis=0))
        alpha = tl.math.exp2(m_run - m_new)
        w = tl.where(smask, tl.math.exp2(m - m_new), 0.0)
        acc = tl.load(acc_ptr + offs_s[:, None] * stride_as + offs_d[None, :],
                      mask=smask[:, None], other=0.0)
        out = out * alpha + tl.sum(acc * w[:, None], axis=0)
        den = den * alpha + tl.sum(l_s * w, axis=0)
        m_run = m_new
    out = out / tl.where(den > 0, den, 1.0)
    tl.store(out_ptr + offs_d, out.to(out_ptr.dtype.element_ty))
