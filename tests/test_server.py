"""``thrift-vllm serve`` (thrift_vllm.server): budget parsing and the ASGI middleware directly
(fast, no vLLM), the CLI's argument preparation, and end to end against ONE real server process
(the embedded trained model from models/, CPU, max-model-len 512, eager) shared by the tests
through a module fixture and terminated at the end (the last test sends SIGTERM and checks a clean
exit). Tests that need vLLM skip when ``import vllm`` fails.

Generation tests pass ``ignore_eos`` (exact token counts) and sample with a seed where they need
text.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from server_process import needs_vllm, start_server, vllm_import_error
from thrift_vllm.server import budget as B  # noqa: N812
from thrift_vllm.server.middleware import ThriftServerMiddleware

KEY = "test-key-123"
CAP = 0.5
DEFAULT = 0.05
MALFORMED = ["abc", "NaN", "nan", "inf", "-inf", "-0.1", "1.5", "", "   ", "0x1", "1_0",
             "0.1,0.2", "9" * 5000]


# --- budget parsing (pure) -----------------------------------------------------------------------

def test_header_parsing_valid_and_malformed():
    for text, want in [("0", 0.0), ("1", 1.0), ("0.25", 0.25), (" 0.1 ", 0.1), ("1e-1", 0.1),
                       ("-0", 0.0), ("+.5", 0.5), (b"0.3", 0.3)]:
        assert B.header_budget([text]) == want
    assert B.header_budget([]) is None
    for bad in MALFORMED:
        with pytest.raises(B.BudgetError) as e:
            B.header_budget([bad])
        assert e.value.param == "X-FP16-Budget" and "X-FP16-Budget" in e.value.message
        assert len(e.value.message) < 200  # a huge value is not echoed whole
    with pytest.raises(B.BudgetError, match="repeated"):
        B.header_budget(["0.1", "0.1"])


def test_body_parsing():
    assert B.body_budget({}) is None
    assert B.body_budget({"fp16_budget": 0.2}) == 0.2
    assert B.body_budget({"vllm_xargs": {"fp16_budget": "0.3"}}) == 0.3
    assert B.body_budget({"fp16_budget": 1, "vllm_xargs": {"fp16_budget": 1.0}}) == 1.0
    with pytest.raises(B.BudgetError, match="disagree"):
        B.body_budget({"fp16_budget": 0.1, "vllm_xargs": {"fp16_budget": 0.2}})
    for bad in [True, None, [0.1], {"a": 1}, float("nan"), float("inf"), -0.1, 1.5, 10**400,
                "abc", ""]:
        with pytest.raises(B.BudgetError, match="fp16_budget"):
            B.body_budget({"fp16_budget": bad})
        with pytest.raises(B.BudgetError, match=r"vllm_xargs\.fp16_budget"):
            B.body_budget({"vllm_xargs": {"fp16_budget": bad}})


def test_resolve_precedence_and_cap():
    s = B.BudgetSettings(default=DEFAULT, cap=CAP, over_cap="clamp")
    assert B.resolve(s, None, None) == B.Resolution(DEFAULT, "default")
    assert B.resolve(s, 0.2, 0.1).budget == 0.2 and B.resolve(s, 0.2, 0.1).source == "header"
    assert B.resolve(s, None, 0.1).source == "body"
    r = B.resolve(s, 0.9, None)
    assert (r.budget, r.clamped, r.requested) == (CAP, True, 0.9)
    reject = B.BudgetSettings(default=DEFAULT, cap=CAP, over_cap="reject")
    assert B.resolve(reject, CAP, None).budget == CAP  # the cap itself is allowed
    with pytest.raises(B.BudgetError, match="above this server's cap") as e:
        B.resolve(reject, None, 0.9)
    assert e.value.code == "fp16_budget_over_cap"
    for bad in [dict(default=0.6, cap=0.5), dict(cap=1.5), dict(default=float("nan")),
                dict(over_cap="truncate")]:
        with pytest.raises(ValueError):
            B.BudgetSettings(**bad)


def test_cache_salt_and_body_rewrite():
    assert B.salt_for(0.05, None) == "thrift-fp16-budget=0.05"
    assert B.salt_for(0.05, "tenant-a") == "tenant-a|thrift-fp16-budget=0.05"
    assert B.salt_for(0.05, "x") != B.salt_for(0.1, "x")
    long = B.salt_for(0.05, "y" * 128)
    assert long.startswith("sha256:") and len(long) <= B.MAX_SALT_LEN
    for invalid in ["", "a/b", 5, "z" * 129]:  # left for vLLM to reject (400)
        assert B.salt_for(0.05, invalid) == invalid
    body = {"prompt": "x", "fp16_budget": 0.3, "vllm_xargs": {"other": 1}, "cache_salt": "s"}
    out = B.rewrite_body(body, 0.25)
    assert out == {"prompt": "x", "vllm_xargs": {"other": 1, "fp16_budget": 0.25},
                   "cache_salt": "s|thrift-fp16-budget=0.25"}
    assert body["fp16_budget"] == 0.3  # the input is not modified
    assert "cache_salt" not in B.rewrite_body({"prompt": "x"}, 0.1, salt=False)


# --- the middleware, on a fake ASGI app ----------------------------------------------------------

def _settings(**budget):
    return {"budget": {"default": DEFAULT, "cap": CAP, "over_cap": "clamp", **budget},
            "api_keys": [KEY], "cache_salt": True, "backend": {"selection": "block_mean"}}


async def _call(mw, method, path, headers=(), body=b"", chunks=None):
    """Run one request through ``mw``; returns (status, headers dict, body bytes, inner)."""
    seen = {}
    pending = list(chunks) if chunks is not None else [body]

    async def receive():
        if pending:
            chunk = pending.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(pending)}
        return {"type": "http.disconnect"}

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "root_path": "",
             "headers": [(k.lower().encode(), v.encode() if isinstance(v, str) else v)
                         for k, v in headers]}
    await mw(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    out = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, out, seen


def _inner_app(seen):
    async def app(scope, receive, send):
        msg = await receive()
        seen["body"] = json.loads(msg["body"]) if msg["body"] else None
        seen["headers"] = dict(scope["headers"])
        seen["next"] = (await receive())["type"]  # after the body: the client's own receive
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})
    return app


def _run(mw, *a, **kw):
    return asyncio.run(_call(mw, *a, **kw))


AUTH = ("Authorization", f"Bearer {KEY}")


def test_middleware_budget_flow():
    seen: dict = {}
    mw = ThriftServerMiddleware(_inner_app(seen), settings=_settings())
    body = json.dumps({"prompt": "hi", "fp16_budget": 0.1}).encode()
    # header wins over body; the body is rewritten, content-length fixed, salt added
    status, hdrs, _, _ = _run(mw, "POST", "/v1/completions",
                              [AUTH, ("X-FP16-Budget", "0.2"), ("Content-Length", "3")],
                              chunks=[body[:5], body[5:]])
    assert status == 200 and hdrs["x-fp16-budget-applied"] == "0.2"
    assert seen["body"] == {"prompt": "hi", "vllm_xargs": {"fp16_budget": 0.2},
                            "cache_salt": "thrift-fp16-budget=0.2"}
    assert seen["headers"][b"content-length"] == str(len(json.dumps(seen["body"]))).encode()
    assert seen["next"] == "http.disconnect"
    # body only; default; clamp
    _, hdrs, _, _ = _run(mw, "POST", "/v1/chat/completions", [AUTH], body=body)
    assert hdrs["x-fp16-budget-applied"] == "0.1"
    _, hdrs, _, _ = _run(mw, "POST", "/v1/chat/completions", [AUTH], body=b'{"messages": []}')
    assert hdrs["x-fp16-budget-applied"] == "0.05" and seen["body"]["vllm_xargs"] == {
        "fp16_budget": 0.05}
    _, hdrs, _, _ = _run(mw, "POST", "/v1/completions", [AUTH, ("X-FP16-Budget", "0.9")],
                         body=b"{}")
    assert hdrs["x-fp16-budget-applied"] == "0.5"
    # a body that is not a JSON object goes on untouched (vLLM answers it)
    seen.clear()
    status, _, _, _ = _run(mw, "POST", "/v1/completions", [AUTH], body=b"[1]")
    assert seen["body"] == [1]


def test_middleware_errors_auth_config():
    seen: dict = {}
    mw = ThriftServerMiddleware(_inner_app(seen), settings=_settings())
    for bad in MALFORMED:
        status, hdrs, out, _ = _run(mw, "POST", "/v1/completions",
                                    [AUTH, ("X-FP16-Budget", bad)], body=b"{}")
        err = json.loads(out)["error"]
        assert status == 400 and set(err) == {"message", "type", "param", "code"}, bad
        assert err["param"] == "X-FP16-Budget" and hdrs["x-fp16-budget-applied"] == "none"
    status, _, out, _ = _run(mw, "POST", "/v1/completions",
                             [AUTH, ("X-FP16-Budget", "0.1"), ("X-FP16-Budget", "0.1")], b"{}")
    assert status == 400 and "repeated" in json.loads(out)["error"]["message"]
    status, _, out, _ = _run(mw, "POST", "/v1/completions", [AUTH],
                             body=b'{"fp16_budget": NaN}')
    assert status == 400 and json.loads(out)["error"]["param"] == "fp16_budget"
    # reject mode
    mw_reject = ThriftServerMiddleware(_inner_app(seen), settings=_settings(over_cap="reject"))
    status, _, out, _ = _run(mw_reject, "POST", "/v1/completions", [AUTH],
                             body=b'{"vllm_xargs": {"fp16_budget": 0.75}}')
    err = json.loads(out)["error"]
    assert status == 400 and err["code"] == "fp16_budget_over_cap" and "cap 0.5" in err["message"]
    # API key: everything but /health
    for method, path in [("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions"),
                         ("GET", "/v1/thrift/config"), ("GET", "/version")]:
        status, _, out, _ = _run(mw, method, path, [("Authorization", "Bearer wrong")])
        assert status == 401 and json.loads(out)["error"]["code"] == 401, path
    status, hdrs, _, _ = _run(mw, "GET", "/health")
    assert status == 200 and hdrs["x-fp16-budget-applied"] == "0.05"
    status, _, out, _ = _run(mw, "GET", "/v1/thrift/config", [AUTH])
    cfg = json.loads(out)
    assert status == 200 and (cfg["fp16_budget_default"], cfg["fp16_budget_max"]) == (0.05, 0.5)
    assert KEY not in out.decode()


# --- the default model -------------------------------------------------------------------------

def test_default_model_trained_else_placeholder(tmp_path, monkeypatch):
    from thrift_vllm.server import models

    monkeypatch.setenv("THRIFT_VLLM_MODELS_DIR", str(tmp_path))
    path, name, placeholder = models.default_model()
    assert (name, placeholder) == ("thrift-placeholder-untrained", True)
    assert path == tmp_path / "thrift-placeholder-untrained" and models.is_model_dir(path)
    assert models.describe(path)["trained"] is False
    assert "untrained" in (path / "README.md").read_text().lower()
    assert "UNTRAINED" in json.loads((path / "config.json").read_text())["thrift_note"]
    assert json.loads((path / "config.json").read_text())["num_hidden_layers"] == 6
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    trained = tmp_path / "thrift-embedded"
    trained.mkdir()
    for f in models._REQUIRED_FILES:
        (trained / f).write_text("{}")
    assert models.default_model()[1:] == ("thrift-embedded", False)


# --- CLI --------------------------------------------------------------------------------------

def test_cli_version_and_help(capsys):
    from thrift_vllm.server import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and "thrift-vllm" in capsys.readouterr().out
    assert cli.main([]) == 2 and "serve" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # eval = the quality harness's own parser
        cli.main(["eval", "--help"])
    assert e.value.code == 0 and "--kv-layouts" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["eval"])  # --model and --out are required
    assert e.value.code == 2 and "--model" in capsys.readouterr().err


@needs_vllm
def test_configure_logging_without_vllm_0_32_helper(monkeypatch):
    """vLLM 0.26 (the H200's) has no ``configure_logging_from_args``: ``thrift-vllm serve``
    died at start there (ImportError). The compat wrapper calls it where it exists only."""
    import argparse

    import vllm.logger

    from thrift_vllm.backend import compat

    args = argparse.Namespace(log_level="info")
    seen = []
    monkeypatch.setattr(vllm.logger, "configure_logging_from_args", seen.append, raising=False)
    compat.configure_logging(args)
    assert seen == [args]
    monkeypatch.delattr(vllm.logger, "configure_logging_from_args")
    compat.configure_logging(args)  # 0.26: nothing to call, no error
    assert seen == [args]


@needs_vllm
def test_cli_prepare_selects_backend(monkeypatch):
    from thrift_vllm.server import cli, middleware

    from thrift_vllm.backend.request_budget import QUALNAME

    monkeypatch.setattr(middleware, "_settings", None)
    environ = dict(os.environ)
    args, info = cli.prepare(["some/model", "--fp16-budget", "0.1", "--max-fp16-budget", "0.25",
                              "--budget-over-cap", "reject", "--selection", "quest",
                              "--additional-config", '{"x": 1}', "--api-key", "k",
                              "--allowed-origins", '["https://a.example"]',
                              "--enable-request-id-headers"])
    assert dict(os.environ) == environ  # the settings (and the key) stay out of the environment
    assert args.model == "some/model" and args.attention_backend == "CUSTOM"
    assert QUALNAME in args.logits_processors and cli.MIDDLEWARE in args.middleware
    assert args.additional_config == {"x": 1, "thrift_vllm": {"fp16_budget": 0.1,
                                                              "selection": "quest"}}
    s = middleware.current_settings()
    assert s["budget"] == {"default": 0.1, "cap": 0.25, "over_cap": "reject"}
    assert s["api_keys"] == ["k"] and not info["placeholder"]
    assert s["cors"]["allow_origins"] == ["https://a.example"] and s["request_id_headers"]
    assert info["kv_layout"] == "auto" and args.kv_cache_dtype in (None, "auto")
    args, _ = cli.prepare(["m", "--bulk-math", "fp8"])
    assert args.additional_config["thrift_vllm"]["bulk_math"] == "fp8"
    args, info = cli.prepare(["m", "--kv-layout", "nvfp4"])
    assert args.kv_cache_dtype == "nvfp4" and info["kv_layout"] == "nvfp4"
    args, info = cli.prepare(["m", "--kv-cache-dtype", "nvfp4"])
    assert info["kv_layout"] == "nvfp4"
    for bad in (["m", "--attention-backend", "FLASH_ATTN"], ["m", "--fp16-budget", "0.5",
                                                             "--max-fp16-budget", "0.25"],
                ["m", "--max-fp16-budget", "2"], ["m", "--kv-layout", "fp8"],
                ["m", "--kv-layout", "nvfp4", "--kv-cache-dtype", "fp8"],
                ["m", "--kv-cache-dtype", "fp8"], ["m", "--warmup-tokens", "-1"],
                ["m", "--bulk-math", "fp16"]):
        with pytest.raises(SystemExit):
            cli.prepare(bad)


def test_cli_warmup_tokens_policy():
    """Default: a 32K warm-up where Triton kernels would compile (CUDA, impl auto/triton),
    none on CPU or with the PyTorch path; an explicit value wins, within max_model_len."""
    from thrift_vllm.server import cli

    assert cli.warmup_tokens(None, 131072, "cuda", "auto") == cli.WARMUP_DEFAULT_TOKENS == 32768
    assert cli.warmup_tokens(None, 4096, "cuda", "triton") == 4080  # room for new tokens
    assert cli.warmup_tokens(None, 131072, "cuda", "torch") == 0
    assert cli.warmup_tokens(None, 131072, "cpu", "auto") == 0
    assert cli.warmup_tokens(200, 512, "cpu", "auto") == 200
    assert cli.warmup_tokens(0, 131072, "cuda", "auto") == 0
    with pytest.raises(ValueError, match="-3"):
        cli.warmup_tokens(-3, 512, "cuda", "auto")


# --- one real server --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if vllm_import_error() is not None:
        pytest.skip(f"import vllm failed: {vllm_import_error()}")
    args = ["--api-key", KEY, "--max-fp16-budget", str(CAP), "--fp16-budget", str(DEFAULT),
            "--max-num-seqs", "16", "--enable-log-requests", "--warmup-tokens", "200"]
    with start_server(tmp_path_factory.mktemp("server"), args) as srv:
        yield srv


def _client(server, **kw):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120, **kw)


def _http(server, method, path, **kw):
    import httpx

    headers = kw.pop("headers", [("Authorization", f"Bearer {KEY}")])
    return httpx.request(method, server.url + path, headers=headers, timeout=120, **kw)


MODEL = "thrift-embedded"  # the trained model shipped in models/ (issue 5)
GEN = dict(extra_body={"ignore_eos": True})


@needs_vllm
def test_server_health_models_config_startup_line(server):
    r = _http(server, "GET", "/health", headers=[])
    assert r.status_code == 200 and r.headers["x-fp16-budget-applied"] == "0.05"
    models = _client(server).models.list()
    assert [m.id for m in models.data] == [MODEL]
    cfg = _http(server, "GET", "/v1/thrift/config").json()
    assert cfg["fp16_budget_default"] == DEFAULT and cfg["fp16_budget_max"] == CAP
    assert cfg["untrained_placeholder"] is False
    line = next(x for x in Path(server.log).read_text().splitlines() if "thrift-vllm serve:" in x)
    for word in ("device=cpu", "backend=ThriftAttention", "kv_layout=auto", "default=0.05",
                 "cap=0.5", "models/thrift-embedded"):
        assert word in line, line
    assert "UNTRAINED" not in line
    assert "thrift-vllm serve: warm-up: 1 request of 200 tokens" in Path(server.log).read_text()
    cap = next(x for x in Path(server.log).read_text().splitlines() if "KV cache" in x
               and "thrift-vllm serve:" in x)
    assert cfg["kv_capacity_tokens"] > 0 and f"= {cfg['kv_capacity_tokens']} tokens" in cap
    assert 0 < cfg["kv_bytes_per_token_stock"] < cfg["kv_bytes_per_token"], cap  # auto: + FP4
    text = _http(server, "GET", "/metrics").text
    assert (f'thrift_vllm_kv_cache_bytes_per_token{{layout="thrift"}} '
            f'{float(cfg["kv_bytes_per_token"])}') in text


@needs_vllm
def test_server_api_key(server):
    for method, path in [("GET", "/v1/models"), ("GET", "/metrics"),
                         ("POST", "/v1/completions"), ("GET", "/v1/thrift/config")]:
        r = _http(server, method, path, headers=[])
        assert r.status_code == 401, path
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    import openai

    with pytest.raises(openai.AuthenticationError):
        _client(server, default_headers={"Authorization": "Bearer nope"}).models.list()


@needs_vllm
def test_server_completions(server):
    c = _client(server)
    raw = c.completions.with_raw_response.create(model=MODEL, prompt="Hello", max_tokens=5, n=2,
                                                 logprobs=2, **GEN)
    assert raw.headers["x-fp16-budget-applied"] == "0.05"
    out = raw.parse()
    assert len(out.choices) == 2 and out.usage.completion_tokens == 10
    for ch in out.choices:
        assert ch.finish_reason == "length" and len(ch.logprobs.tokens) == 5
        assert len(ch.logprobs.top_logprobs[0]) >= 2
    # streaming
    chunks = list(c.completions.create(model=MODEL, prompt="Hello", max_tokens=6, stream=True,
                                       **GEN))
    assert chunks[-1].choices[0].finish_reason == "length"
    # stop: a seeded sample, then the same request stopping at one of its ASCII characters
    kw = dict(model=MODEL, prompt="The quick brown fox", max_tokens=40, temperature=1.0,
              seed=1234, **GEN)
    text = c.completions.create(**kw).choices[0].text
    cut = next((i for i, ch in enumerate(text) if i > 0 and ch.isascii() and ch.isalnum()
                and ch not in text[:i]), None)
    if cut is None:
        pytest.skip(f"no usable stop character in {text!r}")
    stopped = c.completions.create(**kw, stop=[text[cut]]).choices[0]
    assert stopped.finish_reason == "stop" and stopped.text == text[:cut]


@needs_vllm
def test_server_chat(server):
    c = _client(server)
    msgs = [{"role": "user", "content": "Say something."}]
    raw = c.chat.completions.with_raw_response.create(
        model=MODEL, messages=msgs, max_tokens=4, n=2,
        extra_headers={"X-FP16-Budget": "0.25"}, **GEN)
    assert raw.headers["x-fp16-budget-applied"] == "0.25"
    out = raw.parse()
    assert len(out.choices) == 2 and out.usage.completion_tokens == 8
    chunks = list(c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4,
                                            stream=True, **GEN))
    assert chunks[-1].choices[0].finish_reason == "length"


@needs_vllm
def test_server_budget_precedence_clamp_and_metrics(server):
    c = _client(server)

    def applied(headers=None, **body):
        raw = c.completions.with_raw_response.create(
            model=MODEL, prompt="ab", max_tokens=1, extra_headers=headers or {},
            extra_body=body)
        return raw.headers["x-fp16-budget-applied"]

    assert applied() == "0.05"
    assert applied(fp16_budget=0.1) == "0.1"
    assert applied(vllm_xargs={"fp16_budget": 0.15}) == "0.15"
    assert applied({"X-FP16-Budget": "0.2"}, fp16_budget=0.1) == "0.2"
    assert applied({"X-FP16-Budget": "0.9"}) == "0.5"  # clamped to the cap
    assert applied({"X-FP16-Budget": "0"}, cache_salt="mine") == "0.0"
    text = _http(server, "GET", "/metrics").text
    assert "vllm:" in text  # vLLM's own series are still there
    assert 'thrift_vllm_requests_total{budget_bucket="0.25",source="header"}' in text
    assert "thrift_vllm_budget_clamped_total 1.0" in text

    # engine-side series (another process, multiprocess mode): realised FP16 block counts
    def series(name):
        return {line.split("{", 1)[1].split("}")[0]: float(line.rsplit(" ", 1)[1])
                for line in _http(server, "GET", "/metrics").text.splitlines()
                if line.startswith(name + "{")}

    def blocks():
        return series("thrift_vllm_fp16_blocks_total"), series("thrift_vllm_attention_blocks_total")

    f0, a0 = blocks()
    applied({"X-FP16-Budget": "0"})
    time.sleep(0.5)
    f1, a1 = blocks()
    key = 'budget_bucket="0.0"'
    assert a1[key] > a0.get(key, 0) and f1.get(key, 0) == f0.get(key, 0)
    applied({"X-FP16-Budget": "0.5"})  # one 64-token block: k = 1 = every candidate
    time.sleep(0.5)
    f2, a2 = blocks()
    key = 'budget_bucket="0.5"'
    assert f2[key] - f0.get(key, 0) == a2[key] - a0.get(key, 0) > 0
    assert "thrift_vllm_fp16_block_fraction" in _http(server, "GET", "/metrics").text


@needs_vllm
def test_server_budget_reaches_attention(server):
    """The applied budget changes the numbers (FP4 vs FP16 attention): it reached the backend."""
    c = _client(server)

    def top_logprobs(budget):
        out = c.completions.create(model=MODEL, prompt="attention " * 12, max_tokens=1,
                                   temperature=0, logprobs=5, extra_body={"ignore_eos": True},
                                   extra_headers={"X-FP16-Budget": budget})
        return out.choices[0].logprobs.top_logprobs[0]

    fp4, fp4_again, mixed = top_logprobs("0"), top_logprobs("0"), top_logprobs("0.5")
    assert fp4 == fp4_again
    assert fp4 != mixed


@needs_vllm
def test_server_prefix_cache_separated_by_budget(server):
    """Same prompt and budget: prefix-cache hits; another budget (or client salt): none."""
    c = _client(server)
    prompt = "0123456789abcdef" * 20  # 320 tokens: several full KV blocks

    def hits() -> float:
        text = _http(server, "GET", "/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("vllm:prefix_cache_hits_total"))

    def send(budget, salt="prefix-test"):
        c.completions.create(model=MODEL, prompt=prompt, max_tokens=1,
                             extra_headers={"X-FP16-Budget": budget},
                             extra_body={"cache_salt": salt})
        time.sleep(0.3)  # let the stats of the step reach the front end
        return hits()

    h0 = send("0.1")
    h1 = send("0.1")
    assert h1 > h0, "identical requests should hit the prefix cache"
    assert send("0.2") == h1, "another budget must not reuse the 0.1 blocks"
    assert send("0.1", salt="other-tenant") == h1, "the client's salt still separates"


@needs_vllm
def test_server_malformed_budgets_are_400(server):
    auth = ("Authorization", f"Bearer {KEY}")
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    # (httpx refuses to send a header value with leading/trailing spaces)
    cases = [([auth, ("X-FP16-Budget", v)], json.dumps(body)) for v in MALFORMED
             if v == v.strip()]
    cases.append(([auth, ("X-FP16-Budget", "0.1"), ("X-FP16-Budget", "0.2")], json.dumps(body)))
    for bad in ['"abc"', "NaN", "Infinity", "-0.1", "1.5", "true", "null", "[0.1]", '""']:
        cases.append(([auth], json.dumps(body)[:-1] + f', "fp16_budget": {bad}}}'))
        xargs = f', "vllm_xargs": {{"fp16_budget": {bad}}}}}'
        cases.append(([auth], json.dumps(body)[:-1] + xargs))
    for path in ("/v1/completions", "/v1/chat/completions"):
        for headers, content in cases:
            headers = [*headers, ("Content-Type", "application/json")]
            r = _http(server, "POST", path, headers=headers, content=content)
            assert r.status_code == 400, (path, headers[1:], content, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}
            assert "budget" in err["message"].lower(), err


@needs_vllm
def test_server_concurrent_streams_mixed_budgets(server):
    from openai import AsyncOpenAI

    async def one(client, i):
        budget = [0.0, 0.05, 0.25, 0.5][i % 4]
        stream = await client.completions.create(
            model=MODEL, prompt=f"request {i}", max_tokens=8, stream=True,
            extra_headers={"X-FP16-Budget": str(budget)}, extra_body={"ignore_eos": True})
        n, last = 0, None
        async for chunk in stream:
            n += 1
            last = chunk.choices[0].finish_reason or last
        return n, last

    async def main():
        client = AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0,
                             timeout=120)
        try:
            return await asyncio.gather(*(one(client, i) for i in range(32)))
        finally:
            await client.close()

    results = asyncio.run(main())
    assert all(last == "length" and n >= 1 for n, last in results), results


@needs_vllm
def test_server_client_disconnect_mid_stream(server):
    import httpx

    def aborted() -> int:  # vLLM logs aborts (--enable-log-requests); no metric counts them
        return Path(server.log).read_text(errors="replace").count("Aborted request")

    before = aborted()
    body = {"model": MODEL, "prompt": "long", "max_tokens": 480, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200
        for _ in r.iter_lines():
            break  # hang up after the first event
    deadline = time.monotonic() + 30
    while aborted() == before:  # vLLM saw the disconnect and aborted the request
        assert time.monotonic() < deadline, "the abandoned request was not aborted"
        time.sleep(0.2)
    out = _client(server).completions.create(model=MODEL, prompt="next", max_tokens=3, **GEN)
    assert out.choices[0].finish_reason == "length"
    assert server.proc.poll() is None


@needs_vllm
def test_server_sigterm_shuts_down_cleanly(server):
    """Last test of the module: it ends the shared server."""
    server.proc.send_signal(signal.SIGTERM)
    try:
        rc = server.proc.wait(60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"server still running 60 s after SIGTERM:\n{server.tail()}")
    assert rc == 0, server.tail()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the engine core process exits too
        try:
            os.killpg(server.proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    else:
        pytest.fail("processes of the server's group still alive 20 s after it exited")
