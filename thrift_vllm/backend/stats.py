"""Engine-side counters of what the attention backend really computed, for ``/metrics``.

The metadata builder calls :func:`record_step` once per scheduler step with each sequence's grid
and number of FP16 blocks per query-block row; this module turns that into query-key block
counts (plain arithmetic, :mod:`thrift_vllm.selection`) and keeps them in prometheus_client
series:

- ``thrift_vllm_fp16_blocks_total{budget_bucket}``: query-key blocks computed in FP16, per KV
  head and layer (identical for every layer of a step, so counted once);
- ``thrift_vllm_attention_blocks_total{budget_bucket}``: causal candidate blocks (FP16 + FP4);
- ``thrift_vllm_fp16_block_fraction``: their cumulative ratio in this engine (the realised FP16
  share; ``rate(fp16) / rate(attention)`` in PromQL gives it over a window).

The engine runs in its own process: the series reach the API server's ``/metrics`` through
prometheus_client's multiprocess mode (``thrift-vllm serve`` sets ``PROMETHEUS_MULTIPROC_DIR``
before anything imports prometheus_client). Without it (plain ``vllm serve``) they still exist in
the engine process, and :func:`totals` reads them in tests.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from thrift_vllm.selection import BlockGrid, _selected_total

BUCKET_EDGES = (0.0, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

_lock = threading.Lock()
_series: dict | None = None
_totals = {"fp16": 0, "all": 0}


def bucket(budget: float) -> str:
    """The smallest edge of :data:`BUCKET_EDGES` at or above ``budget`` (``le`` style)."""
    for edge in BUCKET_EDGES:
        if budget <= edge:
            return repr(edge)
    return repr(BUCKET_EDGES[-1])


def step_blocks(grid: BlockGrid, k: int) -> tuple[int, int]:
    """``(fp16 blocks, candidate blocks)`` of one attention call on ``grid`` with ``k`` FP16
    blocks per query-block row (per head)."""
    first, step, rows = grid.candidate_counts()
    kmax = first + step * (rows - 1)
    return _selected_total(min(k, kmax), first, step, rows), _selected_total(kmax, first, step,
                                                                             rows)


def _get() -> dict | None:
    global _series
    with _lock:
        if _series is None:
            try:
                from prometheus_client import Counter, Gauge
            except ImportError:  # pragma: no cover - vLLM depends on prometheus_client
                _series = {}
                return _series
            _series = {
                "fp16": Counter("thrift_vllm_fp16_blocks", "Query-key blocks computed in FP16 "
                                "(per KV head and layer)", ["budget_bucket"]),
                "all": Counter("thrift_vllm_attention_blocks", "Causal candidate query-key "
                               "blocks, FP16 + FP4 (per KV head and layer)", ["budget_bucket"]),
                "fraction": Gauge("thrift_vllm_fp16_block_fraction", "Realised share of "
                                  "query-key blocks computed in FP16 since the engine started",
                                  multiprocess_mode="livemostrecent"),
            }
        return _series


def record_step(grids: Sequence[BlockGrid | None], ks: Sequence[int],
                budgets: Sequence[float]) -> None:
    """Count one step: ``grids[i]`` (None for padding rows), ``ks[i]``, ``budgets[i]``."""
    per_bucket: dict[str, list[int]] = {}
    for grid, k, b in zip(grids, ks, budgets, strict=True):
        if grid is None:
            continue
        f, a = step_blocks(grid, k)
        acc = per_bucket.setdefault(bucket(b), [0, 0])
        acc[0] += f
        acc[1] += a
    if not per_bucket:
        return
    s = _get()
    with _lock:
        for name, (f, a) in per_bucket.items():
            _totals["fp16"] += f
            _totals["all"] += a
            if s:
                s["fp16"].labels(name).inc(f)
                s["all"].labels(name).inc(a)
        if s and _totals["all"]:
            s["fraction"].set(_totals["fp16"] / _totals["all"])


def totals() -> dict[str, int]:
    """Running totals in this process (tests, logs)."""
    with _lock:
        return dict(_totals)
