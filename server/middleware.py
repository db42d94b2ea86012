"""ASGI middleware in front of vLLM's OpenAI app (added through vLLM's ``--middleware`` list, so
it is the outermost layer: outside vLLM's CORS, API-key and request-id middleware). Per request:

1. API key (when configured): every path except ``/health``, whatever the method (GET, HEAD,
   POST, OPTIONS, any other) and websockets too, needs exactly ``Authorization: Bearer <key>``
   (vLLM's own rule: one space, scheme case-insensitive, nothing stripped, so vLLM's check, still
   on behind this one, never answers differently); otherwise 401 in OpenAI's error format. The
   one exception is a real CORS preflight (``OPTIONS`` with ``Origin`` and
   ``Access-Control-Request-Method``) while ``--allowed-origins`` is set: it is answered here with
   the preflight headers only and never reaches a route (browsers send no key with it). vLLM's
   check guards only ``/v1``, ``/v2``, ``/inference``, ``/cohere`` and lets every ``OPTIONS``
   through, which on ``/metrics`` (it answers any method) gave the whole body without a key.
2. ``GET /v1/thrift/config``: the budget default, cap, over-cap policy and backend settings.
3. ``POST`` to a route that reaches the engine:
   - generation routes (completions, chat completions and their batch, responses, messages,
     SageMaker ``/invocations``) and ``/inference/v1/generate`` (on with ``--enable-scale-out``
     or ``--tokens-only``): the body is read, the budget resolved (``budget.py``: header > body >
     default, cap), the body rewritten with the budget in the route's engine arguments
     (``vllm_xargs.fp16_budget``; ``sampling_params.extra_args.fp16_budget``), which the
     backend's logits processor validates and carries to the attention builder, and a
     per-budget ``cache_salt``; ``Content-Length`` is fixed;
   - ``/v1/systemone`` and ``/generative_scoring`` build their sampling parameters in vLLM, with
     no engine arguments: they run at the server default (salted for it), and a request that
     names a budget is a 400.
   A bad budget or a body that is not valid JSON is a 400 in OpenAI's error format, never
   reaching vLLM; a body over 64 MiB (announced or sent) a 413. A JSON body that is not an object
   is passed on untouched (vLLM answers it).
4. Every response gets ``X-FP16-Budget-Applied``: the budget the request ran with (on other routes
   the server default; ``none`` on a budget 400); where a response carries
   ``Access-Control-Allow-Origin``, ``X-FP16-Budget-Applied`` is added to
   ``Access-Control-Expose-Headers`` (else browser code cannot read it).

The responses written here (401, 400, 413, the config, preflights) go through Starlette's CORS
middleware built from vLLM's own ``--allowed-origins`` / ``--allow-credentials`` /
``--allowed-methods`` / ``--allowed-headers`` and get ``X-Request-Id`` with
``--enable-request-id-headers``, as vLLM's own responses do.

After the body has been handed on, ``receive`` goes straight to the client's, so vLLM still sees a
client disconnect mid-stream and aborts the request.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import uuid
from typing import Any

from starlette.middleware.cors import CORSMiddleware
from thrift_vllm.server import budget as B  # noqa: N812

CONFIG_PATH = "/v1/thrift/config"
PUBLIC_PATHS = ("/health",)
# POST routes that reach the engine -> where their body carries engine arguments.
BUDGET_ROUTES: dict[str, tuple[str, ...]] = {
    **{p: B.XARGS_PATH for p in ("/v1/completions", "/v1/chat/completions",
                                 "/v1/chat/completions/batch", "/v1/responses",
                                 "/v1/messages", "/invocations")},
    "/inference/v1/generate": B.GENERATE_XARGS_PATH,
}
BUDGET_PATHS = tuple(BUDGET_ROUTES)
# POST routes that reach the engine with sampling parameters vLLM builds (no engine arguments).
DEFAULT_BUDGET_PATHS = ("/v1/systemone", "/generative_scoring")
MAX_BODY_BYTES = 64 * 1024 * 1024
REQUEST_ID = b"x-request-id"
APPLIED_DISPLAY = "X-FP16-Budget-Applied"
_APPLIED = B.APPLIED_HEADER.encode()
EFFECT_DISPLAY = "X-FP16-Budget-Effect"  # "none": see /v1/thrift/config backend.fp16_budget_effect
_EFFECT = EFFECT_DISPLAY.lower().encode()
_EXPOSE = b"access-control-expose-headers"
# Settings not shown by GET /v1/thrift/config (the keys above all).
_PRIVATE = ("budget", "api_keys", "cache_salt", "cors", "request_id_headers")

_settings: dict[str, Any] | None = None


def configure(settings: dict[str, Any]) -> None:
    """Set this process's server settings: ``{"budget": BudgetSettings.as_dict(), "api_keys":
    [...], "cache_salt": bool, "cors": {allow_origins, allow_credentials, allow_methods,
    allow_headers} | None, "request_id_headers": bool, "backend": {...}, ...}``. Held in this
    process only (the API server, where vLLM builds the middleware): never put in the
    environment, which the engine's processes inherit (the keys would be readable in
    ``/proc/<pid>/environ``)."""
    global _settings
    _settings = settings


def update_config(values: dict[str, Any]) -> None:
    """Add entries (e.g. the KV capacity known once the engine is up) to the settings that
    ``GET /v1/thrift/config`` returns; takes effect for middleware built afterwards."""
    configure({**current_settings(), **values})


def current_settings() -> dict[str, Any]:
    if _settings is not None:
        return _settings
    return {"budget": B.BudgetSettings().as_dict()}


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for k, v in headers if k.lower() == name]


def _json_app(status: int, payload: dict, applied: str, no_effect: bool = False):
    body = json.dumps(payload).encode("utf-8")
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode()), (_APPLIED, applied.encode())]
    if no_effect:
        headers.append((_EFFECT, b"none"))

    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return app


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
        cors = s.get("cors") or {}
        # CORS is on when origins are allowed (vLLM always adds its CORS middleware; with no
        # origin it refuses every cross-origin request, so there is nothing to mirror).
        self.cors = dict(cors, expose_headers=[APPLIED_DISPLAY, EFFECT_DISPLAY]) \
            if cors.get("allow_origins") else None
        self.request_ids = bool(s.get("request_id_headers", False))
        # The engine's routes make budgets meaningless (nvfp4 layout, fp16 decode, flash
        # prefill: config.budget_effect): every response says so, next to the applied value.
        self.no_effect = (s.get("backend") or {}).get("fp16_budget_has_effect") is False
        self.public_config = {
            "fp16_budget_default": self.budget.default,
            "fp16_budget_max": self.budget.cap,
            "budget_over_cap": self.budget.over_cap,
            "budget_header": B.HEADER_DISPLAY,
            "budget_body_keys": [B.BODY_KEY, f"{B.XARGS_KEY}.{B.BODY_KEY}"],
            "applied_header": APPLIED_DISPLAY,
            "per_budget_cache_salt": self.salt,
            **{k: v for k, v in s.items() if k not in _PRIVATE},
        }
        try:
            from thrift_vllm.server import metrics

            metrics.set_settings(self.budget.default, self.budget.cap)
            self.metrics = metrics
        except Exception:  # prometheus_client missing: serve without the series
            self.metrics = None

    # --- helpers --------------------------------------------------------------------------
    def _authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        values = _header(headers, b"authorization")
        if len(values) != 1:
            return False
        # As vLLM's AuthenticationMiddleware: "<scheme> <token>", split at the first space,
        # token compared as sent. "Bearer  K" (two spaces) is the token " K": refused by both.
        scheme, _, token = values[0].decode("latin-1").partition(" ")
        if scheme.lower() != "bearer":
            return False
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        ok = False
        for h in self.key_hashes:
            ok |= secrets.compare_digest(digest, h)
        return ok

    def _wrap_own(self, app, scope):
        """``app`` (a response written here) behind the same CORS and request-id layers as
        vLLM's own responses."""
        if self.request_ids:
            app = _with_request_id(app, scope)
        if self.cors is not None:
            app = CORSMiddleware(app, **self.cors)
        return app

    async def _send_json(self, scope, receive, send, status: int, payload: dict,
                         applied: str) -> None:
        await self._wrap_own(_json_app(status, payload, applied, self.no_effect), scope)(
            scope, receive, send)

    async def _error(self, scope, receive, send, status: int, e: B.BudgetError | str,
                     reason: str | None = None, **kw) -> None:
        if reason is not None and self.metrics is not None:
            self.metrics.count_rejected(reason)
        if isinstance(e, B.BudgetError):
            payload = B.error_body(e.message, e.param, e.code)
        else:
            payload = B.error_body(e, None, **kw)
        await self._send_json(scope, receive, send, status, payload, "none")

    # --- ASGI -----------------------------------------------------------------------------
    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        headers = scope.get("headers", [])
        if scope["type"] == "websocket":
            if self.key_hashes and path not in PUBLIC_PATHS and not self._authorized(headers):
                await send({"type": "websocket.close", "code": 1008})  # before accept: HTTP 403
                return
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "GET")
        default_text = B.fmt(self.budget.default)

        if self.key_hashes and path not in PUBLIC_PATHS and not self._authorized(headers):
            # Through the CORS layer of _wrap_own: a real preflight (CORS configured) gets
            # Starlette's preflight response, the 401 never being called; anything else the 401.
            await self._send_json(scope, receive, send, 401, B.error_body(
                "Missing or invalid API key: send 'Authorization: Bearer <key>'", None,
                code=401, type_="AuthenticationError"), default_text)
            return

        if path == CONFIG_PATH and method == "GET":
            await self._send_json(scope, receive, send, 200, self.public_config, default_text)
            return

        if method == "POST" and (path in BUDGET_ROUTES or path in DEFAULT_BUDGET_PATHS):
            await self._budget_request(scope, receive, send, headers, BUDGET_ROUTES.get(path))
            return

        await self.app(scope, receive, _with_header(send, default_text, self.no_effect))

    async def _read_body(self, scope, receive, send, headers) -> bytes | None:
        """The whole request body, or None after answering (413) or a disconnect."""
        announced = _header(headers, b"content-length")
        if len(announced) == 1 and announced[0].strip().isdigit() \
                and int(announced[0]) > MAX_BODY_BYTES:  # refused before reading it
            await self._error(scope, receive, send, 413, f"request body over {MAX_BODY_BYTES} "
                              "bytes", "body_too_large", code=413)
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                await self._error(scope, receive, send, 413, f"request body over "
                                  f"{MAX_BODY_BYTES} bytes", "body_too_large", code=413)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _budget_request(self, scope, receive, send, headers,
                              where: tuple[str, ...] | None) -> None:
        """``where``: the engine arguments' place in the body; None: a route without them."""
        # 1. the header (before reading the body: a bad header needs no body)
        try:
            header = B.header_budget(_header(headers, B.HEADER.encode()))
        except B.BudgetError as e:
            await self._error(scope, receive, send, 400, e, "header")
            return
        # 2. the body
        raw = await self._read_body(scope, receive, send, headers)
        if raw is None:
            return
        try:
            body = B.loads(raw) if raw else None
        except (ValueError, RecursionError) as e:
            # vLLM would answer it too, but a body it could read differently must not skip
            # the budget policy: answered here.
            await self._error(scope, receive, send, 400, f"request body is not valid JSON "
                              f"({type(e).__name__}: {str(e)[:120]})", "body")
            return
        try:
            if where is None:
                xargs = body.get(B.XARGS_KEY) if isinstance(body, dict) else None
                given = header is not None or (isinstance(body, dict) and B.BODY_KEY in body) \
                    or (isinstance(xargs, dict) and B.BODY_KEY in xargs)
                if given:
                    raise B.BudgetError(
                        f"{scope['path']} runs at the server's default FP16 budget "
                        f"({B.fmt(self.budget.default)}): vLLM builds its sampling parameters, "
                        f"so {B.HEADER_DISPLAY} / {B.BODY_KEY} cannot reach the engine; send "
                        "none", B.HEADER_DISPLAY if header is not None else B.BODY_KEY,
                        code="fp16_budget_unsupported_route")
                from_body = None
            else:
                from_body = B.body_budget(body, where) if isinstance(body, dict) else None
            res = B.resolve(self.budget, header, from_body)
        except B.BudgetError as e:
            reason = "over_cap" if e.code == "fp16_budget_over_cap" else "body"
            await self._error(scope, receive, send, 400, e, reason)
            return
        if isinstance(body, dict):
            if where is None:
                out = dict(body)
                if self.salt:
                    out[B.SALT_KEY] = B.salt_for(res.budget, body.get(B.SALT_KEY))
            else:
                out = B.rewrite_body(body, res.budget, self.salt, where)
            try:
                raw = json.dumps(out).encode("utf-8")
            except (TypeError, ValueError):  # an integer past Python's digit limit
                await self._error(scope, receive, send, 400, "request body holds a number "
                                  "too long to read", "body")
                return
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

        await self.app(scope, replay, _with_header(send, B.fmt(res.budget), self.no_effect))


