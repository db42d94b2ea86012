"""Block selection (``thrift_vllm.selection``, ``thrift_vllm.select_blocks``) vs brute force.

``budget_to_k`` is checked against an exhaustive search over k in exact rational arithmetic;
``select_blocks`` against a per-row Python loop that recomputes every block statistic in float64
from the raw tokens. The scores are continuous, so the library (fp32) and the float64 loop can
only disagree on blocks whose scores are within fp32 noise of each other; the comparison accepts
a swap only in that case (``SCORE_TOL``) and is exact otherwise.
"""

from __future__ import annotations

import random
from fractions import Fraction
from functools import cache

import pytest
import torch

import thrift_vllm
from thrift_vllm.selection import BlockGrid, budget_to_k, select_blocks_reference

# Scores are dot products of fp32 block means over D <= 128 channels of O(1) values: fp32
# rounding is ~1e-6 absolute; two candidates closer than this may legitimately swap.
SCORE_TOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The float64 references here are loops of tiny tensor ops; intra-op threads only add
    synchronisation (10x slower on a busy 2-core machine). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------
# budget -> k
# ----------------------------------------------------------------------------------------------


def brute_candidate_counts(Sq: int, Skv: int, bs: int, causal: bool) -> list[int]:
    """Per query-block row (absolute block of each query position), the candidate count."""
    rows = sorted({(Skv - Sq + i) // bs for i in range(Sq)})
    n_kv = -(-Skv // bs)
    if causal and Sq > 1:
        return [sum(1 for j in range(n_kv) if j <= r) for r in rows]
    return [n_kv for _ in rows]


def brute_k(f: float, counts: list[int]) -> int:
    """argmin_k |sum_r min(k, c_r) - f * sum_r c_r| by exhaustive search, ties to the smaller k.
    The budget is a decimal like 0.1 whose binary value is a hair off, so "tie" means equal up to
    1e-12 relative (0.1 * 35 is the tie 3.5, not 3.5000000000000002)."""
    if f == 0:
        return 0
    c = torch.tensor(counts, dtype=torch.int64)
    ks = torch.arange(0, max(counts) + 1)
    totals = torch.minimum(ks[:, None], c[None, :]).sum(1).tolist()  # every k, every row
    total = sum(counts)
    target = f * total
    best_k, best_err = 0, abs(target)
    for kk, tot in enumerate(totals):
        err = abs(tot - target)
        if err < best_err - 1e-12 * total:  # strictly better beyond rounding noise
            best_k, best_err = kk, err
    return max(best_k, 1)


def test_brute_candidate_counts_match_grid():
    """The grid's (first, step, rows) description agrees with the per-position enumeration."""
    rng = random.Random(0)
    for _ in range(300):
        bs = rng.choice([32, 64, 128])
        Skv = rng.randint(1, 3000)
        Sq = rng.choice([1, rng.randint(1, Skv), Skv])
        causal = rng.random() < 0.5
        grid = BlockGrid(Sq, Skv, bs, causal)
        first, step, n = grid.candidate_counts()
        counts = brute_candidate_counts(Sq, Skv, bs, causal)
        assert n == len(counts) == grid.num_q_blocks
        assert [first + step * r for r in range(n)] == counts


def test_budget_to_k_brute_force_random():
    rng = random.Random(1)
    budgets = [0.0, 1.0, 0.05, 0.1, 0.25, 0.5, 0.125, 0.3, 0.999, 1e-9]
    for it in range(1500):
        bs = rng.choice([32, 64, 128])
        Skv = rng.randint(1, 40 * bs)
        Sq = rng.choice([1, 1, rng.randint(1, Skv), Skv, min(Skv, rng.randint(1, 3 * bs))])
        causal = rng.random() < 0.7
        f = budgets[it % len(budgets)] if it < 200 else rng.random()
        counts = brute_candidate_counts(Sq, Skv, bs, causal)
        k = budget_to_k(f, BlockGrid(Sq, Skv, bs, causal))
        assert k == brute_k(f, counts), (Sq, Skv, bs, causal, f, counts)


def test_budget_to_k_exact_ties_go_down():
    # One row of 4 candidates (decode): f * 4 = 1.5 sits between k=1 and k=2 -> 1; 2.5 -> 2.
    grid = BlockGrid(1, 4 * 64, 64, True)
    assert budget_to_k(0.375, grid) == 1
    assert budget_to_k(0.625, grid) == 2
    # Causal rows 1, 2, 3 (total 6): k=1 selects 3, k=2 selects 5; f = 4/6 is equidistant.
    grid = BlockGrid(3 * 64, 3 * 64, 64, True)
    assert budget_to_k(4 / 6, grid) == 1 == brute_k(4 / 6, [1, 2, 3])


@pytest.mark.parametrize(("f", "k"), [(0.05, 52), (0.10, 105), (0.25, 274)])
def test_budget_to_k_reference_values(f, k):
    """Full causal prefill over N = 2048 blocks: the reference's triangle rule."""
    n = 2048
    for bs in (32, 64, 128):
        assert budget_to_k(f, BlockGrid(n * bs, n * bs, bs, True)) == k
    assert brute_k(f, list(range(1, n + 1))) == k


@pytest.mark.parametrize("f", [0.05, 0.1, 0.25, 0.5, 0.9])
def test_budget_to_k_single_row_is_round(f):
    """Decode and one-row non-causal calls: k = round(f * N) (halves down), at least 1."""
    for n in (1, 2, 3, 7, 20, 100, 2048):
        t = Fraction(f) * n
        fl = t.numerator // t.denominator
        expected = max(1, fl + 1 if t - fl > Fraction(1, 2) else fl)
        assert budget_to_k(f, BlockGrid(1, n * 64, 64, True)) == expected
        assert budget_to_k(f, BlockGrid(1, n * 64, 64, False)) == expected
        assert budget_to_k(f, BlockGrid(40, n * 64, 64, False)) == expected  # every row N


def test_budget_to_k_extremes():
    for Sq, Skv, causal in [(1, 1, True), (200, 200, True), (63, 200, False), (1, 5000, True)]:
        grid = BlockGrid(Sq, Skv, 64, causal)
        kmax = max(brute_candidate_counts(Sq, Skv, 64, causal))
        assert budget_to_k(0.0, grid) == 0
        assert budget_to_k(1.0, grid) == kmax
        assert budget_to_k(1e-12, grid) == 1


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf")])
def test_budget_to_k_rejects(bad):
    with pytest.raises(ValueError, match="fp16_budget"):
        budget_to_k(bad, BlockGrid(64, 64, 64, True))


# ----------------------------------------------------------------------------------------------
# Scores and selection
# ----------------------------------------------------------------------------------------------


def make_brute_scores(q, k, bs, selection):
    """float64 scores of every key block for (batch b, query head h, absolute query-block row),
    recomputed from the raw tokens: the mean of the row's queries (only those present in this
    call) against the mean / min / max of each block's keys (the last block may be partial).
    Decode with GQA: max over the group's query heads."""
    q64, k64 = q.double(), k.double()
    Hq, Sq, Hkv, Skv = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    group = Hq // Hkv
    n_kv = -(-Skv // bs)
    decode = Sq == 1

    @cache
    def key_stats(b, hk, j):
        keys = k64[b, hk, j * bs : min((j + 1) * bs, Skv)]
        return keys.mean(0), keys.min(0).values, keys.max(0).values

    @cache
    def one_head(b, h, row):
        qi = [i for i in range(Sq) if (Skv - Sq + i) // bs == row]
        qbar = q64[b, h, qi].mean(0)
        sc = []
        for j in range(n_kv):
            kmean, kmin, kmax = key_stats(b, h // group, j)
            if selection == "block_mean":
                sc.append(float(qbar @ kmean))
            elif selection == "quest":
                sc.append(float(torch.maximum(qbar * kmax, qbar * kmin).sum()))
            else:
                sc.append(float(j))
        return sc

    def scores(b, h, row):
        heads = range((h // group) * group, (h // group + 1) * group) if decode else [h]
        per_head = [one_head(b, hh, row) for hh in heads]
        return [max(col) for col in zip(*per_head, strict=True)]

    return scores


def check_selection(q, k, sel, *, f, bs, causal, force, brute_scores):
    B, Hq, Sq, _ = q.shape
    Skv = k.shape[2]
    decode = Sq == 1
    rows = sorted({(Skv - Sq + i) // bs for i in range(Sq)})
    n_kv = -(-Skv // bs)
    counts = brute_candidate_counts(Sq, Skv, bs, causal)
    kk = brute_k(f, counts)
    assert sel.dtype == torch.int32
    assert tuple(sel.shape) == (B, Hq, len(rows), kk)
    for b in range(B):
        for h in range(Hq):
            for ri, r in enumerate(rows):
                cand = [j for j in range(n_kv) if not (causal and not decode) or j <= r]
                got = sel[b, h, ri].tolist()
                n_sel = min(kk, len(cand))
                assert got[n_sel:] == [-1] * (kk - n_sel), (b, h, r, got)
                chosen = got[:n_sel]
                assert chosen == sorted(set(chosen)), (b, h, r, got)  # ascending, distinct
                assert set(chosen) <= set(cand), (b, h, r, got, cand)
                if n_sel == len(cand):
                    continue
                sc = brute_scores(b, h, r)
                forced = []
                if force:
                    diag = r if (causal and not decode) else n_kv - 1
                    forced = [diag] + ([0] if diag != 0 else [])
                    forced = forced[:n_sel]
                    assert set(forced) <= set(chosen), (b, h, r, got, forced)
                rest_chosen = [j for j in chosen if j not in forced]
                rest_left = [j for j in cand if j not in chosen and j not in forced]
                if rest_chosen and rest_left:
                    lo = min(sc[j] for j in rest_chosen)
                    hi = max(sc[j] for j in rest_left)
                    assert lo >= hi - SCORE_TOL, (b, h, r, chosen, sc)
                # Exact agreement unless the k-th and (k+1)-th scores are within fp32 noise.
                order = sorted((j for j in cand if j not in forced), key=lambda j: -sc[j])
                want = sorted(forced + order[: n_sel - len(forced)])
                m = n_sel - len(forced)
                if 0 < m < len(order) and sc[order[m - 1]] - sc[order[m]] > SCORE_TOL:
                    assert chosen == want, (b, h, r, chosen, want)


CASES = [
    # (B, Hq, Hkv, Sq, Skv, D, bs, causal)
    (1, 1, 1, 1, 1, 64, 64, True),
    (1, 4, 1, 1, 200, 64, 32, True),  # decode, GQA 4:1
    (2, 8, 1, 1, 65, 128, 32, False),  # decode non-causal, GQA 8:1
    (1, 4, 1, 63, 63, 64, 32, True),
    (1, 8, 1, 65, 200, 128, 32, True),  # chunk: first query block partial
    (2, 4, 1, 200, 200, 64, 32, True),
    (1, 2, 2, 17, 65, 64, 64, False),
    (1, 4, 2, 130, 200, 64, 32, False),
    (1, 8, 2, 100, 1000, 64, 64, True),
    (1, 2, 1, 1, 1000, 128, 128, True),
]


@pytest.mark.parametrize("selection", ["block_mean", "quest", "local"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("force", [False, True])
def test_select_blocks_brute_force(selection, case, force):
    B, Hq, Hkv, Sq, Skv, D, bs, causal = case
    gen = torch.Generator().manual_seed(Sq * 131 + Skv + Hq)
    dtype = torch.bfloat16 if (Sq + Skv) % 2 else torch.float16
    q = torch.randn(B, Hq, Sq, D, generator=gen).to(dtype)
    # Per-block offsets so that block statistics differ by more than the noise.
    offs = torch.randn(B, Hkv, -(-Skv // bs), D, generator=gen).repeat_interleave(bs, dim=2)
    k = (torch.randn(B, Hkv, Skv, D, generator=gen) + 0.5 * offs[:, :, :Skv]).to(dtype)
    brute_scores = make_brute_scores(q, k, bs, selection)
    for f in (0.1, 0.3, 0.6):
        sel = thrift_vllm.select_blocks(q, k, fp16_budget=f, selection=selection, block_size=bs,
                                        causal=causal, force_sink_recent=force, impl="torch")
        ref = select_blocks_reference(q, k, fp16_budget=f, selection=selection, block_size=bs,
                                      causal=causal, force_sink_recent=force)
        assert torch.equal(sel, ref)
        check_selection(q, k, sel, f=f, bs=bs, causal=causal, force=force,
                        brute_scores=brute_scores)


@pytest.mark.parametrize("causal", [True, False])
def test_select_blocks_budget_extremes(causal):
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 4, 65, 64, generator=gen).half()
    k = torch.randn(1, 1, 200, 64, generator=gen).half()
    sel0 = thrift_vllm.select_blocks(q, k, fp16_budget=0.0, block_size=32, causal=causal,
                                     impl="torch")
    grid = BlockGrid(65, 200, 32, causal)
    assert sel0.shape == (1, 4, grid.num_q_blocks, 0) and sel0.dtype == torch.int32
    sel1 = thrift_vllm.select_blocks(q, k, fp16_budget=1.0, block_size=32, causal=causal,
                                     impl="torch")
    rows = sorted({(200 - 65 + i) // 32 for i in range(65)})
    for ri, r in enumerate(rows):
        n = r + 1 if causal else 7
        expect = list(range(n)) + [-1] * (sel1.shape[-1] - n)
        assert (sel1[0, :, ri] == torch.tensor(expect, dtype=torch.int32)).all()


def test_local_selects_most_recent():
    q = torch.randn(1, 2, 200, 64).half()
    k = torch.randn(1, 1, 200, 64).half()
    sel = thrift_vllm.select_blocks(q, k, fp16_budget=0.5, selection="local", block_size=32,
                                    impl="torch")
    kk = sel.shape[-1]
    for r in range(7):
        n = min(kk, r + 1)
        expect = list(range(r + 1 - n, r + 1)) + [-1] * (kk - n)
        assert sel[0, 0, r].tolist() == expect


def test_force_sink_recent_with_low_scores():
    """The diagonal and block 0 are forced in even when their scores are the lowest."""
    D, bs, S = 64, 32, 512
    q = torch.zeros(1, 1, S, D)
    q[..., 0] = 4.0
    k = torch.zeros(1, 1, S, D)
    for j in range(S // bs):
        k[:, :, j * bs : (j + 1) * bs, 0] = -0.1 * j  # older blocks score higher ...
    k[:, :, :bs, 0] = -5.0  # ... except block 0, the lowest
    q, k = q.half(), k.half()
    # 16 causal rows (1..16 candidates, 136 in all): f = 0.4 -> target 54.4 -> k = 4 (58).
    assert budget_to_k(0.4, BlockGrid(S, S, bs, True)) == 4
    plain = thrift_vllm.select_blocks(q, k, fp16_budget=0.4, block_size=bs, impl="torch")
    forced = thrift_vllm.select_blocks(q, k, fp16_budget=0.4, block_size=bs,
                                       force_sink_recent=True, impl="torch")
    for r in range(4, S // bs):
        assert plain[0, 0, r].tolist() == [1, 2, 3, 4]
        assert forced[0, 0, r].tolist() == [0, 1, 2, r]
    assert forced[0, 0, 2].tolist() == [0, 1, 2, -1]
    assert forced[0, 0, 0].tolist() == [0, -1, -1, -1]
    # k = 1: only the diagonal is forced.
    sel = thrift_vllm.select_blocks(q, k, fp16_budget=1e-6, block_size=bs,
                                    force_sink_recent=True, impl="torch")
    assert sel.shape[-1] == 1
    assert sel[0, 0, :, 0].tolist() == list(range(S // bs))


def test_decode_group_shares_row():
    """Decode (Sq == 1): every query head of a KV group gets the same row."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 8, 1, 64, generator=gen).bfloat16()
    k = torch.randn(1, 2, 300, 64, generator=gen).bfloat16()
    for selection in ("block_mean", "quest"):
        sel = thrift_vllm.select_blocks(q, k, fp16_budget=0.3, selection=selection,
                                        block_size=32, impl="torch")
        for h in range(8):
            assert torch.equal(sel[0, h], sel[0, 4 * (h // 4)])


@pytest.mark.parametrize("selection", ["block_mean", "quest"])
def test_chunked_prefill_matches_full_prefill(selection):
    """A block-aligned chunk of queries picks, for its query blocks, what the full prefill picks
    for those blocks (same scores; budgets chosen so that both calls get the same k)."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 320, 64, generator=gen).half()
    k = torch.randn(1, 1, 320, 64, generator=gen).half()
    kk = budget_to_k(0.3, BlockGrid(320, 320, 32, True))
    f_chunk = next(i / 1000 for i in range(1, 1001)
                   if budget_to_k(i / 1000, BlockGrid(128, 320, 32, True)) == kk)
    full = thrift_vllm.select_blocks(q, k, fp16_budget=0.3, selection=selection, block_size=32,
                                     impl="torch")
    chunk = thrift_vllm.select_blocks(q[:, :, 192:], k, fp16_budget=f_chunk, selection=selection,
                                      block_size=32, impl="torch")
    assert chunk.shape[-1] == full.shape[-1] == kk
    assert torch.equal(chunk, full[:, :, 6:])
