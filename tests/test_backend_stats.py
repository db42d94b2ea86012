"""Engine-side block counters (thrift_vllm.backend.stats): arithmetic against brute force."""

from __future__ import annotations

import random

import pytest

from thrift_vllm.backend import stats
from thrift_vllm.selection import BlockGrid, budget_to_k


def _brute(grid: BlockGrid, k: int) -> tuple[int, int]:
    f = a = 0
    for r in range(grid.num_q_blocks):
        row = grid.first_q_block + r
        cand = min(row + 1, grid.num_kv_blocks) if grid.row_causal else grid.num_kv_blocks
        f += min(k, cand)
        a += cand
    return f, a


@pytest.mark.parametrize("seed", range(3))
def test_step_blocks_matches_brute_force(seed):
    rng = random.Random(seed)
    for _ in range(200):
        skv = rng.choice([1, 63, 64, 65, 200, 1000, rng.randint(1, 5000)])
        sq = rng.choice([1, skv, rng.randint(1, skv)])
        grid = BlockGrid(sq, skv, rng.choice([32, 64, 128]), True)
        k = budget_to_k(rng.choice([0.0, 0.01, 0.05, 0.3, 1.0]), grid)
        assert stats.step_blocks(grid, k) == _brute(grid, k), (grid, k)


def test_record_step_totals_and_buckets():
    before = stats.totals()
    g_prefill = BlockGrid(200, 200, 64, True)  # 4 rows: 1+2+3+4 = 10 candidates
    g_decode = BlockGrid(1, 130, 64, True)  # 1 row of 3 candidates
    stats.record_step([g_prefill, None, g_decode], [1, 0, 3], [0.05, 0.0, 1.0])
    after = stats.totals()
    assert after["all"] - before["all"] == 13
    assert after["fp16"] - before["fp16"] == 4 + 3
    assert stats.bucket(0.0) == "0.0" and stats.bucket(0.03) == "0.05"
    assert stats.bucket(1.0) == "1.0"
    with pytest.raises(ValueError):
        stats.record_step([g_decode], [1, 2], [0.1])  # lengths must match
