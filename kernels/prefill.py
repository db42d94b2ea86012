"""ThriftAttention prefill: one program per (query tile, batch * query head).

Query tiles are aligned to absolute positions (tile t holds positions of block
``first_q_block + t``), the same blocks selection scores. Two loops share one online softmax:
loop A walks every candidate key tile in FP4 and turns the selected ones into no-ops (branch-free,
so Triton can pipeline it; the waste is the FP16 share itself), loop B computes the selected
tiles from the original fp16/bf16 q, k, v. State stays in fp32 registers throughout.

FP4 operands: with FP4_MATH "bf16"/"fp8" the kernel reads K and V as decoded once per call by
``ops.quantize.dequantize_fp4`` (bf16 exact, or e4m3 + power-of-two factors), since decoding
them again for every query tile costs more ALU than the MMAs; with "native" (Blackwell) it reads
the packed FP4 and scales straight into ``tl.dot_scaled``.
"""

import triton
import triton.language as tl
from thrift_vllm.kernels.fp4 import _dequant_tile
from thrift_vllm.kernels.tiles import _fp4_dense_tile, _fp4_tile, _fp8_rows, _fp16_tile


@triton.jit
def _prefill_fp4_step(
    acc, l_i, m_i, q4, qk_row, v_fac, qp, qs,
    kp_base, ks_base, vp_base, vs_base, k4_base, kf_base, v4_base,
    stride_kps, stride_kss, stride_vpd, stride_vsd, stride_k4s, stride_v4d,
    j, pos, Skv, qk_scale, keep,
    BLOCK: tl.constexpr, D: tl.constexpr, G: tl.constexpr, FMT: tl.constexpr,
    FP4_MATH: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Dispatch one FP4 tile to the packed (native) or pre-dequantised (bf16/fp8) variant."""
    if FP4_MATH == "native":
        return _fp4_tile(
            acc, l_i, m_i, q4, qk_row, qp, qs, kp_base, ks_base, vp_base, vs_base,
            stride_kps, stride_kss, stride_vpd, stride_vsd, j * BLOCK, pos, Skv, qk_scale, keep,
            BLOCK, BLOCK, D, G, FMT, FP4_MATH, MASKED, CAUSAL, DOT_FP32)
    else:
        return _fp4_dense_tile(
            acc, l_i, m_i, q4, qk_row, v_fac, k4_base, kf_base, v4_base, stride_k4s, stride_v4d,
            j * BLOCK, pos, Skv, keep, BLOCK, BLOCK, D, G, FMT, FP4_MATH == "fp8", MASKED,
            CAUSAL, DOT_FP32)


# Batch-dependent ints/strides unspecialised: one compiled variant per engine, not per batch.
@triton.jit(do_not_specialize=[
    "Sq", "Skv", "n_kv_blocks", "first_q_block", "q_offset", "K_SEL", "use_fp4", "stride_qsb",
    "stride_qsh", "stride_qss", "stride_ksb", "stride_ksh", "stride_kss", "stride_vsb",
    "stride_vsh", "stride_vsd", "stride_kfb", "stride_kfh", "stride_vfb", "stride_vfh",
    "stride_selb", "stride_selh", "stride_selr",
])
def _thrift_prefill_kernel(
    Q, K, V, Qp, Qs, Kp, Ks, Vp, Vs, K4, KF, V4, VF, Sel, Out,
    Sq, Skv, n_kv_blocks, first_q_block, q_offset, K_SEL, qk_scale, use_fp4,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_qpb, stride_qph, stride_qps, stride_qsb, stride_qsh, stride_qss,
    stride_kpb, stride_kph, stride_kps, stride_ksb, stride_ksh, stride_kss,
    stride_vpb, stride_vph, stride_vpd, stride_vsb, stride_vsh, stride_vsd,
    stride_k4b, stride_k4h, stride_k4s, stride_kfb, stride_kfh,
    stride_v4b, stride_v4h, stride_v4d, stride_vfb, stride_vfh,
    stride_selb, stride_selh, stride_selr,
    stride_ob, stride_oh, stride_os,
    Hq: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr,
    G: tl.constexpr, FMT: tl.constexpr, FP4_MATH: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """Q/K/V: [B, H, S, D] fp16/bf16 (last dim contiguous; K and V share strides). Qp/Kp:
    uint8 [B, H, S, D/2], Qs/Ks: uint8 scale bytes [B, H, S, D/G]; Vp: uint8 [B, Hkv, D, S_pad/2],
    Vs: [B, Hkv, D, S_pad/G] (V grouped along tokens, S_pad a multiple of BLOCK). K4: [B, Hkv,
    Skv, D] and V4: [B, Hkv, D, S_pad], bf16 or e4m3, with fp32 factors KF [B, Hkv, Skv] and
    VF [B, Hkv, D] for e4m3 (bf16/fp8 math only). Sel: int32 [B, Hq, n_q_blocks, K_SEL]
    ascending, -1 padded. Out: [B, Hq, Sq, D] like Q."""
    t = tl.num_programs(0) - 1 - tl.program_id(0)  # longest causal rows first
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = bh % Hq
    kvh = h // GROUP
    r = first_q_block + t
    pos = r * BLOCK + tl.arange(0, BLOCK)
    qi = pos - q_offset
    row_ok = (qi >= 0) & (qi < Sq)
    offs_d = tl.arange(0, D)

    qp = tl.load(Qp + b * stride_qpb + h * stride_qph + qi[:, None] * stride_qps
                 + tl.arange(0, D // 2)[None, :], mask=row_ok[:, None], other=0)
    qs = tl.load(Qs + b * stride_qsb + h * stride_qsh + qi[:, None] * stride_qss
                 + tl.arange(0, D // G)[None, :], mask=row_ok[:, None], other=0)
    q_f32 = _dequant_tile(qp, qs, BLOCK, D, G, FMT)  # decode the bytes already loaded
    qk_row = tl.full([BLOCK], 1.0, dtype=tl.float32) * qk_scale
    v_fac = tl.full([D], 1.0, dtype=tl.float32)
    if FP4_MATH == "fp8":
        q4, q_fac = _fp8_rows(q_f32)
        qk_row = q_fac * qk_scale
        v_fac = tl.load(VF + b * stride_vfb + kvh * stride_vfh + offs_d)
    elif FP4_MATH == "bf16":
        q4 = q_f32.to(tl.bfloat16)
    else:
        q4 = q_f32  # unused: dot_scaled reads qp/qs
        qk_row = tl.full([BLOCK], 1.0, dtype=tl.float32)  # _fp4_tile's q_fac slot

    kp_base = Kp + b * stride_kpb + kvh * stride_kph
    ks_base = Ks + b * stride_ksb + kvh * stride_ksh
    vp_base = Vp + b * stride_vpb + kvh * stride_vph
    vs_base = Vs + b * stride_vsb + kvh * stride_vsh
    k4_base = K4 + b * stride_k4b + kvh * stride_k4h
    kf_base = KF + b * stride_kfb + kvh * stride_kfh
    v4_base = V4 + b * stride_v4b + kvh * stride_v4h
    sel_row = Sel + b * stride_selb + h * stride_selh + t * stride_selr

    acc = tl.zeros([BLOCK, D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    m_i = tl.full([BLOCK], -1.0e30, dtype=tl.float32)

    if CAUSAL:
        n_iter = r + 1
        n_full = r  # the diagonal tile needs the causal mask
        n_cand = r + 1
    else:
        n_iter = n_kv_blocks
        n_full = Skv // BLOCK
        n_cand = n_kv_blocks
    n_iter = n_iter * use_fp4
    n_full = tl.minimum(n_full, n_iter)

    # Loop A: FP4 over all candidate tiles; the selected ones (ascending list) become no-ops.
    ptr = 0
    nxt = tl.load(sel_row, mask=K_SEL > 0, other=-1)
    for j in range(0, n_full):
        acc, l_i, m_i = _prefill_fp4_step(
            acc, l_i, m_i, q4, qk_row, v_fac, qp, qs, kp_base, ks_base, vp_base, vs_base,
            k4_base, kf_base, v4_base, stride_kps, stride_kss, stride_vpd, stride_vsd,
            stride_k4s, stride_v4d, j, pos, Skv, qk_scale, j != nxt,
            BLOCK, D, G, FMT, FP4_MATH, False, CAUSAL, DOT_FP32)
        ptr += (j == nxt).to(tl.int32)
        nxt = tl.load(sel_row + ptr, mask=ptr < K_SEL, other=-1)
    if n_full < n_iter:
        acc, l_i, m_i = _prefill_fp4_step(
            acc, l_i, m_i, q4, qk_row, v_fac, qp, qs, kp_base, ks_base, vp_base, vs_base,
            k4_base, kf_base, v4_base, stride_kps, stride_kss, stride_vpd, stride_vsd,
            stride_k4s, stride_v4d, n_full, pos, Skv, qk_scale, n_full != nxt,
            BLOCK, D, G, FMT, FP4_MATH, True, CAUSAL, DOT_FP32)

    # Loop B: the selected tiles in FP16. q is loaded only now so that it does not hold
    # registers through loop A.
    q = tl.load(Q + b * stride_qb + h * stride_qh + qi[:, None] * stride_qs + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    # Rows with fewer candidates than K_SEL are -1 padded at the end, so the first
    # min(K_SEL, n_cand) entries are exactly the valid ones.
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_kb + kvh * stride_kh
    for i in range(0, tl.minimum(K_SEL, n_cand)):
        j = tl.load(sel_row + i)
        acc, l_i, m_i = _fp16_tile(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_ks,
                                   j * BLOCK, pos, Skv, qk_scale, BLOCK, D, CAUSAL, DOT_FP32)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(Out + b * stride_ob + h * stride_oh + qi[:, None] * stride_os + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None])

