"""Inner-loop tiles shared by the prefill and decode kernels. Each takes and returns the online
softmax state ``(acc, l_i, m_i)`` (fp32, log2 domain) for one key tile of BLOCK_N keys.

The FP4 tile implements ``thrift_vllm.reference`` exactly: scores from FP4 q and k, ``p`` taken
against the tile's *own* row max (so the P quantisation does not depend on visiting order), P
quantised per group of G keys, the tile's contribution rescaled by ``exp2(mt - m_new)``.
"""

import triton
import triton.language as tl
from thrift_vllm.kernels.fp4 import (
    _dequant_tile,
    _dequant_tile_mma,
    _e2m1_code,
    _e2m1_value,
    _e8m0_ceil,
    _e8m0_value,
    _mma_scale,
    _pack,
    _round_e4m3,
)

# NVFP4 P: group scale e4m3(448 * amax) and a constant 1/2688 factor (thrift_vllm/reference.py).
P_SCALE_MUL = tl.constexpr(448.0)
P_ROW_DIV = tl.constexpr(2688.0)


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr):
    """tl.dot, or an fp32 dot where the Triton interpreter's bf16 dot is wrong (Triton 3.9 CPU
    interpreter returns garbage for bf16 operands); FP4 operands are exact in either type."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b)


@triton.jit
def _fp4_dot(
    a,
    a_scale,
    bt,
    bt_scale,
    M: tl.constexpr,
    N: tl.constexpr,
    K: tl.constexpr,
    G: tl.constexpr,
    FMT: tl.constexpr,
    EMULATE: tl.constexpr,
):
    """a @ bt.T on packed FP4: a [M, K/2] + scales [M, K/G], bt [N, K/2] + scales [N, K/G].
    Native block-scaled MMA via tl.dot_scaled; EMULATE dequantises instead (the Triton 3.9
    interpreter decodes every dot_scaled scale as e8m0, so NVFP4 is emulated there)."""
    if EMULATE and FMT == "nvfp4":
        af = _dequant_tile(a, a_scale, M, K, G, FMT)
        bf = _dequant_tile(bt, bt_scale, N, K, G, FMT)
        return tl.dot(af, tl.trans(bf))
    else:
        return tl.dot_scaled(
            a, _mma_scale(a_scale, FMT), "e2m1", tl.trans(bt), _mma_scale(bt_scale, FMT), "e2m1"
        )


@triton.jit
def _fp8_rows(x):
    """fp32 [R, C] -> (e4m3 [R, C], fp32 [R] factor) with x ~= e4m3 * factor; the factor is a
    power of two per row putting the row's amax in (128, 256], so fp8 keeps 4 significant bits
    over 14 binades below it. Used by bulk_math="fp8" (FP4 values times e4m3 scales need up to 6
    significant bits: this rounding is the fp8 path's only extra error)."""
    amax = tl.max(tl.abs(x), axis=1)
    fac = _e8m0_value(_e8m0_ceil(amax)) / 256.0
    fac = tl.where(amax > 0, fac, 1.0)
    return (x / fac[:, None]).to(tl.float8e4nv), fac


@triton.jit
def _key_mask(offs_n, q_pos, Skv, CAUSAL: tl.constexpr):
    """[M, N] bool: key valid and (if causal) at or before the query's absolute position."""
    valid = (offs_n < Skv)[None, :]
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= q_pos[:, None])
    return valid


@triton.jit
def _e2m1_round(y):
    """Non-negative fp32 (already divided by the scale) -> nearest e2m1 *value*, ties to even,
    saturating at 6: the same result as _e2m1_value(_e2m1_code(y)) in fewer ops. Below 1 the
    grid step is 0.5 (adding 2**22 rounds to it); from 1 on, e2m1 keeps one mantissa bit (an
    integer round-to-nearest-even on the fp32 bits)."""
    small = (y + 4194304.0) - 4194304.0
    bits = y.to(tl.int32, bitcast=True)
    big = ((bits + 0x1FFFFF + ((bits >> 22) & 1)) & -4194304).to(tl.float32, bitcast=True)
    return tl.where(y < 1.0, small, tl.minimum(big, 6.0))


