"""Decode block selection straight from the summaries stored in the paged cache.

Same rule as ``kernels/select.py``'s decode case (one query token, one list per KV head, score =
max over the group's query heads, ties to the smaller unit, non-finite scores never selected,
``force_sink_recent``), but the key summaries are read from the pages through the block table
and ``k`` comes per sequence from a device tensor (no host synchronisation; fixed grids).

Two kernels, because the two halves want different shapes of parallelism:
* ``_paged_score_kernel``, grid (B * Hkv, unit chunks): reads [BLOCK_N, D] summary tiles along
  head_dim (coalesced; each unit's row of D fp32 is contiguous in its page) once for all the
  group's query heads, and writes one fp32 score per unit.
* ``_paged_topk_kernel``, grid (B * Hkv,): the k-th largest score by bisection on its
  order-preserving 32-bit image (32 counting passes), then one cumsum to break ties towards the
  smaller unit — the same set a full sort would give, for ~30x fewer operations at 2048 units.
"""

import triton
import triton.language as tl


@triton.jit
def _paged_score_kernel(
    Q, Cache, BT, SeqLens, Scores,
    stride_qb, stride_qh, stride_btb, stride_cb, stride_ch, stride_sb, stride_sh,
    Hkv: tl.constexpr, GROUP: tl.constexpr, U: tl.constexpr, NU: tl.constexpr, D: tl.constexpr,
    SELECTION: tl.constexpr, BLOCK_N: tl.constexpr, OFF_SUM: tl.constexpr,
    OFF_MAX: tl.constexpr,
):
    """Q [B, Hq, D] fp16/bf16; Cache uint8 base of [nb, Hkv, P, C] (byte strides); BT int32
    [B, max_pages]; SeqLens int32 [B]. Scores fp32 [B, Hkv, >= units]: per unit of the sequence,
    the max over the group's query heads of q . mean (block_mean) or sum(max(q*min, q*max))
    (quest); summaries fp32 [NU, D] per page at byte offsets OFF_SUM (mean or min) and OFF_MAX.
    Units past the sequence's end are not written. Grid (B * Hkv, cdiv(units, BLOCK_N))."""
    pid = tl.program_id(0)
    b = (pid // Hkv).to(tl.int64)
    kvh = pid % Hkv
    n = (tl.load(SeqLens + b) + U - 1) // U
    j0 = tl.program_id(1) * BLOCK_N
    if j0 < n:
        j = j0 + tl.arange(0, BLOCK_N)
        ok = j < n
        d = tl.arange(0, D)
        blk = tl.load(BT + b * stride_btb + j // NU, mask=ok, other=0).to(tl.int64)
        row = Cache + blk * stride_cb + kvh * stride_ch + (j % NU) * (D * 4)  # [BLOCK_N]
        off = row[:, None] + d[None, :] * 4
        lo = tl.load((off + OFF_SUM).to(tl.pointer_type(tl.float32)), mask=ok[:, None],
                     other=0.0)
        if SELECTION == "quest":
            hi = tl.load((off + OFF_MAX).to(tl.pointer_type(tl.float32)), mask=ok[:, None],
                         other=0.0)
        score = tl.full([BLOCK_N], float("-inf"), tl.float32)
        for g in tl.static_range(GROUP):
            qd = tl.load(Q + b * stride_qb + (kvh * GROUP + g) * stride_qh + d).to(tl.float32)
            if SELECTION == "block_mean":
                s = tl.sum(lo * qd[None, :], axis=1)
            else:  # quest; lo holds the minima
                s = tl.sum(tl.maximum(qd[None, :] * hi, qd[None, :] * lo,
                                      propagate_nan=tl.PropagateNan.ALL), axis=1)
            score = tl.maximum(score, s, propagate_nan=tl.PropagateNan.ALL)
        tl.store(Scores + b * stride_sb + kvh * stride_sh + j, score, mask=ok)


# Batch-dependent ints/strides unspecialised: one compiled variant per engine, not per batch.
@triton.jit(do_not_specialize=["K_OUT", "stride_ob", "stride_oh"])
def _paged_topk_kernel(
    Scores, SeqLens, NumK, Out, stride_sb, stride_sh, stride_ob, stride_oh, K_OUT,
    Hkv: tl.constexpr, U: tl.constexpr, SELECTION: tl.constexpr, N_POW2: tl.constexpr,
    FORCE_SINK_RECENT: tl.constexpr,
):
    """Scores fp32 [B, Hkv, >= units] (``_paged_score_kernel``; unread for ``local``);
    SeqLens, NumK int32 [B]. Out int32 [B, Hkv, K_OUT]: the sequence's ``min(NumK[b], units)``
    best units ascending, then -1 up to K_OUT. N_POW2 >= 2, a power of two >= every sequence's
    unit count. Grid (B * Hkv,)."""
    pid = tl.program_id(0)
    b = (pid // Hkv).to(tl.int64)
    kvh = pid % Hkv
    n = (tl.load(SeqLens + b) + U - 1) // U
    K = tl.minimum(tl.load(NumK + b), n)
    j = tl.arange(0, N_POW2)
    in_range = j < n
    if SELECTION == "local":
        score = j.to(tl.float32)
    else:
        score = tl.load(Scores + b * stride_sb + kvh * stride_sh + j, mask=in_range,
                        other=float("-inf"))
    valid = in_range & (tl.abs(score) < float("inf"))
    # Order-preserving unsigned image of the score (-0 == +0), shifted so invalid units are 0
    # and every valid one is >= 1 (the most negative finite float maps far above 0).
    score = tl.where(score == 0.0, 0.0, score)
    bits = score.to(tl.int32, bitcast=True)
    hi = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    if FORCE_SINK_RECENT:
        hi = tl.where(valid & (j == 0), 2147483646, hi)
        hi = tl.where(valid & (j == n - 1), 2147483647, hi)
    u = tl.where(valid, hi.to(tl.int64) + 2147483648, 0)
    # t = the K-th largest u: the largest t with count(u >= t) >= K, built bit by bit.
    t = (n * 0).to(tl.int64)
    for i in range(32):
        cand = t | (tl.full([], 1, tl.int64) << (31 - i))
        t = tl.where(tl.sum((u >= cand).to(tl.int32), axis=0) >= K, cand, t)
    above = valid & (u > t)
    tie = valid & (u == t)
    need = K - tl.sum(above.to(tl.int32), axis=0)
    chosen = above | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= need))
    chosen = chosen & ((j * 0 + K) > 0)  # K = 0 chooses nothing
    slot = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
    n_chosen = tl.sum(chosen.to(tl.int32), axis=0)
    o = Out + b * stride_ob + kvh * stride_oh
    tl.store(o + slot, j, mask=chosen)
    tl.store(o + j, tl.full([N_POW2], -1, tl.int32), mask=(j >= n_chosen) & (j < K_OUT))
