"""Issue 19 at the middleware, on a fake ASGI app (fast, no vLLM): the API key on every method and
path (a CORS preflight answered alone), vLLM's bearer rule, CORS / ``X-Request-Id`` / the exposed
budget header on the responses the middleware writes itself, ``/inference/v1/generate`` and the
default-budget routes under the budget policy, and one ASCII grammar for budget values (header,
body string, the literal text of a JSON number). The same cases over HTTP against a real server:
``tests/test_server_security.py``.
"""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from thrift_vllm.server import budget as B  # noqa: N812
from thrift_vllm.server import middleware as M  # noqa: N812

KEY = "sec-key-7f3a"
ENV_KEY = "env-key-b21c"  # VLLM_API_KEY in the server's environment (--api-key wins over it)
ORIGIN = "https://app.example"
CAP, DEFAULT = 0.5, 0.05
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "PROPFIND")
# Each not a budget in the one grammar (header text, body string, or literal JSON number text).
BAD_TEXT = ["\u0660.\u0662", "\uff10.\uff15", "\u0966", "0.5\u00a0", "\u20070.5", "0.1\n",
            "0x1", "1_0", "nan", "NaN", "-nan", "inf", "Infinity", "+inf", "1e", "e1", ".", "..1",
            "0.1.", "1/2", "\u00bd", "9" * 10_000, "0." + "0" * 10_000 + "1", "0.5 0.5"]
BAD_JSON_NUMBERS = ["NaN", "Infinity", "-Infinity", "0." + "0" * 10_000 + "1",
                    "1" + "0" * 5_000, "1e999"]
GOOD_TEXT = [("0.25", 0.25), (" 0.25\t", 0.25), (".5", 0.5), ("5e-1", 0.5), ("-0", 0.0),
             ("+1", 1.0), ("0.", 0.0), ("1E0", 1.0)]


# --- the budget grammar (pure) -----------------------------------------------------------------

def test_budget_grammar_one_for_header_and_body():
    for text, want in GOOD_TEXT:
        assert B.header_budget([text]) == want
        assert B.body_budget({"fp16_budget": text}) == want
        assert B.body_budget(B.loads(json.dumps({"vllm_xargs": {"fp16_budget": text}}))) == want
    for text in BAD_TEXT:
        with pytest.raises(B.BudgetError) as e:
            B.header_budget([text.encode("utf-8")])  # as a client would send it
        assert e.value.param == "X-FP16-Budget" and len(e.value.message) < 200
        with pytest.raises(B.BudgetError, match="fp16_budget") as e:
            B.body_budget(B.loads(json.dumps({"fp16_budget": text})))
        assert len(e.value.message) < 200
    for number in BAD_JSON_NUMBERS:  # the literal text of a JSON number obeys the same limits
        for raw in (f'{{"fp16_budget": {number}}}',
                    f'{{"vllm_xargs": {{"fp16_budget": {number}}}}}'):
            with pytest.raises(B.BudgetError) as e:
                B.body_budget(B.loads(raw))
            assert len(e.value.message) < 200
    # a long number elsewhere in the body is kept as it is (its value), a short one too
    body = B.loads('{"temperature": 0.' + "5" * 40 + ', "n": ' + "1" * 40 + ', "top_k": 3}')
    out = json.loads(json.dumps(B.rewrite_body(body, 0.25)))
    assert out["temperature"] == 0.5555555555555556 and out["n"] == int("1" * 40)
    assert out["top_k"] == 3 and type(out["top_k"]) is int


