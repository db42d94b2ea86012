"""The project's Prometheus series, registered in prometheus_client's default registry, which
vLLM's ``/metrics`` exposes (single API server process; with ``PROMETHEUS_MULTIPROC_DIR`` set,
prometheus_client's multiprocess mode collects them from every process as usual).

- ``thrift_vllm_requests_total{budget_bucket, source}``: generation requests admitted by the
  middleware, by applied budget (bucket = the smallest upper edge >= budget, ``le`` style) and
  where the budget came from (``header``, ``body``, ``default``);
- ``thrift_vllm_budget_rejected_total{reason}``: requests answered 400 by the middleware;
- ``thrift_vllm_budget_clamped_total``: requests whose budget was lowered to the cap;
- ``thrift_vllm_fp16_budget_default`` / ``thrift_vllm_fp16_budget_cap``: gauges of the settings;
- ``thrift_vllm_kv_cache_bytes_per_token{layout="thrift"|"stock"}``: KV bytes per token.

The engine process adds the realised FP16 share (``thrift_vllm.backend.stats``).
"""

from __future__ import annotations

import threading

from thrift_vllm.backend.stats import BUCKET_EDGES, bucket

_lock = threading.Lock()
_metrics: dict | None = None


def get() -> dict:
    """The collectors, created once per process (in the default registry)."""
    global _metrics
    with _lock:
        if _metrics is None:
            from prometheus_client import Counter, Gauge

            _metrics = {
                "requests": Counter("thrift_vllm_requests", "Generation requests by applied "
                                    "FP16 budget bucket (upper edge) and budget source",
                                    ["budget_bucket", "source"]),
                "rejected": Counter("thrift_vllm_budget_rejected", "Requests rejected (HTTP 400) "
                                    "for their FP16 budget", ["reason"]),
                "clamped": Counter("thrift_vllm_budget_clamped", "Requests whose FP16 budget "
                                   "was lowered to the server cap"),
                "default": Gauge("thrift_vllm_fp16_budget_default", "Server default FP16 budget",
                                 multiprocess_mode="max"),
                "cap": Gauge("thrift_vllm_fp16_budget_cap", "Server FP16 budget cap",
                             multiprocess_mode="max"),
                "kv_bytes": Gauge("thrift_vllm_kv_cache_bytes_per_token", "KV cache bytes per "
                                  "token (all layers) in the backend's page layout, and in "
                                  "vLLM's stock layout", ["layout"], multiprocess_mode="max"),
            }
            for edge in BUCKET_EDGES:  # export every bucket from the start (zeros)
                for source in ("header", "body", "default"):
                    _metrics["requests"].labels(repr(edge), source)
        return _metrics


def set_settings(default: float, cap: float) -> None:
    m = get()
    m["default"].set(default)
    m["cap"].set(cap)


def set_kv_bytes(ours: int, stock: int) -> None:
    m = get()
    m["kv_bytes"].labels("thrift").set(ours)
    m["kv_bytes"].labels("stock").set(stock)


def count_request(budget: float, source: str, clamped: bool) -> None:
    m = get()
    m["requests"].labels(bucket(budget), source).inc()
    if clamped:
        m["clamped"].inc()


def count_rejected(reason: str) -> None:
    get()["rejected"].labels(reason).inc()
