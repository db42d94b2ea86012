"""Per-request FP16 budgets on plain vLLM, with no extra flag, scoped to engines that run
ThriftAttention.

``LLM(model, attention_backend="CUSTOM")`` or ``vllm serve --attention-backend CUSTOM`` is all
a user gives; ``SamplingParams(extra_args={"fp16_budget": x})`` / ``"vllm_xargs"`` must then
reach the attention layers, and must not reuse prefix-cache blocks that another budget wrote.
Two hooks, installed by the plugin (``plugin.register``) and inert for every other engine:

1. **Engine config** (:func:`prepare_config`, run right after vLLM's platform hook
   ``check_and_update_config`` finishes a ``VllmConfig``, in the process that builds it, before
   the config travels to the engine core and workers): when the config selects this backend,
   ``FP16BudgetLogitsProcessor`` is added to ``model_config.logits_processors`` (it carries the
   budget to the metadata builder: ``request_budget``). Only such engines get it, so engines
   that do not select the backend stay as they were (vLLM's ``vllm.logits_processors`` entry
   point would load it for every engine, and vLLM's V1 model runner then refuses speculative
   decoding for every model). Where the processor cannot run — speculative decoding on the V1
   model runner (vLLM 0.26 always; 0.32+ when it does not pick V2), pooling models — it is not
   added, a warning says so at start, and requests that carry a budget are refused (2.).
2. **Requests** (:func:`route_request` around ``InputProcessor.process_inputs``, the front end
   of ``LLM`` and of the OpenAI server): a request with a budget the engine cannot apply is
   refused (``ValueError`` naming what to change: an HTTP 400 online); every other request of a
   thrift engine gets the budget it runs at folded into its ``cache_salt`` (vLLM keys prefix
   blocks by tokens and salt), so a block written at budget 0 is never read at budget 1: the
   budget changes the stored K/V of every layer after the first. Same token as ``thrift-vllm
   serve``'s middleware, which therefore salts nothing twice. ``budget_cache_salt: false``
   (``thrift-vllm serve --no-budget-cache-salt``) turns this off; with prefix caching on, the
   engine warns at start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from thrift_vllm.backend import request_budget
from thrift_vllm.backend.config import ThriftBackendConfig, budget_cache_salt
from thrift_vllm.backend.plugin import BACKEND_QUALNAME

_ROUTE_ATTR = "_thrift_vllm_budget_route"


def _logger():
    from thrift_vllm.backend.compat import get_logger

    return get_logger(__name__)


def uses_thrift(vllm_config: Any) -> bool:
    """Whether ``vllm_config`` selects attention backend CUSTOM, registered to ThriftAttention
    (``attention_config.backend`` or any ``backend_per_kind`` entry)."""
    att = getattr(vllm_config, "attention_config", None)
    if att is None:
        return False
    chosen = [getattr(att, "backend", None),
              *(getattr(att, "backend_per_kind", None) or {}).values()]
    custom = [b for b in chosen if getattr(b, "name", b) == "CUSTOM"]
    if not custom:
        return False
    try:
        return custom[0].get_path() == BACKEND_QUALNAME
    except Exception:  # a string or an enum without a registry: not ours to judge
        return False


def _processor_can_run(vllm_config: Any) -> str | None:
    """Why the budget processor cannot run in this engine, or None."""
    model_config = vllm_config.model_config
    if getattr(model_config, "runner_type", "generate") == "pooling":
        return "pooling models take no logits processors"
    if getattr(vllm_config, "speculative_config", None) is not None:
        try:
            v2 = bool(vllm_config.use_v2_model_runner)  # evaluated with the processor listed
        except Exception:
            v2 = False
        if not v2:
            return ("vLLM's V1 model runner takes no logits processors with speculative "
                    "decoding (vLLM 0.32+: run model runner V2, VLLM_USE_V2_MODEL_RUNNER=1; "
                    "or drop the speculative config)")
    return None


def prepare_config(vllm_config: Any) -> None:
    """Make per-request budgets reach a thrift engine (module doc, 1.); no-op for others."""
    if not uses_thrift(vllm_config):
        return
    model_config = getattr(vllm_config, "model_config", None)
    if model_config is None:
        return
    cfg = ThriftBackendConfig.from_vllm_config(vllm_config)
    log = _logger()
    if not request_budget.is_enabled(vllm_config):
        before = list(model_config.logits_processors or [])
        model_config.logits_processors = [*before, request_budget.QUALNAME]
        problem = _processor_can_run(vllm_config)
        if problem:
            model_config.logits_processors = before or None
            log.warning("thrift_vllm: per-request fp16_budget is off in this engine: %s. "
                        "Requests carrying one are refused; the others run at the default "
                        "%s.", problem, cfg.fp16_budget)
        else:
            log.info("thrift_vllm: per-request fp16_budget enabled (budget logits processor "
                     "added for the ThriftAttention engine)")
    cache_config = getattr(vllm_config, "cache_config", None)
    if getattr(cache_config, "enable_prefix_caching", False) and not cfg.budget_cache_salt:
        log.warning("thrift_vllm: budget_cache_salt is off while prefix caching is on: requests "
                    "with different fp16_budget values share prefix-cache blocks, whose K/V "
                    "depend on the budget (wrong log-probabilities). Give each budget its own "
                    "cache_salt, turn the salt back on, or disable prefix caching.")


def salt_for(budget: float, salt: str | None) -> str:
    """``salt`` with the budget token appended (``config.budget_cache_salt``), as is if it
    already ends with it (the server middleware salted it)."""
    own = budget_cache_salt(budget)
    if salt and (salt == own or salt.endswith("|" + own)):
        return salt
    return budget_cache_salt(budget, salt)


@dataclass(frozen=True)
class Route:
    """What one thrift engine's front end does with requests (module doc, 2.)."""

    default_budget: float
    salt: bool
    problem: str | None  # per-request budgets cannot reach the layers (why), or None

    @classmethod
    def of(cls, vllm_config: Any) -> Route | None:
        """The route of ``vllm_config`` (after :func:`prepare_config`), None: not a thrift
        engine."""
        if not uses_thrift(vllm_config):
            return None
        cfg = ThriftBackendConfig.from_vllm_config(vllm_config)
        problem = None
        if not request_budget.is_enabled(vllm_config):
            problem = _processor_can_run(vllm_config) or "the budget logits processor is missing"
        return cls(cfg.fp16_budget, cfg.budget_cache_salt, problem)

    def check(self, params: Any) -> None:
        """Refuse a request whose budget cannot be applied (``ValueError``)."""
        if self.problem is None or params is None:
            return
        if request_budget.EXTRA_ARGS_KEY in (getattr(params, "extra_args", None) or {}):
            raise ValueError(f"extra_args[\"fp16_budget\"] cannot be applied by this engine: "
                             f"{self.problem}. Leave fp16_budget out to run at the engine "
                             f"default {self.default_budget}.")

    def salt_request(self, request: Any) -> None:
        """Fold the request's effective budget into ``request.cache_salt``."""
        params = getattr(request, "sampling_params", None)
        if not self.salt or params is None:
            return
        budget = request_budget.request_budget(params) if self.problem is None else None
        request.cache_salt = salt_for(self.default_budget if budget is None else budget,
                                      request.cache_salt)


def route_request(processor: Any, params: Any, call) -> Any:
    """``call()`` (vLLM's ``process_inputs``) with ``processor``'s engine route around it."""
    route = processor.__dict__.get(_ROUTE_ATTR, False)
    if route is False:
        route = Route.of(getattr(processor, "vllm_config", None))
        processor.__dict__[_ROUTE_ATTR] = route
    if route is not None:
        route.check(params)
    request = call()
    if route is not None:
        route.salt_request(request)
    return request