def _with_header(send, value: str, no_effect: bool = False):
    """``send`` that sets ``X-FP16-Budget-Applied`` (and ``X-FP16-Budget-Effect: none`` when
    the engine's routes make budgets meaningless) and, on a CORS response, exposes it."""
    encoded = value.encode()

    async def wrapped(message) -> None:
        if message["type"] == "http.response.start":
            hs = [(k, v) for k, v in message.get("headers", [])
                  if k.lower() not in (_APPLIED, _EFFECT)]
            hs.append((_APPLIED, encoded))
            if no_effect:
                hs.append((_EFFECT, b"none"))
            if any(k.lower() == b"access-control-allow-origin" for k, _ in hs):
                hs = _exposed(hs)
            message = dict(message, headers=hs)
        await send(message)

    return wrapped


def _exposed(hs: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    current = [v for k, v in hs if k.lower() == _EXPOSE]
    listed = {x.strip().lower() for v in current for x in v.split(b",")}
    missing = [d.encode() for d in (APPLIED_DISPLAY, EFFECT_DISPLAY)
               if d.lower().encode() not in listed]
    if not missing or b"*" in listed:
        return hs
    merged = b", ".join([*(v for v in current if v.strip()), *missing])
    return [*((k, v) for k, v in hs if k.lower() != _EXPOSE), (_EXPOSE, merged)]


def _with_request_id(app, scope):
    """As vLLM's ``XRequestIdMiddleware``: the request's ``X-Request-Id``, else a random one."""
    given = _header(scope.get("headers", []), REQUEST_ID)
    request_id = given[0] if given else uuid.uuid4().hex.encode()

    async def wrapped(scope, receive, send) -> None:
        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", []),
                                                 (REQUEST_ID, request_id)])
            await send(message)

        await app(scope, receive, send_with_id)

    return wrapped
