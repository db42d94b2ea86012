"""Per-request FP16 budget: ``SamplingParams(extra_args={"fp16_budget": 0.1})`` (online:
``"vllm_xargs": {"fp16_budget": 0.1}`` in the request body).

No sampling parameter reaches vLLM's attention metadata builder, so a pass-through logits
processor carries it: ``FP16BudgetLogitsProcessor`` (added by ``budget_route`` to every engine
that selects the thrift backend, and to no other; listing it in ``logits_processors`` /
``--logits-processors`` by hand still works) never changes logits; it

- validates ``extra_args["fp16_budget"]`` at admission (``validate_params``: a bad value is a
  ``ValueError`` for ``LLM.generate`` and an HTTP 400 online), and
- records each request's budget where the metadata builder of the same worker process finds it:
  by persistent-batch row under model runner V1 (vLLM 0.26's runner for custom logits
  processors, the CPU runner; ``update_state``: vLLM refreshes logits processors, condense,
  reorder, before it builds the attention metadata of a step, so the rows agree;
  ``budgets_for_rows``), by request slot under model runner V2 (vLLM 0.32+ on CUDA:
  ``add_request(req_idx, params)``, and ``CommonAttentionMetadata.req_idx`` maps each row to
  its slot; ``budgets_for_slots``). The one class implements both interfaces (vLLM's V2 loader
  refuses V1-only processors), so the same ``--logits-processors`` value works with either
  runner. Requests without the key use the server default (``ThriftBackendConfig.fp16_budget``).

Limits: vLLM's V1 runner refuses custom logits processors together with speculative decoding.
The V2 route is unit-tested against vLLM 0.32's classes only (V2 needs CUDA Triton). Runner V2
adds requests to the sampler, hence to this processor, on the last pipeline stage only, so with
pipeline parallelism the earlier stages' layers use the server default (tensor parallelism is
unaffected: every rank of the last stage samples).

Prefix caching: the budget changes the stored K/V of every layer after the first (their inputs
are earlier layers' attention outputs), so requests with different budgets must not share
prefix-cache blocks. vLLM keys blocks by tokens and ``cache_salt`` only, and a logits processor
cannot set the salt: ``budget_route`` folds each request's budget into its salt at admission.
"""

from __future__ import annotations

from typing import Any

import torch

from thrift_vllm.backend.config import check_budget

EXTRA_ARGS_KEY = "fp16_budget"
QUALNAME = "thrift_vllm.backend.request_budget:FP16BudgetLogitsProcessor"

# Budgets of the live engine in this worker process (one engine per worker process): by
# persistent-batch row (runner V1) and by request slot (runner V2).
_table: dict[int, float] | None = None
_slots: dict[int, float] | None = None


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


def budgets_for_slots(slots: list[int], default: float) -> list[float]:
    """Budgets of the requests in model runner V2's slots ``slots`` (``default`` where unset)."""
    table = _slots or {}
    return [table.get(int(i), default) for i in slots]


def step_budgets(num_reqs: int, slots, default: float, per_request: bool) -> list[float]:
    """Per-sequence FP16 budgets of one step: the request's ``extra_args["fp16_budget"]`` when
    the budget logits processor is enabled (runner V1: by persistent-batch row; runner V2: by
    the request slot of each row, ``slots`` = ``CommonAttentionMetadata.req_idx``, None on
    V1), else ``default``."""
    if not per_request:
        return [default] * num_reqs
    if slots is not None:  # model runner V2 (host array)
        return budgets_for_slots(list(slots[:num_reqs]), default)
    return budgets_for_rows(num_reqs, default)


def _processor_bases() -> tuple[type, ...]:
    from thrift_vllm.backend.compat import logits_processor_api, logits_processor_api_v2

    v2 = logits_processor_api_v2()
    return (logits_processor_api()[0],) + (() if v2 is None else (v2,))


class FP16BudgetLogitsProcessor(*_processor_bases()):  # type: ignore[misc]
    """Pass-through logits processor that records ``extra_args["fp16_budget"]`` per row
    (runner V1: ``update_state``) or per request slot (runner V2: ``add_request``)."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        request_budget(sampling_params)

    def __init__(self, vllm_config, *runner_args) -> None:
        """Runner V1 passes ``(vllm_config, device, is_pin_memory)``, runner V2
        ``(vllm_config, req_states)``; the newest engine of this process owns the table."""
        global _table, _slots
        self.rows: dict[int, float] = {}
        if len(runner_args) == 1:
            _slots = self.rows
        else:
            _table = self.rows

    def is_argmax_invariant(self) -> bool:
        return True  # never changes logits

    def apply(self, logits: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        return logits

    def add_request(self, req_idx: int, sampling_params) -> bool:
        """Runner V2: a request enters slot ``req_idx`` (which may hold a finished request's
        budget). Returns False: this processor never modifies logits."""
        budget = request_budget(sampling_params)
        if budget is None:
            self.rows.pop(req_idx, None)
        else:
            self.rows[req_idx] = budget
        return False

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
