"""Triton block selection (``select_blocks_triton``) against the PyTorch reference, exactly.

Kernels run under TRITON_INTERPRET=1 on CPU (set by conftest), where every program costs tens of
milliseconds (mostly the interpreted ``tl.sort``), so the brief's axes are covered by rotation
rather than by the full cross product: every (Skv, Sq kind, causal, selection) case runs once,
and (budget, force_sink_recent), heads, head dim and dtype rotate so that every (budget, force)
combo meets every (selection, Sq kind) and every (selection, causal) pair.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from thrift_vllm.ops.select import key_block_summaries, select_blocks_triton
from thrift_vllm.selection import BlockGrid, budget_to_k, select_blocks_reference

SKVS = (1, 63, 65, 200, 1000)
SQ_KINDS = ("full", "chunk", "decode")
SELECTIONS = ("block_mean", "quest", "local")
BUDGETS = (0.05, 0.3, 1.0)
HEADS = ((4, 1), (8, 1), (4, 4), (8, 2))
HEAD_DIMS = (64, 128)
DTYPES = (torch.float16, torch.bfloat16)

CASES = list(itertools.product(SKVS, SQ_KINDS, (True, False), SELECTIONS))
# CUDA when there is one (compiled kernels), else CPU under the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _sq(skv: int, kind: str) -> int:
    return {"full": skv, "chunk": skv // 3 + 1, "decode": 1}[kind]


def _rand_qk(B, Hq, Hkv, Sq, Skv, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=g).to(DEVICE, dtype)
    k = torch.randn(B, Hkv, Skv, D, generator=g).to(DEVICE, dtype)
    return q, k


def _check(q, k, **kw):
    got = select_blocks_triton(q, k, **kw)
    ref = select_blocks_reference(q, k, **kw)
    assert got.dtype == torch.int32 and got.shape == ref.shape, (got.shape, ref.shape)
    assert torch.equal(got, ref), f"{kw}\ngot\n{got}\nref\n{ref}"
    return got


@pytest.mark.parametrize(("skv", "sq_kind", "causal", "selection"), CASES)
def test_matches_reference(skv, sq_kind, causal, selection):
    si, qi = SKVS.index(skv), SQ_KINDS.index(sq_kind)
    ci, li = int(not causal), SELECTIONS.index(selection)
    combo = (2 * si + ci + qi) % 6  # all six for each (selection, Sq kind) and (selection, causal)
    budget, force = BUDGETS[combo % 3], combo >= 3
    hq, hkv = HEADS[(si + qi + li) % 4]
    if skv == 1000 and sq_kind == "full":
        hq, hkv = HEADS[2 * ((ci + li) % 2)]  # 16 query-block rows: 4 heads, (4, 1) or (4, 4)
    d = HEAD_DIMS[(si + ci + li) % 2]
    dtype = DTYPES[(qi + ci + li) % 2]
    q, k = _rand_qk(
        1,
        hq,
        hkv,
        _sq(skv, sq_kind),
        skv,
        d,
        dtype,
        seed=CASES.index((skv, sq_kind, causal, selection)),
    )
    _check(
        q,
        k,
        fp16_budget=budget,
        selection=selection,
        block_size=64,
        causal=causal,
        force_sink_recent=force,
    )


@pytest.mark.parametrize(
    ("block_size", "skv", "sq", "selection", "causal", "force", "budget"),
    [
        (32, 200, 200, "block_mean", True, True, 0.3),
        (32, 200, 71, "quest", False, False, 0.05),
        (32, 200, 1, "local", True, False, 0.3),
        (128, 1000, 334, "quest", True, True, 0.05),
        (128, 1000, 1, "block_mean", False, True, 0.3),
        (128, 129, 129, "local", True, False, 1.0),
    ],
)
def test_other_block_sizes(block_size, skv, sq, selection, causal, force, budget):
    q, k = _rand_qk(1, 4, 2, sq, skv, 64, torch.bfloat16, seed=block_size + skv + sq)
    _check(
        q,
        k,
        fp16_budget=budget,
        selection=selection,
        block_size=block_size,
        causal=causal,
        force_sink_recent=force,
    )


def test_batch_and_strided_inputs():
    """B > 1 and q/k as [B, S, H, D] storage seen through a permute (no copy)."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 130, 4, 64, generator=g).to(DEVICE, torch.half).permute(0, 2, 1, 3)
    k = torch.randn(2, 200, 2, 64, generator=g).to(DEVICE, torch.half).permute(0, 2, 1, 3)
    for selection in SELECTIONS:
        _check(
            q,
            k,
            fp16_budget=0.3,
            selection=selection,
            block_size=64,
            causal=True,
            force_sink_recent=True,
        )
    qd = q[:, :, -1:]  # decode on strided data, GQA group of 2
    _check(qd, k, fp16_budget=0.3, selection="quest", block_size=64, causal=True)


def test_decode_gqa_rows_shared():
    """Decode: one selection per KV head, written for every query head of its group."""
    q, k = _rand_qk(1, 8, 2, 1, 1000, 64, torch.float16, seed=3)
    got = _check(q, k, fp16_budget=0.3, selection="block_mean", block_size=64, causal=True)
    assert torch.equal(got[:, :4], got[:, :1].expand(-1, 4, -1, -1))
    assert torch.equal(got[:, 4:], got[:, 4:5].expand(-1, 4, -1, -1))


