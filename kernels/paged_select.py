"""Decode block selection straight from the summaries stored in the paged cache.

Same rule as ``kernels/select.py``'s decode case (one query token, one list per KV head, score =
max over the group's query heads, ties to the smaller unit, non-finite scores never selected,
``force_sink_recent``), but the key summaries are read from the pages through the block table
and ``k`` comes per sequence from a device tensor (no host synchronisation; fixed grid).
"""

import triton
import triton.language as tl


@triton.jit
def _paged_select_kernel(
    Q, Cache, BT, SeqLens, NumK, Out,
    stride_qb, stride_qh, stride_btb, stride_cb, stride_ch, stride_ob, stride_oh, K_OUT,
    Hkv: tl.constexpr, GROUP: tl.constexpr, U: tl.constexpr, NU: tl.constexpr, D: tl.constexpr,
    SELECTION: tl.constexpr, N_POW2: tl.constexpr, BLOCK_D: tl.constexpr,
    FORCE_SINK_RECENT: tl.constexpr, OFF_SUM: tl.constexpr, OFF_MAX: tl.constexpr,
):
    """Q [B, Hq, D] fp16/bf16 (the decode token); Cache uint8 base of [nb, Hkv, P, C] (byte
    strides); BT int32 [B, max_pages]; SeqLens, NumK int32 [B]. Out int32 [B, Hkv, K_OUT]: the
    sequence's ``min(NumK[b], n_units)`` selected units ascending, then -1 up to K_OUT.
    Summaries fp32 [NU, D] per page at byte offset OFF_SUM (mean, or min) and OFF_MAX (max).
    N_POW2 >= 2, a power of two >= every sequence's unit count. Grid (B * Hkv,)."""
    pid = tl.program_id(0)
    b = (pid // Hkv).to(tl.int64)
    kvh = pid % Hkv
    seq_len = tl.load(SeqLens + b)
    n = (seq_len + U - 1) // U
    K = tl.minimum(tl.load(NumK + b), n)
    j = tl.arange(0, N_POW2)
    in_range = j < n

    if SELECTION == "local":
        score = j.to(tl.float32)
    else:
        blk = tl.load(BT + b * stride_btb + j // NU, mask=in_range, other=0).to(tl.int64)
        sbase = Cache + blk * stride_cb + kvh * stride_ch + (j % NU) * (D * 4)  # [N_POW2]
        score = tl.full([N_POW2], float("-inf"), tl.float32)
        for g in range(GROUP):
            q_row = Q + b * stride_qb + (kvh * GROUP + g) * stride_qh
            acc = tl.zeros([N_POW2], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                qd = tl.load(q_row + d).to(tl.float32)
                soff = d[:, None] * 4 + sbase[None, :]
                smask = in_range[None, :]
                kmean = tl.load((soff + OFF_SUM).to(tl.pointer_type(tl.float32)), mask=smask,
                                other=0.0)
                if SELECTION == "block_mean":
                    acc += tl.sum(qd[:, None] * kmean, axis=0)
                else:  # quest; kmean holds the minima here
                    kmax = tl.load((soff + OFF_MAX).to(tl.pointer_type(tl.float32)),
                                   mask=smask, other=0.0)
                    acc += tl.sum(tl.maximum(qd[:, None] * kmax, qd[:, None] * kmean,
                                             propagate_nan=tl.PropagateNan.ALL), axis=0)
            score = tl.maximum(score, acc, propagate_nan=tl.PropagateNan.ALL)

    valid = in_range & (tl.abs(score) < float("inf"))
    # Unique int64 sort keys: order-preserving image of the score, then the smaller index.
    score = tl.where(score == 0.0, 0.0, score)
    bits = score.to(tl.int32, bitcast=True)
    hi = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)
    if FORCE_SINK_RECENT:
        hi = tl.where(valid & (j == 0), 2147483646, hi)
        hi = tl.where(valid & (j == n - 1), 2147483647, hi)
    hi = tl.where(valid, hi, -2147483648)
    key = (hi << 32) | (N_POW2 - 1 - j).to(tl.int64)
    srt = tl.sort(key, descending=True)
    kth = tl.sum(tl.where(j == K - 1, srt, 0), axis=0)
    kth = tl.where(K > 0, kth, 9223372036854775807)  # above every key: K = 0 chooses nothing
    chosen = valid & (key >= kth)
    slot = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
    n_chosen = tl.sum(chosen.to(tl.int32), axis=0)
    o = Out + b * stride_ob + kvh * stride_oh
    tl.store(o + slot, j, mask=chosen)
    tl.store(o + j, tl.full([N_POW2], -1, tl.int32), mask=(j >= n_chosen) & (j < K_OUT))