def test_engine_args_must_be_objects():
    for bad in ([1], "x", 5, True, [], 0.1):
        with pytest.raises(B.BudgetError) as e:
            B.body_budget({"vllm_xargs": bad})
        assert e.value.param == "vllm_xargs" and "object" in e.value.message
    assert B.body_budget({"vllm_xargs": None}) is None  # null is vLLM's default: allowed
    assert B.rewrite_body({"vllm_xargs": None}, 0.1)["vllm_xargs"] == {"fp16_budget": 0.1}
    gen = B.GENERATE_XARGS_PATH
    for body, param in [({"sampling_params": [1]}, "sampling_params"),
                        ({"sampling_params": {"extra_args": [1]}}, "sampling_params.extra_args")]:
        with pytest.raises(B.BudgetError) as e:
            B.body_budget(body, gen)
        assert e.value.param == param
    body = {"token_ids": [1], "sampling_params": {"max_tokens": 2,
                                                  "extra_args": {"fp16_budget": "0.3", "o": 1}}}
    assert B.body_budget(body, gen) == 0.3
    assert B.rewrite_body(body, 0.25, where=gen) == {
        "token_ids": [1], "cache_salt": "thrift-fp16-budget=0.25",
        "sampling_params": {"max_tokens": 2, "extra_args": {"fp16_budget": 0.25, "o": 1}}}
    assert body["sampling_params"]["extra_args"]["fp16_budget"] == "0.3"  # input unchanged
    # no sampling_params: left absent (vLLM answers 400 for the missing field)
    assert "sampling_params" not in B.rewrite_body({"token_ids": [1]}, 0.1, where=gen)
    with pytest.raises(B.BudgetError, match="disagree"):
        B.body_budget({"fp16_budget": 0.1, "sampling_params": {"extra_args": {
            "fp16_budget": 0.2}}}, gen)


# --- the middleware, on a fake ASGI app --------------------------------------------------------

def _settings(cors=True, request_ids=True, over_cap="clamp"):
    return {"budget": {"default": DEFAULT, "cap": CAP, "over_cap": over_cap},
            "api_keys": [KEY], "cache_salt": True,
            "cors": {"allow_origins": [ORIGIN] if cors else [], "allow_credentials": False,
                     "allow_methods": ["*"], "allow_headers": ["*"]},
            "request_id_headers": request_ids}


class FakeApp:
    """Records what reaches it; answers 200 with a secret body (as ``/metrics`` would)."""

    def __init__(self, cors_header: bool = False):
        self.calls: list[dict] = []
        self.cors_header = cors_header

    async def __call__(self, scope, receive, send):
        msg = await receive() if scope["method"] == "POST" else {"body": b""}
        self.calls.append({"path": scope["path"], "method": scope["method"],
                           "body": json.loads(msg["body"]) if msg.get("body") else None})
        headers = [(b"access-control-allow-origin", ORIGIN.encode())] if self.cors_header else []
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"SECRET route data"})


