"""ThriftAttention prefill: one program per (query tile, batch * query head).

Query tiles are aligned to absolute positions (tile t holds positions of block
``first_q_block + t``), the same blocks selection scores. Two loops share one online softmax:
loop A walks every candidate key tile in FP4 and turns the selected ones into no-ops (branch-free,
so Triton can pipeline it; the waste is the FP16 share itself), loop B computes the selected
tiles from the original fp16/bf16 q, k, v. State stays in fp32 registers throughout.
"""

import triton
import triton.language as tl

from thrift_vllm.kernels.fp4 import _dequant_tile
from thrift_vllm.kernels.tiles import _fp4_tile, _fp8_rows, _fp16_tile


@triton.jit
def _thrift_prefill_kernel(
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
    Out,
    Sq,
    Skv,
    n_kv_blocks,
    first_q_block,
    q_offset,
    K_SEL,
    qk_scale,
    use_fp4,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_qpb,
    stride_qph,
    stride_qps,
    stride_qsb,
    stride_qsh,
    stride_qss,
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
    stride_selr,
    stride_ob,
    stride_oh,
    stride_os,
    Hq: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK: tl.constexpr,
    D: tl.constexpr,
    G: tl.constexpr,
    FMT: tl.constexpr,
    FP4_MATH: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """Q/K/V: [B, H, S, D] fp16/bf16 (last dim contiguous; K and V share strides). Qp/Kp:
    uint8 [B, H, S, D/2], Qs/Ks: [B, H, S, D/G] scales; Vp: uint8 [B, Hkv, D, S_pad/2], Vs:
    [B, Hkv, D, S_pad/G] (V grouped along tokens, S_pad a multiple of BLOCK). Sel: int32
    [B, Hq, n_q_blocks, K_SEL] ascending, -1 padded. Out: [B, Hq, Sq, D] like Q."""
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
    offs_dp = tl.arange(0, D // 2)
    offs_dg = tl.arange(0, D // G)

    q = tl.load(
        Q + b * stride_qb + h * stride_qh + qi[:, None] * stride_qs + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    qp = tl.load(
        Qp + b * stride_qpb + h * stride_qph + qi[:, None] * stride_qps + offs_dp[None, :],
        mask=row_ok[:, None],
        other=0,
    )
    qs = tl.load(
        Qs + b * stride_qsb + h * stride_qsh + qi[:, None] * stride_qss + offs_dg[None, :],
        mask=row_ok[:, None],
        other=0,
    )
    q_fac = tl.full([BLOCK], 1.0, dtype=tl.float32)
    if FP4_MATH == "native":
        q4 = q  # unused: dot_scaled reads qp/qs
    elif FP4_MATH == "fp8":
        q4, q_fac = _fp8_rows(_dequant_tile(qp, qs, BLOCK, D, G, FMT))
    else:
        q4 = _dequant_tile(qp, qs, BLOCK, D, G, FMT).to(tl.bfloat16)

    kp_base = Kp + b * stride_kpb + kvh * stride_kph
    ks_base = Ks + b * stride_ksb + kvh * stride_ksh
    vp_base = Vp + b * stride_vpb + kvh * stride_vph
    vs_base = Vs + b * stride_vsb + kvh * stride_vsh
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
            pos,
            Skv,
            qk_scale,
            j != nxt,
            BLOCK,
            BLOCK,
            D,
            G,
            FMT,
            FP4_MATH,
            False,
            CAUSAL,
            DOT_FP32,
        )
        ptr += (j == nxt).to(tl.int32)
        nxt = tl.load(sel_row + ptr, mask=ptr < K_SEL, other=-1)
    if n_full < n_iter:
        j = n_full
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
            pos,
            Skv,
            qk_scale,
            j != nxt,
            BLOCK,
            BLOCK,
            D,
            G,
            FMT,
            FP4_MATH,
            True,
            CAUSAL,
            DOT_FP32,
        )

    # Loop B: the selected tiles in FP16. Rows with fewer candidates than K_SEL are -1 padded at
    # the end, so the first min(K_SEL, n_cand) entries are exactly the valid ones.
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_kb + kvh * stride_kh
    for i in range(0, tl.minimum(K_SEL, n_cand)):
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
            pos,
            Skv,
            qk_scale,
            BLOCK,
            D,
            CAUSAL,
            DOT_FP32,
        )

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        Out + b * stride_ob + h * stride_oh + qi[:, None] * stride_os + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=row_ok[:, None],
    )