def test_zero_budget_is_empty():
    q, k = _rand_qk(1, 4, 1, 100, 300, 64, torch.float16, seed=0)
    got = select_blocks_triton(q, k, fp16_budget=0.0, selection="quest", block_size=64, causal=True)
    assert got.shape == (1, 4, 2, 0) and got.dtype == torch.int32


def test_ties_prefer_smaller_block():
    """All scores equal (q = 0): the kernel's rule takes the smallest block indices, after the
    forced diagonal and sink blocks. (torch.topk on CPU breaks such ties arbitrarily, so this is
    checked against the rule, not the reference.)"""
    q = torch.zeros(1, 2, 1, 64, dtype=torch.float16, device=DEVICE)
    k = torch.randn(1, 1, 1000, 64).to(DEVICE, torch.half)
    kw = dict(selection="block_mean", block_size=64, causal=True)
    kk = budget_to_k(0.3, BlockGrid(1, 1000, 64, True))
    got = select_blocks_triton(q, k, fp16_budget=0.3, **kw)
    assert got[0, :, 0].tolist() == [list(range(kk))] * 2
    got = select_blocks_triton(q, k, fp16_budget=0.3, force_sink_recent=True, **kw)
    assert got[0, :, 0].tolist() == [[*range(kk - 1), 15]] * 2


@pytest.mark.parametrize(("skv", "block_size", "d"), [(1, 64, 64), (200, 64, 128), (1000, 128, 64)])
def test_block_summaries(skv, block_size, d):
    k = torch.randn(2, 3, skv, d).to(DEVICE, torch.bfloat16)
    mean, kmin, kmax = key_block_summaries(k, block_size)
    assert mean.shape == kmin.shape == kmax.shape == (6, -(-skv // block_size), d)
    n = mean.shape[1]
    k64 = k.double().reshape(6, skv, d)
    for j in range(n):
        blk = k64[:, j * block_size : (j + 1) * block_size]
        torch.testing.assert_close(mean[:, j].double(), blk.mean(1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(kmin[:, j].double(), blk.amin(1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(kmax[:, j].double(), blk.amax(1), atol=1e-5, rtol=1e-5)
    only_mean, no_min, no_max = key_block_summaries(k, block_size, minmax=False)
    assert no_min is None and no_max is None and torch.equal(only_mean, mean)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="long rows need the compiled kernel")
@pytest.mark.parametrize(
    ("skv", "sq", "hq", "hkv", "selection", "causal", "force", "budget"),
    [
        (131072 + 17, 1, 8, 1, "block_mean", True, True, 0.05),  # 2049 key blocks
        (131072, 1, 8, 2, "quest", True, False, 0.1),
        (32768, 32768, 2, 1, "block_mean", True, True, 0.05),  # 512 rows of 1..512 candidates
        (65536, 4097, 2, 2, "quest", False, False, 0.25),
        (131072, 131072, 1, 1, "local", True, True, 0.05),
    ],
)
def test_long_rows_gpu(skv, sq, hq, hkv, selection, causal, force, budget):
    q, k = _rand_qk(1, hq, hkv, sq, skv, 128, torch.bfloat16, seed=skv + sq)
    _check(
        q,
        k,
        fp16_budget=budget,
        selection=selection,
        block_size=64,
        causal=causal,
        force_sink_recent=force,
    )


def test_non_finite_scores_are_not_candidates():
    """inf / NaN keys or queries: like the reference, a block whose score is not finite is never
    picked (NaN-propagating min / max / group max, as torch's)."""
    q, k = _rand_qk(1, 4, 1, 130, 300, 64, torch.float16, seed=11)
    k[0, 0, 70, 3] = float("inf")  # block 1: quest score +inf for heads with qbar_3 > 0
    k[0, 0, 150, 5] = float("nan")  # block 2: NaN summaries
    kw = dict(fp16_budget=0.5, block_size=64, causal=True)
    _check(q, k, selection="quest", **kw)
    _check(q, k, selection="block_mean", force_sink_recent=True, **kw)
    qd = q[:, :, -1:].clone()
    qd[0, 1, 0, 3] = float("nan")  # one head of the decode group: the group max is NaN
    _check(qd, k, selection="quest", **kw)


def test_precomputed_summaries_give_the_same_selection():
    from thrift_vllm.ops.select import key_block_summaries

    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 8, 1, 64, generator=g).half()
    k = torch.randn(2, 2, 300, 64, generator=g).half()
    for selection in ("block_mean", "quest"):
        fresh = select_blocks_triton(q, k, fp16_budget=0.2, selection=selection, block_size=64,
                                     causal=True)
        kept = select_blocks_triton(q, k, fp16_budget=0.2, selection=selection, block_size=64,
                                    causal=True, summaries=key_block_summaries(k, 64))
        assert torch.equal(fresh, kept)
    with pytest.raises(ValueError, match="summaries have shape"):
        select_blocks_triton(q, k, fp16_budget=0.2, selection="block_mean", block_size=64,
                             causal=True, summaries=key_block_summaries(k[:, :, :100], 64))


def test_rows_longer_than_the_sort_limit_are_refused():
    from thrift_vllm.ops.select import MAX_KV_BLOCKS

    q = torch.zeros(1, 1, 1, 64, dtype=torch.float16, device="meta")
    k = torch.zeros(1, 1, 64 * MAX_KV_BLOCKS + 1, 64, dtype=torch.float16, device="meta")
    with pytest.raises(ValueError, match="key blocks"):
        select_blocks_triton(q, k, fp16_budget=0.05, selection="block_mean", block_size=64,
                             causal=True)
