"""Which query-key blocks get FP16: the policy (plain Python) and the reference scorer (PyTorch).

Blocks. Keys are cut into ``block_size`` blocks from key 0. Queries are cut by *absolute position*
(query ``i`` of ``Sq`` sits at position ``Skv - Sq + i``, the bottom-right aligned causal
convention), so query block ``r`` holds positions ``[r * bs, (r + 1) * bs)``. The first query
block of a chunk may be partial. A chunked prefill reproduces the full prefill's selection for
its queries only when the chunk is block-aligned (starts and ends on block boundaries, so its
block-mean queries are the same) and the budget gives the same ``k`` on both grids (``k``
depends on the candidate counts of the call). A decode step in general does not: it scores its
one query, not the mean query of its block, and selects per KV head (below).

Candidates. Causal: key blocks ``j <= r`` (the diagonal block is a candidate). Non-causal and
decode (Sq == 1): every key block.

Budget -> k. One ``k`` per call: the number of blocks per query-block row such that
``sum_r min(k, c_r)`` is closest to ``fp16_budget * sum_r c_r`` (``c_r`` = candidate count of row
``r``), ties to the smaller ``k``; clamped to ``>= 1`` when the budget is positive, and 0 when it
is 0. For a full causal prefill this is the reference's triangle rule (N = 2048 blocks -> k = 52,
105, 274 at 5, 10, 25 %); for one row (decode, non-causal) it is ``round(f * N)``. Budget 1
selects every candidate.

Scores. ``block_mean``: mean query of the block (fp32) dot mean key of each key block.
``quest``: sum_d max(qbar_d * kmax_d, qbar_d * kmin_d) over per-channel key min/max.
``local``: the ``k`` most recent candidates. GQA: prefill selects per query head; decode
(Sq == 1) selects per KV head with score = max over the group's query heads (the reference's
rule), and every query head of the group gets that row. ``force_sink_recent`` gives the diagonal
(most recent) block, then block 0, the first slots of the budget. Only causal prefill rows have
a diagonal block of their own (key block ``r`` for query block ``r``); for non-causal prefill
it forces the *last* key block for every row, not the row's diagonal (for decode the last key
block is the query's own block).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SELECTIONS = ("block_mean", "quest", "local")


@dataclass(frozen=True)
class BlockGrid:
    """Block layout of one attention call (plain ints, no tensors)."""

    seq_len_q: int
    seq_len_kv: int
    block_size: int
    causal: bool

    @property
    def q_offset(self) -> int:
        """Absolute position of query 0."""
        return self.seq_len_kv - self.seq_len_q

    @property
    def first_q_block(self) -> int:
        return self.q_offset // self.block_size

    @property
    def num_q_blocks(self) -> int:
        return (self.seq_len_kv - 1) // self.block_size - self.first_q_block + 1

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.seq_len_kv // self.block_size)

    @property
    def is_decode(self) -> bool:
        return self.seq_len_q == 1

    @property
    def row_causal(self) -> bool:
        """Whether candidate counts grow along the rows (causal and not decode)."""
        return self.causal and not self.is_decode

    def candidate_counts(self) -> tuple[int, int, int]:
        """``(first, step, n_rows)``: row r has ``first + step * r`` candidates."""
        if self.row_causal:
            return self.first_q_block + 1, 1, self.num_q_blocks
        return self.num_kv_blocks, 0, self.num_q_blocks


def _selected_total(k: int, first: int, step: int, rows: int) -> int:
    """sum_r min(k, first + step * r) in O(1)."""
    if step == 0:
        return rows * min(k, first)
    below = min(max(k - first + 1, 0), rows)  # rows whose candidate count is <= k
    return below * first + below * (below - 1) // 2 + (rows - below) * k


def budget_to_k(fp16_budget: float, grid: BlockGrid) -> int:
    """Blocks per query-block row for ``fp16_budget`` on ``grid`` (rule in the module doc)."""
    if not (0.0 <= fp16_budget <= 1.0) or math.isnan(fp16_budget):
        raise ValueError(f"fp16_budget must be in [0, 1], got {fp16_budget!r}")
    first, step, rows = grid.candidate_counts()
    kmax = first + step * (rows - 1)
    if fp16_budget == 0.0:
        return 0
    if fp16_budget == 1.0:
        return kmax
    target = fp16_budget * _selected_total(kmax, first, step, rows)
    lo, hi = 0, kmax  # smallest k with total >= target
    while lo < hi:
        mid = (lo + hi) // 2
        if _selected_total(mid, first, step, rows) >= target:
            hi = mid
        else:
            lo = mid + 1
    k = lo
    if k > 0 and target - _selected_total(k - 1, first, step, rows) <= (
        _selected_total(k, first, step, rows) - target
    ):
        k -= 1
    return max(k, 1)


def check_selection(selection: str) -> None:
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")


def _block_reduce(x: torch.Tensor, start: int, block_size: int, n_blocks: int, op: str):
    """Reduce ``x [B, H, S, D]`` (positions start..start+S-1) over aligned blocks -> [B,H,n,D]."""
    B, H, S, D = x.shape
    pad_front = start - (start // block_size) * block_size
    total = n_blocks * block_size
    fill = {"mean": 0.0, "min": float("inf"), "max": float("-inf")}[op]
    buf = x.new_full((B, H, total, D), fill, dtype=torch.float32)
    buf[:, :, pad_front : pad_front + S] = x.float()
    buf = buf.view(B, H, n_blocks, block_size, D)
    if op == "min":
        return buf.amin(dim=3)
    if op == "max":
        return buf.amax(dim=3)
    counts = torch.zeros(total, device=x.device)
    counts[pad_front : pad_front + S] = 1
    counts = counts.view(n_blocks, block_size).sum(-1).clamp(min=1)
    return buf.sum(dim=3) / counts[:, None]


def block_scores(q: torch.Tensor, k: torch.Tensor, grid: BlockGrid, selection: str) -> torch.Tensor:
    """Reference scores ``[B, Hq, n_q_blocks, n_kv_blocks]`` fp32, -inf at non-candidates."""
    B, Hq, _, _ = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    nq, nk, bs = grid.num_q_blocks, grid.num_kv_blocks, grid.block_size
    rows = torch.arange(nq, device=q.device)[:, None] + grid.first_q_block
    cols = torch.arange(nk, device=q.device)[None, :]
    if selection == "local":
        scores = cols.float().expand(nq, nk).clone()[None, None].expand(B, Hq, nq, nk).clone()
    else:
        qbar = _block_reduce(q, grid.q_offset, bs, nq, "mean")  # [B, Hq, nq, D]
        if selection == "block_mean":
            kbar = _block_reduce(k, 0, bs, nk, "mean").repeat_interleave(group, dim=1)
            scores = qbar @ kbar.transpose(-1, -2)
        else:
            kmin = _block_reduce(k, 0, bs, nk, "min").repeat_interleave(group, dim=1)
            kmax = _block_reduce(k, 0, bs, nk, "max").repeat_interleave(group, dim=1)
            qb = qbar[:, :, :, None, :]
            scores = torch.maximum(qb * kmax[:, :, None], qb * kmin[:, :, None]).sum(-1)
        if grid.is_decode and group > 1:
            scores = scores.view(B, Hkv, group, nq, nk).amax(dim=2, keepdim=True)
            scores = scores.expand(B, Hkv, group, nq, nk).reshape(B, Hq, nq, nk)
    if grid.row_causal:
        scores = scores.masked_fill(cols > rows, float("-inf"))
    return scores


def select_blocks_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    fp16_budget: float,
    selection: str,
    block_size: int,
    causal: bool,
    force_sink_recent: bool = False,
) -> torch.Tensor:
    """PyTorch reference of :func:`thrift_vllm.select_blocks` (shapes and rules there)."""
    grid = BlockGrid(q.shape[2], k.shape[2], block_size, causal)
    kk = budget_to_k(fp16_budget, grid)
    B, Hq = q.shape[:2]
    nq = grid.num_q_blocks
    if kk == 0:
        return torch.empty(B, Hq, nq, 0, dtype=torch.int32, device=q.device)
    scores = block_scores(q, k, grid, selection)
    valid = torch.isfinite(scores)
    scores = torch.where(valid, scores, torch.full_like(scores, float("-inf")))
    if force_sink_recent:
        rows = torch.arange(nq, device=q.device) + grid.first_q_block
        diag = rows.clamp(max=grid.num_kv_blocks - 1) if grid.row_causal else torch.full_like(
            rows, grid.num_kv_blocks - 1)
        boost = torch.zeros_like(scores)
        boost[..., 0] = 1.0
        boost.scatter_(-1, diag.view(1, 1, nq, 1).expand(B, Hq, nq, 1), 2.0)
        # Ordering on (boost, score): forced blocks first, then by score.
        key = boost * 1e30 + torch.nan_to_num(scores, neginf=-1e29).clamp(-1e29, 1e29)
        key = torch.where(valid, key, torch.full_like(key, float("-inf")))
    else:
        key = scores
    # A stable descending sort rather than topk: equal scores (all-zero blocks) go to the
    # smaller block index on every device, as the Triton kernel does.
    vals, order = (key + 0.0).sort(dim=-1, descending=True, stable=True)  # + 0.0: -0 == +0
    vals, order = vals[..., :kk], order[..., :kk]
    idx = torch.where(torch.isfinite(vals), order, torch.full_like(order, -1))
    big = torch.iinfo(torch.int32).max
    idx = torch.where(idx < 0, big, idx).sort(dim=-1).values
    return torch.where(idx == big, -1, idx).to(torch.int32)
