"""ASGI middleware in front of vLLM's OpenAI app (added through vLLM's ``--middleware`` list, so
it is the outermost layer). Per HTTP request, in this order:

1. API key (when configured): every path except ``/health`` (and CORS preflight ``OPTIONS``)
   needs ``Authorization: Bearer <key>``; otherwise 401 in OpenAI's error format. vLLM's own
   check guards only ``/v1``, ``/v2``, ``/inference``, ``/cohere`` (not ``/metrics``) and answers
   ``{"error": "Unauthorized"}``.
2. ``GET /v1/thrift/config``: the budget default, cap, over-cap policy and backend settings.
3. ``POST`` to a generation route (completions, chat completions, responses, messages): the body
   is read, the budget resolved (``budget.py``: header > body > default, cap), and the body
   rewritten with ``vllm_xargs.fp16_budget`` (which the backend's logits processor validates and
   carries to the attention builder) and a per-budget ``cache_salt``; ``Content-Length`` is fixed.
   A bad budget is a 400 in OpenAI's error format, never reaching vLLM. A body that is not a JSON
   object is passed on untouched (vLLM answers it).
4. Every response gets ``X-FP16-Budget-Applied``: the budget the request ran with (on other routes
   the server default; ``none`` on a budget 400).

After the body has been handed on, ``receive`` goes straight to the client's, so vLLM still sees a
client disconnect mid-stream and aborts the request.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from typing import Any

from thrift_vllm.server import budget as B  # noqa: N812

CONFIG_PATH = "/v1/thrift/config"
PUBLIC_PATHS = ("/health",)
BUDGET_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/chat/completions/batch",
                "/v1/responses", "/v1/messages", "/invocations")
SETTINGS_ENV = "THRIFT_VLLM_SERVER_SETTINGS"
MAX_BODY_BYTES = 64 * 1024 * 1024

_settings: dict[str, Any] | None = None


def configure(settings: dict[str, Any]) -> None:
    """Set this process's server settings (and the environment, for spawned API servers):
    ``{"budget": BudgetSettings.as_dict(), "api_keys": [...], "backend": {...}, ...}``."""
    global _settings
    _settings = settings
    os.environ[SETTINGS_ENV] = json.dumps(settings)


def update_config(values: dict[str, Any]) -> None:
    """Add entries (e.g. the KV capacity known once the engine is up) to the settings that
    ``GET /v1/thrift/config`` returns; takes effect for middleware built afterwards."""
    configure({**current_settings(), **values})


def current_settings() -> dict[str, Any]:
    if _settings is not None:
        return _settings
    raw = os.environ.get(SETTINGS_ENV)
    return json.loads(raw) if raw else {"budget": B.BudgetSettings().as_dict()}


def _json_response(status: int, payload: dict, extra_headers: list | None = None):
    body = json.dumps(payload).encode("utf-8")
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode()), *(extra_headers or [])]
    return ({"type": "http.response.start", "status": status, "headers": headers},
            {"type": "http.response.body", "body": body, "more_body": False})


class ThriftServerMiddleware:
    """Pure ASGI middleware; ``settings`` defaults to ``current_settings()``."""

    def __init__(self, app, settings: dict[str, Any] | None = None) -> None:
        self.app = app
        s = settings if settings is not None else current_settings()
        self.settings = s
        self.budget = B.BudgetSettings(**s.get("budget", {}))
        self.key_hashes = [hashlib.sha256(k.encode("utf-8")).digest()
                           for k in (s.get("api_keys") or []) if k]
        self.salt = bool(s.get("cache_salt", True))
        self.public_config = {
            "fp16_budget_default": self.budget.default,
            "fp16_budget_max": self.budget.cap,
            "budget_over_cap": self.budget.over_cap,
            "budget_header": B.HEADER_DISPLAY,
            "budget_body_keys": [B.BODY_KEY, f"{B.XARGS_KEY}.{B.BODY_KEY}"],
            "applied_header": "X-FP16-Budget-Applied",
            "per_budget_cache_salt": self.salt,
            **{k: v for k, v in s.items() if k not in ("budget", "api_keys", "cache_salt")},
        }
        try:
            from thrift_vllm.server import metrics

            metrics.set_settings(self.budget.default, self.budget.cap)
            self.metrics = metrics
        except Exception:  # prometheus_client missing: serve without the series
            self.metrics = None

    # --- helpers --------------------------------------------------------------------------
    def _authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        values = [v for k, v in headers if k.lower() == b"authorization"]
        if len(values) != 1:
            return False
        scheme, _, token = values[0].decode("latin-1").partition(" ")
        if scheme.lower() != "bearer":
            return False
        digest = hashlib.sha256(token.strip().encode("utf-8")).digest()
        ok = False
        for h in self.key_hashes:
            ok |= secrets.compare_digest(digest, h)
        return ok

    async def _send_json(self, send, status: int, payload: dict, applied: str) -> None:
        start, body = _json_response(status, payload, [(B.APPLIED_HEADER.encode(),
                                                        applied.encode())])
        await send(start)
        await send(body)

    def _count_rejected(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.count_rejected(reason)

    # --- ASGI -----------------------------------------------------------------------------
    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        method = scope.get("method", "GET")
        headers = scope.get("headers", [])
        default_text = B.fmt(self.budget.default)

        if self.key_hashes and method != "OPTIONS" and path not in PUBLIC_PATHS \
                and not self._authorized(headers):
            await self._send_json(send, 401, B.error_body(
                "Missing or invalid API key: send 'Authorization: Bearer <key>'", None,
                code=401, type_="AuthenticationError"), default_text)
            return

        if path == CONFIG_PATH and method == "GET":
            await self._send_json(send, 200, self.public_config, default_text)
            return

        if method == "POST" and path in BUDGET_PATHS:
            await self._budget_request(scope, receive, send, headers)
            return

        await self.app(scope, receive, _with_header(send, default_text))

    async def _budget_request(self, scope, receive, send, headers) -> None:
        # 1. the header (before reading the body: a bad header needs no body)
        try:
            header = B.header_budget([v for k, v in headers if k.lower() == B.HEADER.encode()])
        except B.BudgetError as e:
            self._count_rejected("header")
            await self._send_json(send, 400, B.error_body(e.message, e.param, e.code), "none")
            return
        # 2. the body
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                self._count_rejected("body_too_large")
                await self._send_json(send, 413, B.error_body(
                    f"request body over {MAX_BODY_BYTES} bytes", None, code=413), "none")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        try:
            body = json.loads(raw) if raw else None
        except (ValueError, RecursionError):
            body = None
        try:
            from_body = B.body_budget(body) if isinstance(body, dict) else None
            res = B.resolve(self.budget, header, from_body)
        except B.BudgetError as e:
            self._count_rejected("over_cap" if e.code == "fp16_budget_over_cap" else "body")
            await self._send_json(send, 400, B.error_body(e.message, e.param, e.code), "none")
            return
        if isinstance(body, dict):
            raw = json.dumps(B.rewrite_body(body, res.budget, self.salt)).encode("utf-8")
        if self.metrics is not None:
            self.metrics.count_request(res.budget, res.source, res.clamped)

        new_headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
        new_headers.append((b"content-length", str(len(raw)).encode()))
        scope = dict(scope, headers=new_headers)
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        await self.app(scope, replay, _with_header(send, B.fmt(res.budget)))


def _with_header(send, value: str):
    name = B.APPLIED_HEADER.encode()
    encoded = value.encode()

    async def wrapped(message) -> None:
        if message["type"] == "http.response.start":
            hs = [(k, v) for k, v in message.get("headers", []) if k.lower() != name]
            hs.append((name, encoded))
            message = dict(message, headers=hs)
        await send(message)

    return wrapped