async def _call(mw, method, path, headers=(), body=b""):
    pending = [body]

    async def receive():
        if pending:
            return {"type": "http.request", "body": pending.pop(0), "more_body": False}
        return {"type": "http.disconnect"}

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "root_path": "",
             "headers": [(k.lower().encode(), v.encode("latin-1") if isinstance(v, str) else v)
                         for k, v in headers]}
    await mw(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    out = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    hdrs: dict[str, str] = {}
    for k, v in start["headers"]:
        hdrs[k.decode().lower()] = v.decode("latin-1")
    return start["status"], hdrs, out


def _run(mw, *a, **kw):
    return asyncio.run(_call(mw, *a, **kw))


AUTH = ("Authorization", f"Bearer {KEY}")
PATHS = ["/metrics", "/v1/models", "/v1/completions", "/v1/thrift/config", "/version", "/load",
         "/tokenize", "/inference/v1/generate", "/openapi.json", "/nowhere", "/metrics/x"]


def test_no_method_passes_without_the_key():
    for cors in (True, False):
        app = FakeApp()
        mw = M.ThriftServerMiddleware(app, settings=_settings(cors=cors))
        for path in PATHS:
            for method in METHODS:
                for headers in ([], [("Origin", ORIGIN)], [("Authorization", "Bearer wrong")]):
                    status, _, out = _run(mw, method, path, headers)
                    assert status == 401 and b"SECRET" not in out, (method, path, headers)
                    assert json.loads(out)["error"]["code"] == 401
                # a real preflight: the preflight headers, nothing from the route
                status, hdrs, out = _run(mw, "OPTIONS", path, [
                    ("Origin", ORIGIN), ("Access-Control-Request-Method", "POST")])
                assert b"SECRET" not in out
                if cors:
                    assert status == 200 and hdrs["access-control-allow-origin"] == ORIGIN
                    assert "POST" in hdrs["access-control-allow-methods"]
                else:
                    assert status == 401  # no CORS configured: no preflight to answer
                status, _, out = _run(mw, "OPTIONS", path, [  # another origin: refused
                    ("Origin", "https://evil.example"), ("Access-Control-Request-Method", "GET")])
                assert status in (400, 401) and b"SECRET" not in out
        assert app.calls == []
        status, _, out = _run(mw, "GET", "/health")  # the one public route
        assert status == 200 and len(app.calls) == 1

    async def websocket(headers):  # e.g. /v1/realtime: closed before accept (HTTP 403)
        sent, reached = [], []

        async def inner(scope, receive, send):
            reached.append(scope["path"])

        async def send(message):
            sent.append(message)

        await M.ThriftServerMiddleware(inner, settings=_settings())(
            {"type": "websocket", "path": "/v1/realtime", "headers": headers}, None, send)
        return sent, reached

    assert asyncio.run(websocket([])) == ([{"type": "websocket.close", "code": 1008}], [])
    assert asyncio.run(websocket([(b"authorization", f"Bearer {KEY}".encode())])) == (
        [], ["/v1/realtime"])


def test_one_bearer_rule():
    app = FakeApp()
    mw = M.ThriftServerMiddleware(app, settings=_settings())
    for value in (f"Bearer  {KEY}", f"Bearer {KEY} ", f"Bearer\t{KEY}", f"Bearer{KEY}", KEY,
                  f"Basic {KEY}", f"Bearer {KEY}\u00a0", f"Bearer {KEY[:-1]}", "Bearer "):
        status, _, out = _run(mw, "GET", "/v1/models", [("Authorization", value)])
        err = json.loads(out)["error"]
        assert status == 401 and set(err) == {"message", "type", "param", "code"}, value
    status, _, _ = _run(mw, "GET", "/v1/models", [AUTH, AUTH])  # repeated: refused
    assert status == 401 and app.calls == []
    for value in (f"Bearer {KEY}", f"bearer {KEY}", f"BEARER {KEY}"):  # vLLM's rule: accepted
        assert _run(mw, "GET", "/v1/models", [("Authorization", value)])[0] == 200


def check_cors_and_id(hdrs, request_id=None):
    assert hdrs["access-control-allow-origin"] == ORIGIN
    exposed = [x.strip().lower() for x in hdrs["access-control-expose-headers"].split(",")]
    assert "x-fp16-budget-applied" in exposed
    if request_id is None:
        assert re.fullmatch(r"[0-9a-f]{32}", hdrs["x-request-id"])
    else:
        assert hdrs["x-request-id"] == request_id


def test_own_responses_carry_cors_and_request_id(monkeypatch):
    monkeypatch.setattr(M, "MAX_BODY_BYTES", 10_000)
    app = FakeApp()
    mw = M.ThriftServerMiddleware(app, settings=_settings())
    reject = M.ThriftServerMiddleware(app, settings=_settings(over_cap="reject"))
    o = ("Origin", ORIGIN)
    cases = [
        (mw, "GET", "/metrics", [o], b"", 401),
        (mw, "POST", "/v1/completions", [o, AUTH, ("X-FP16-Budget", "abc")], b"{}", 400),
        (mw, "POST", "/v1/completions", [o, AUTH], b'{"fp16_budget": "\xd9\xa0"}', 400),
        (mw, "POST", "/v1/completions", [o, AUTH], b'{"vllm_xargs": [1]}', 400),
        (mw, "POST", "/v1/completions", [o, AUTH], b'{"prompt": ', 400),
        (mw, "POST", "/v1/completions", [o, AUTH], b'{"n": ' + b"1" * 5000 + b"}", 400),
        (reject, "POST", "/v1/completions", [o, AUTH, ("X-FP16-Budget", "0.9")], b"{}", 400),
        (mw, "POST", "/v1/completions", [o, AUTH], b"{" + b" " * 20_000 + b"}", 413),
        (mw, "POST", "/v1/completions", [o, AUTH, ("Content-Length", "10001")], b"{}", 413),
        (mw, "GET", "/v1/thrift/config", [o, AUTH], b"", 200),
    ]
    for m, method, path, headers, body, want in cases:
        status, hdrs, out = _run(m, method, path, headers, body)
        assert status == want, (path, headers, body[:40], out)
        check_cors_and_id(hdrs)
        if status != 200:
            assert set(json.loads(out)["error"]) == {"message", "type", "param", "code"}
        status, hdrs, _ = _run(m, method, path, [*headers, ("X-Request-Id", "abc-1")], body)
        assert hdrs["x-request-id"] == "abc-1"
    assert app.calls == []
    # vLLM's own (passed-through) CORS responses get the budget header exposed
    inner = M.ThriftServerMiddleware(FakeApp(cors_header=True), settings=_settings())
    _, hdrs, _ = _run(inner, "POST", "/v1/completions", [o, AUTH], b"{}")
    assert "x-fp16-budget-applied" in hdrs["access-control-expose-headers"].lower()
    # without --allowed-origins / --enable-request-id-headers: neither, as vLLM
    plain = M.ThriftServerMiddleware(app, settings=_settings(cors=False, request_ids=False))
    _, hdrs, _ = _run(plain, "GET", "/metrics", [o])
    assert "access-control-allow-origin" not in hdrs and "x-request-id" not in hdrs


def test_every_engine_route_under_the_budget_policy():
    app = FakeApp()
    mw = M.ThriftServerMiddleware(app, settings=_settings())
    gen = {"token_ids": [1, 2], "sampling_params": {"max_tokens": 1,
                                                    "extra_args": {"fp16_budget": 0.9}}}
    status, hdrs, _ = _run(mw, "POST", "/inference/v1/generate", [AUTH], json.dumps(gen).encode())
    assert status == 200 and hdrs["x-fp16-budget-applied"] == "0.5"  # capped
    seen = app.calls[-1]["body"]
    assert seen["sampling_params"]["extra_args"]["fp16_budget"] == 0.5
    assert seen["cache_salt"] == "thrift-fp16-budget=0.5"
    _run(mw, "POST", "/inference/v1/generate", [AUTH, ("X-FP16-Budget", "0.1")],
         json.dumps(gen).encode())
    assert app.calls[-1]["body"]["sampling_params"]["extra_args"]["fp16_budget"] == 0.1
    for bad in ({"token_ids": [1], "sampling_params": {"extra_args": {"fp16_budget": "nan"}}},
                {"token_ids": [1], "sampling_params": {"extra_args": [1]}},
                {"token_ids": [1], "sampling_params": [1]}):
        n = len(app.calls)
        status, _, out = _run(mw, "POST", "/inference/v1/generate", [AUTH],
                              json.dumps(bad).encode())
        assert status == 400 and len(app.calls) == n, bad
    # routes whose sampling parameters vLLM builds: the default (salted), a named budget is 400
    for path in M.DEFAULT_BUDGET_PATHS:
        status, hdrs, _ = _run(mw, "POST", path, [AUTH], b'{"state": "s"}')
        assert status == 200 and hdrs["x-fp16-budget-applied"] == "0.05"
        assert app.calls[-1]["body"] == {"state": "s", "cache_salt": "thrift-fp16-budget=0.05"}
        for headers, body in [([("X-FP16-Budget", "0.1")], b"{}"), ([], b'{"fp16_budget": 0.1}'),
                              ([], b'{"vllm_xargs": {"fp16_budget": 0.1}}')]:
            n = len(app.calls)
            status, _, out = _run(mw, "POST", path, [AUTH, *headers], body)
            assert status == 400 and len(app.calls) == n
            assert json.loads(out)["error"]["code"] == "fp16_budget_unsupported_route"


def test_budget_without_effect_is_said_on_every_response():
    """Where the engine's routes make budgets meaningless (nvfp4 layout, fp16 decode, flash
    prefill: backend.fp16_budget_has_effect false), every response says so and the config
    route explains why; otherwise no such header."""
    text = "fp16_budget has no effect with the nvfp4 layout, ..."
    for has_effect in (True, False):
        s = dict(_settings(), backend={"fp16_budget_has_effect": has_effect,
                                       "fp16_budget_effect": text})
        mw = M.ThriftServerMiddleware(FakeApp(cors_header=True), s)
        body = json.dumps({"model": "m", "prompt": "x", "fp16_budget": 0.3}).encode()
        _, hdrs, _ = _run(mw, "POST", "/v1/completions", [AUTH, ("Origin", ORIGIN)], body)
        assert hdrs["x-fp16-budget-applied"] == "0.3"
        assert hdrs.get("x-fp16-budget-effect") == (None if has_effect else "none")
        exposed = hdrs["access-control-expose-headers"].lower()
        assert "x-fp16-budget-effect" in exposed and "x-fp16-budget-applied" in exposed
        _, hdrs, cfg = _run(mw, "GET", "/v1/thrift/config", [AUTH])
        assert hdrs.get("x-fp16-budget-effect") == (None if has_effect else "none")
        assert json.loads(cfg)["backend"]["fp16_budget_effect"] == text
