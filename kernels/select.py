"""Block-selection kernels: key-block summaries and per-row top-k of the block scores.

Same semantics as ``thrift_vllm/selection.py`` (block grid, candidates, scores,
``force_sink_recent``); the launch logic and the budget -> k rule live in
``thrift_vllm/ops/select.py``.
"""

import triton
import triton.language as tl


# Batch-dependent ints/strides unspecialised: one compiled variant per engine, not per batch.
@triton.jit(do_not_specialize=["S", "stride_kb", "stride_kh", "stride_op"])
def _block_summary_kernel(
    k_ptr,
    mean_ptr,
    min_ptr,
    max_ptr,
    H,
    S,
    D,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_kd,
    stride_op,
    stride_on,
    stride_od,
    BLOCK_SIZE: tl.constexpr,
    TOK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MINMAX: tl.constexpr,
):
    """Per key block summaries of ``k [B, H, S, D]`` (fp16/bf16/fp32, any strides).

    Writes fp32 ``mean [B * H, n_blocks, D]`` and, when ``MINMAX``, fp32 ``min`` / ``max`` of the
    same shape and strides, any strides (``n_blocks = cdiv(S, BLOCK_SIZE)``; the last block may be
    partial and is reduced over its valid tokens only, as the reference's ``_block_reduce``).
    Grid: ``(n_blocks, B * H, cdiv(D, BLOCK_D))``. ``TOK`` = next power of two of ``BLOCK_SIZE``.
    """
    pid_n = tl.program_id(0)
    pid_p = tl.program_id(1).to(tl.int64)  # int64: offsets can exceed 2**31
    pid_d = tl.program_id(2)
    toks = pid_n * BLOCK_SIZE + tl.arange(0, TOK)
    tok_ok = (tl.arange(0, TOK) < BLOCK_SIZE) & (toks < S)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    mask = tok_ok[:, None] & col_ok[None, :]
    ptrs = (
        k_ptr
        + (pid_p // H) * stride_kb
        + (pid_p % H) * stride_kh
        + toks[:, None].to(tl.int64) * stride_ks
        + cols[None, :] * stride_kd
    )
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    count = tl.minimum(S - pid_n * BLOCK_SIZE, BLOCK_SIZE).to(tl.float32)
    out = pid_p * stride_op + pid_n.to(tl.int64) * stride_on + cols.to(tl.int64) * stride_od
    tl.store(mean_ptr + out, tl.sum(x, axis=0) / count, mask=col_ok)
    if MINMAX:
        # Padding must not win the reduction: +inf for min, -inf for max. tl.min / tl.max skip
        # NaNs while torch's amin / amax (the reference) return NaN: restore it per channel.
        has_nan = tl.max((x != x).to(tl.int32), axis=0) > 0
        kmin = tl.min(tl.where(mask, x, float("inf")), axis=0)
        kmax = tl.max(tl.where(mask, x, float("-inf")), axis=0)
        tl.store(min_ptr + out, tl.where(has_nan, float("nan"), kmin), mask=col_ok)
        tl.store(max_ptr + out, tl.where(has_nan, float("nan"), kmax), mask=col_ok)


# Batch-dependent ints/strides unspecialised: one compiled variant per engine, not per batch.
@triton.jit(do_not_specialize=[
    "Sq", "n_kv_blocks", "q_offset", "first_q_block", "K", "stride_qb", "stride_sp",
    "stride_ob", "stride_oh", "stride_or",
])
def _select_blocks_kernel(
    q_ptr,
    mean_ptr,
    min_ptr,
    max_ptr,
    out_ptr,
    H_SEL,
    Hkv,
    Sq,
    D,
    n_kv_blocks,
    q_offset,
    first_q_block,
    K,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_qd,
    stride_sp,
    stride_sn,
    stride_sd,
    stride_ob,
    stride_oh,
    stride_or,
    SELECTION: tl.constexpr,
    GROUP: tl.constexpr,
    QG: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TOK: tl.constexpr,
    N_POW2: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROW_CAUSAL: tl.constexpr,
    FORCE_SINK_RECENT: tl.constexpr,
):
    """Top-``K`` key blocks of one query-block row of one selection head.

    q ``[B, Hq, Sq, D]`` (fp16/bf16, any strides). Key summaries fp32 ``[B * Hkv, n_kv_blocks, D]``
    (``mean``; ``min``/``max`` for quest; unused for local), any strides (block index fastest
    gives coalesced loads). Output int32 ``[B, Hq, n_q_blocks, K]``: ascending block indices, -1
    padded.
    Grid: ``(n_q_blocks, B * H_SEL)``. A selection head covers ``QG`` consecutive query heads: 1 in
    prefill; the whole GQA group (``QG == GROUP``) in decode, where the score is the max over the
    group's query heads and the same row is written for each of them. ``N_POW2`` >= 2 is the next
    power of two of ``n_kv_blocks``; ``1 <= K <= n_kv_blocks``.
    """
    row = tl.program_id(0)
    pid = tl.program_id(1)
    b = (pid // H_SEL).to(tl.int64)
    s = pid % H_SEL
    head0 = s * QG  # first query head of this selection head
    kvh = head0 // GROUP
    a = first_q_block + row  # absolute query block: queries at positions [a*bs, (a+1)*bs)

    j = tl.arange(0, N_POW2)
    in_range = j < n_kv_blocks

    if SELECTION == "local":
        # The k most recent candidates: the score is the block index itself.
        score = j.to(tl.float32)
    else:
        # Query indices of this block (bottom-right aligned: query i sits at q_offset + i); the
        # first block of a chunk may be partial, every block holds at least one query.
        t0 = tl.maximum(a * BLOCK_SIZE - q_offset, 0)
        t1 = tl.minimum((a + 1) * BLOCK_SIZE - q_offset, Sq)
        t = t0 + tl.arange(0, TOK)
        t_ok = t < t1
        count = (t1 - t0).to(tl.float32)
        sum_base = (b * Hkv + kvh) * stride_sp + j[None, :].to(tl.int64) * stride_sn
        score = tl.full([N_POW2], float("-inf"), tl.float32)
        for g in range(QG):
            q_base = q_ptr + b * stride_qb + (head0 + g).to(tl.int64) * stride_qh
            acc = tl.zeros([N_POW2], tl.float32)
            # Chunks of the head dim keep the [BLOCK_D, N_POW2] tiles small for any number of
            # key blocks, so the whole score row stays in registers (no scratch buffer).
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                d_ok = d < D
                qt = tl.load(
                    q_base + t[:, None].to(tl.int64) * stride_qs + d[None, :] * stride_qd,
                    mask=t_ok[:, None] & d_ok[None, :],
                    other=0.0,
                ).to(tl.float32)
                qbar = tl.sum(qt, axis=0) / count  # fp32 mean query over the valid tokens
                # [BLOCK_D, N_POW2] tiles: with the block-contiguous summaries each channel is
                # one contiguous run of key blocks, so even BLOCK_D == 1 loads are coalesced.
                smask = d_ok[:, None] & in_range[None, :]
                soff = sum_base + d[:, None].to(tl.int64) * stride_sd
                kmean = tl.load(mean_ptr + soff, mask=smask, other=0.0)
                if SELECTION == "block_mean":
                    acc += tl.sum(qbar[:, None] * kmean, axis=0)
                else:  # quest: sum_d max(qbar_d * kmax_d, qbar_d * kmin_d)
                    kmin = tl.load(min_ptr + soff, mask=smask, other=0.0)
                    kmax = tl.load(max_ptr + soff, mask=smask, other=0.0)
                    # NaN-propagating maxima, as torch.maximum / amax in the reference: a NaN
                    # score (from inf/NaN inputs) must make the block a non-candidate.
                    hi_lo = tl.maximum(
                        qbar[:, None] * kmax,
                        qbar[:, None] * kmin,
                        propagate_nan=tl.PropagateNan.ALL,
                    )
                    acc += tl.sum(hi_lo, axis=0)
            score = tl.maximum(score, acc, propagate_nan=tl.PropagateNan.ALL)

    # Candidates; like the reference, a non-finite score (overflow, NaN) is never selected.
    valid = in_range & (tl.abs(score) < float("inf"))
    if ROW_CAUSAL:
        valid = valid & (j <= a)

    # Sort key, int64: high word = order-preserving int32 image of the fp32 score (negative floats
    # get their magnitude bits flipped), low word = N_POW2 - 1 - j so that equal scores prefer the
    # smaller block index; keys are then unique, so "key >= k-th largest key" picks exactly k.
    score = tl.where(score == 0.0, 0.0, score)  # -0.0 ties with +0.0, as in a float compare
    bits = score.to(tl.int32, bitcast=True)
    hi = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)
    if FORCE_SINK_RECENT:
        # Above every finite score: the diagonal (most recent) block first, then the sink block 0.
        if ROW_CAUSAL:
            diag = a
        else:
            diag = n_kv_blocks - 1
        hi = tl.where(valid & (j == 0), 2147483646, hi)
        hi = tl.where(valid & (j == diag), 2147483647, hi)
    hi = tl.where(valid, hi, -2147483648)  # below the image of -inf
    key = (hi << 32) | (N_POW2 - 1 - j).to(tl.int64)

    srt = tl.sort(key, descending=True)
    kth = tl.sum(tl.where(j == K - 1, srt, 0), axis=0)
    chosen = valid & (key >= kth)
    # Ascending output: the slot of a chosen block is the number of chosen blocks before it.
    slot = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
    n_chosen = tl.sum(chosen.to(tl.int32), axis=0)
    pad = (j >= n_chosen) & (j < K)
    for g in range(QG):
        o = (
            out_ptr
            + b * stride_ob
            + (head0 + g).to(tl.int64) * stride_oh
            + row.to(tl.int64) * stride_or
        )
        tl.store(o + slot, j, mask=chosen)
        tl.store(o + j, tl.full([N_POW2], -1, tl.int32), mask=pad)