@triton.jit
def _quant_p(p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, G: tl.constexpr, FMT: tl.constexpr,
             NEED_CODES: tl.constexpr = True):
    """Quantise weights p [M, N] (in [0, 1]) per G keys.

    Returns (vals, codes, stored): vals fp32 [M, N] = code value * group scale, *without* the
    constant NVFP4 1/2688 factor (so vals is exact in bf16), codes int32 [M, N], and the stored
    group scale bytes [M, N/G] (uint8: e4m3 bits for nvfp4, exponents for mxfp4). Without
    NEED_CODES the values are rounded arithmetically (_e2m1_round, fewer ops) and no codes are
    returned.
    """
    pg = tl.reshape(p, [BLOCK_M, BLOCK_N // G, G])
    amax = tl.max(pg, axis=2)
    if FMT == "nvfp4":
        gs = _round_e4m3(amax * P_SCALE_MUL)
        inv = tl.where(gs > 0, P_ROW_DIV / tl.where(gs > 0, gs, 1.0), 0.0)
        stored = gs.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    else:
        e = _e8m0_ceil(amax / 6.0)
        gs = _e8m0_value(e)
        inv = tl.where(e > 0, _e8m0_value(tl.maximum(254 - e, 1)), 0.0)  # 2**(127 - e), exact
        stored = e.to(tl.uint8)
    y = pg * inv[:, :, None]
    if NEED_CODES:
        codes = _e2m1_code(y)
        vals = _e2m1_value(codes) * gs[:, :, None]
        codes = tl.reshape(codes, [BLOCK_M, BLOCK_N])
    else:
        vals = _e2m1_round(y) * gs[:, :, None]
        codes = stored  # no codes needed (bf16 math): skip building them
    return tl.reshape(vals, [BLOCK_M, BLOCK_N]), codes, stored


@triton.jit
def _load_dequant(p_base, s_base, rows, stride_p, stride_s, mask, R: tl.constexpr,
                  C: tl.constexpr, G: tl.constexpr, FMT: tl.constexpr):
    """Vector-load packed FP4 rows [R, C/2] and their scale bytes [R, C/G]; decode to fp32."""
    kp = tl.load(p_base + rows[:, None] * stride_p + tl.arange(0, C // 2)[None, :], mask=mask,
                 other=0)
    ks = tl.load(s_base + rows[:, None] * stride_s + tl.arange(0, C // G)[None, :], mask=mask,
                 other=0)
    return _dequant_tile(kp, ks, R, C, G, FMT)


@triton.jit
def _load_dequant_mma(p_base, s_base, rows, stride_p, stride_s, mask, R: tl.constexpr,
                      C: tl.constexpr, G: tl.constexpr, FMT: tl.constexpr, ASM: tl.constexpr):
    """As _load_dequant, but decoded straight to the dot's operand type (fp16 for NVFP4, bf16
    for MXFP4; exact either way), through the PTX nibble conversion when ASM."""
    kp = tl.load(p_base + rows[:, None] * stride_p + tl.arange(0, C // 2)[None, :], mask=mask,
                 other=0)
    ks = tl.load(s_base + rows[:, None] * stride_s + tl.arange(0, C // G)[None, :], mask=mask,
                 other=0)
    return _dequant_tile_mma(kp, ks, R, C, G, FMT, ASM)


@triton.jit
def _fp4_softmax(s, m_i, offs_n, q_pos, Skv, keep, MASKED: tl.constexpr, CAUSAL: tl.constexpr):
    """Scores s [M, N] (log2 domain) -> (p = exp2(s - tile row max), beta = exp2(mt - m_new),
    alpha = exp2(m_i - m_new), m_new). Masked keys and dropped tiles (keep False) weigh 0."""
    if MASKED:
        s = tl.where(_key_mask(offs_n, q_pos, Skv, CAUSAL), s, float("-inf"))
    s = tl.where(keep, s, float("-inf"))
    mt = tl.max(s, axis=1)
    p = tl.math.exp2(s - tl.where(mt == float("-inf"), 0.0, mt)[:, None])
    m_new = tl.maximum(m_i, mt)
    return p, tl.math.exp2(mt - m_new), tl.math.exp2(m_i - m_new), m_new


@triton.jit
def _fp4_pv(p, v, v_fac, beta, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, G: tl.constexpr,
            FMT: tl.constexpr, FP8: tl.constexpr, DOT_FP32: tl.constexpr):
    """P [M, N] times dequantised V^T tile v [D, N] (bf16, or e4m3 with per-channel factor
    v_fac [D]) -> (pv [M, D], psum [M]), both already multiplied by beta.
    bf16: P quantised to FP4 (the reference semantics). fp8: P in e4m3 (x256 to sit in the
    normal range) -- FP8 arithmetic, an approximation of the FP4 semantics."""
    if FP8:
        p8 = (p * 256.0).to(tl.float8e4nv)
        pv = _dot(p8, tl.trans(v), DOT_FP32) * (v_fac / 256.0)[None, :]
        psum = tl.sum(p8.to(tl.float32), axis=1) / 256.0
    else:
        vals, _, _ = _quant_p(p, BLOCK_M, BLOCK_N, G, FMT, False)
        pv = _dot(vals.to(v.dtype), tl.trans(v), DOT_FP32)  # code * scale: exact in fp16/bf16
        psum = tl.sum(vals, axis=1)
        if FMT == "nvfp4":
            beta = beta / P_ROW_DIV
    return pv * beta[:, None], psum * beta


@triton.jit
def _fp4_pv_native(p, vp, vs, beta, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   D: tl.constexpr, G: tl.constexpr, FMT: tl.constexpr, EMULATE: tl.constexpr):
    """P [M, N] quantised to FP4 codes times packed V^T (vp uint8 [D, N/2] + scale bytes vs
    [D, N/G], grouped along the N keys) through the block-scaled MMA -> (pv [M, D], psum [M]),
    both already multiplied by beta (and NVFP4's constant 1/2688)."""
    vals, codes, stored = _quant_p(p, BLOCK_M, BLOCK_N, G, FMT)
    pv = _fp4_dot(_pack(codes, BLOCK_M, BLOCK_N), stored, vp, vs, BLOCK_M, D, BLOCK_N, G, FMT,
                  EMULATE)
    if FMT == "nvfp4":
        beta = beta / P_ROW_DIV
    return pv * beta[:, None], tl.sum(vals, axis=1) * beta


@triton.jit
def _fp4_tile(
    acc, l_i, m_i, q4, q_fac, qp, qs,
    kp_base, ks_base, vp_base, vs_base, stride_kpn, stride_ksn, stride_vpd, stride_vsd,
    start_n, q_pos, Skv, qk_scale, keep,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
    FMT: tl.constexpr, FP4_MATH: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """One FP4 key tile read from packed storage (decode; prefill with native math).
    q4: dequantised FP4 q, bf16 [M, D] (bf16 math) or e4m3 with row factors q_fac [M] (fp8
    math); qp/qs: packed q and scale bytes (native math). K packed [Skv, D/2] per head, V packed
    transposed [D, S_pad/2] (grouped along tokens, padded to whole tiles). ``keep`` False makes
    the tile a no-op (it is computed in FP16 instead)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    kmask = (offs_n < Skv)[:, None]
    if FP4_MATH == "native":
        offs_dp = tl.arange(0, D // 2)
        offs_dg = tl.arange(0, D // G)
        kp = tl.load(kp_base + offs_n[:, None] * stride_kpn + offs_dp[None, :], mask=kmask,
                     other=0)
        ks = tl.load(ks_base + offs_n[:, None] * stride_ksn + offs_dg[None, :], mask=kmask,
                     other=0)
        s = _fp4_dot(qp, qs, kp, ks, BLOCK_M, BLOCK_N, D, G, FMT, DOT_FP32) * qk_scale
    elif FP4_MATH == "fp8":
        k = _load_dequant(kp_base, ks_base, offs_n, stride_kpn, stride_ksn, kmask, BLOCK_N, D,
                          G, FMT)
        k8, k_fac = _fp8_rows(k)
        s = _dot(q4, tl.trans(k8), DOT_FP32) * ((q_fac * qk_scale)[:, None] * k_fac[None, :])
    else:
        # q4 is in the dot type too (fp16 for NVFP4, bf16 for MXFP4): exact FP4 values.
        k16 = _load_dequant_mma(kp_base, ks_base, offs_n, stride_kpn, stride_ksn, kmask, BLOCK_N,
                                D, G, FMT, not DOT_FP32)
        s = _dot(q4, tl.trans(k16), DOT_FP32) * qk_scale
    p, beta, alpha, m_new = _fp4_softmax(s, m_i, offs_n, q_pos, Skv, keep, MASKED, CAUSAL)
    if FP4_MATH == "native":
        vp = tl.load(vp_base + offs_d[:, None] * stride_vpd
                     + (start_n // 2 + tl.arange(0, BLOCK_N // 2))[None, :])
        vs = tl.load(vs_base + offs_d[:, None] * stride_vsd
                     + (start_n // G + tl.arange(0, BLOCK_N // G))[None, :])
        pv, psum = _fp4_pv_native(p, vp, vs, beta, BLOCK_M, BLOCK_N, D, G, FMT, DOT_FP32)
    elif FP4_MATH == "fp8":
        vt = _load_dequant(vp_base + start_n // 2, vs_base + start_n // G, offs_d, stride_vpd,
                           stride_vsd, (offs_d < D)[:, None], D, BLOCK_N, G, FMT)
        v8, v_fac = _fp8_rows(vt)
        pv, psum = _fp4_pv(p, v8, v_fac, beta, BLOCK_M, BLOCK_N, G, FMT, True, DOT_FP32)
    else:
        vt = _load_dequant_mma(vp_base + start_n // 2, vs_base + start_n // G, offs_d,
                               stride_vpd, stride_vsd, (offs_d < D)[:, None], D, BLOCK_N, G,
                               FMT, not DOT_FP32)
        pv, psum = _fp4_pv(p, vt, m_i, beta, BLOCK_M, BLOCK_N, G, FMT, False, DOT_FP32)
    return acc * alpha[:, None] + pv, l_i * alpha + psum, m_new


@triton.jit
def _fp4_dense_tile(
    acc, l_i, m_i, q4, qk_row, v_fac, k4_base, kf_base, v4_base, stride_k4n, stride_v4d,
    start_n, q_pos, Skv, keep,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
    FMT: tl.constexpr, FP8: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """One FP4 key tile from pre-dequantised copies (prefill on Hopper: decoding K and V once
    per call instead of once per query tile). k4 [Skv, D] and v4 (transposed) [D, S_pad] are
    bf16, or e4m3 with per-key factors kf [Skv] and per-channel factors v_fac [D]. qk_row [M]:
    softmax scale (times q's fp8 row factor)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    k_ptrs = k4_base + offs_n[:, None] * stride_k4n + offs_d[None, :]
    if MASKED:
        k = tl.load(k_ptrs, mask=(offs_n < Skv)[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
    s = _dot(q4, tl.trans(k), DOT_FP32) * qk_row[:, None]
    if FP8:
        kf = tl.load(kf_base + offs_n, mask=offs_n < Skv, other=1.0)
        s = s * kf[None, :]
    p, beta, alpha, m_new = _fp4_softmax(s, m_i, offs_n, q_pos, Skv, keep, MASKED, CAUSAL)
    vt = tl.load(v4_base + offs_d[:, None] * stride_v4d + offs_n[None, :])
    pv, psum = _fp4_pv(p, vt, v_fac, beta, BLOCK_M, BLOCK_N, G, FMT, FP8, DOT_FP32)
    return acc * alpha[:, None] + pv, l_i * alpha + psum, m_new


@triton.jit
def _fp16_tile(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    stride_kn,
    stride_vn,
    start_n,
    q_pos,
    Skv,
    qk_scale,
    BLOCK_N: tl.constexpr,
    D: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """One FP16/BF16 key tile on the original q, k, v (always masked: used for the few selected
    tiles, where the diagonal and the partial last tile may occur)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    kmask = (offs_n < Skv)[:, None]
    k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kmask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kmask, other=0.0)
    s = _dot(q, tl.trans(k), DOT_FP32) * qk_scale
    s = tl.where(_key_mask(offs_n, q_pos, Skv, CAUSAL), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_FP32)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    return acc, l_i, m_new
