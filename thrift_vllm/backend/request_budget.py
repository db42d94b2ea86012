"""Per-request FP16 budget: ``SamplingParams(extra_args={"fp16_budget": 0.1})`` (online:
``"vllm_xargs": {"fp16_budget": 0.1}`` in the request body).

No sampling parameter reaches vLLM's attention metadata builder, so a pass-through logits
processor carries it: ``FP16BudgetLogitsProcessor`` (enable with
``LLM(..., logits_processors=[FP16BudgetLogitsProcessor])`` or ``--logits-processors
thrift_vllm.backend.request_budget:FP16BudgetLogitsProcessor``) never changes logits; it

- validates ``extra_args["fp16_budget"]`` at admission (``validate_params``: a bad value is a
  ``ValueError`` for ``LLM.generate`` and an HTTP 400 online), and
- records each request's budget by persistent-batch row (model runner V1, the CPU runner) in a
  table that the metadata builder of the same worker process reads (``budgets_for_rows``).
  vLLM refreshes logits processors (condense, reorder, ``update_state``) before it builds the
  attention metadata of a step, so the rows agree. Requests without the key use the server
  default (``ThriftBackendConfig.fp16_budget``).

Limits: model runner V2 (CUDA default; rows are request slots, ``req_idx``) is not wired yet:
there the server default applies and a warning says so. vLLM's V1 runner refuses custom logits
processors together with speculative decoding.

Prefix caching: the budget changes the stored K/V of every layer after the first (their inputs
are earlier layers' attention outputs), so requests with different budgets must not share
prefix-cache blocks. vLLM keys blocks by tokens and ``cache_salt`` only, and a logits processor
cannot set the salt, so the client must: give each budget its own ``cache_salt`` (e.g.
``{"prompt": ..., "cache_salt": "fp16_budget=0.1"}``), or run with
``enable_prefix_caching=False``. The server milestone's middleware should add it.
"""

from __future__ import annotations

from typing import Any

import torch

from thrift_vllm.backend.config import check_budget

EXTRA_ARGS_KEY = "fp16_budget"
QUALNAME = "thrift_vllm.backend.request_budget:FP16BudgetLogitsProcessor"

# Row -> budget of the live engine in this worker process (one engine per worker process).
_table: dict[int, float] | None = None


def request_budget(sampling_params: Any) -> float | None:
    """The validated ``extra_args["fp16_budget"]`` of a request, or None when absent."""
    extra = getattr(sampling_params, "extra_args", None) or {}
    if EXTRA_ARGS_KEY not in extra:
        return None
    return check_budget(extra[EXTRA_ARGS_KEY], what=f'extra_args["{EXTRA_ARGS_KEY}"]')


def is_enabled(vllm_config: Any) -> bool:
    """Whether ``FP16BudgetLogitsProcessor`` is among the engine's logits processors."""
    procs = getattr(getattr(vllm_config, "model_config", None), "logits_processors", None) or []
    for p in procs:
        if p is FP16BudgetLogitsProcessor:
            return True
        if isinstance(p, str) and p.replace(":", ".") == QUALNAME.replace(":", "."):
            return True
    return False


def budgets_for_rows(num_rows: int, default: float) -> list[float]:
    """Budgets of persistent-batch rows ``0..num_rows-1`` (``default`` where unset)."""
    table = _table or {}
    return [table.get(i, default) for i in range(num_rows)]


def _make_processor_base() -> type:
    from thrift_vllm.backend.compat import logits_processor_api

    return logits_processor_api()[0]


class FP16BudgetLogitsProcessor(_make_processor_base()):  # type: ignore[misc]
    """Pass-through logits processor that records ``extra_args["fp16_budget"]`` per row."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        request_budget(sampling_params)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        global _table
        self.rows: dict[int, float] = {}
        _table = self.rows  # the newest engine of this process owns the table

    def is_argmax_invariant(self) -> bool:
        return True  # never changes logits

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def update_state(self, batch_update) -> None:
        if not batch_update:
            return
        from thrift_vllm.backend.compat import logits_processor_api

        swap = logits_processor_api()[1].SWAP
        rows = self.rows
        for index in batch_update.removed:  # documented order: removed, added, moved
            rows.pop(index, None)
        for index, params, _prompt, _output in batch_update.added:
            budget = request_budget(params)
            if budget is None:
                rows.pop(index, None)
            else:
                rows[index] = budget
        for a, b, direction in batch_update.moved:
            a_val, b_val = rows.pop(a, None), rows.pop(b, None)
            if a_val is not None:
                rows[b] = a_val
            if direction == swap and b_val is not None:
                rows[a] = b_val
