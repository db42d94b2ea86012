"""Per-request FP16 budgets at the HTTP edge: parse, validate, resolve, salt. No vLLM, no web
framework (the middleware and the tests call these directly).

Sources, highest first: the ``X-FP16-Budget`` header; ``fp16_budget`` in the JSON body (top level
or inside the route's engine arguments: ``vllm_xargs`` on the OpenAI routes,
``sampling_params.extra_args`` on ``/inference/v1/generate``; both present and different is an
error); the server default. One grammar for every text form (header, JSON string) and for the
literal text of a JSON number: ASCII ``[+-]digits[.digits][e[+-]digits]`` (or ``.digits``),
optionally surrounded by spaces/tabs, at most 32 characters, value in [0, 1]. Anything else
(unicode digits such as ``"٠.٢"``, ``nan``/``NaN``, ``inf``, hex, ``1_0``, empty, over-long
numbers, booleans, null, lists) is rejected. A valid value above the server cap is clamped to
the cap or rejected (``--budget-over-cap``). Every problem is a ``BudgetError`` (HTTP 400) whose
message names the source and the value.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from typing import Any

from thrift_vllm.backend.config import MAX_CACHE_SALT_LEN, budget_cache_salt

HEADER = "x-fp16-budget"
HEADER_DISPLAY = "X-FP16-Budget"
APPLIED_HEADER = "x-fp16-budget-applied"
BODY_KEY = "fp16_budget"
XARGS_KEY = "vllm_xargs"
SALT_KEY = "cache_salt"
OVER_CAP_MODES = ("clamp", "reject")
MAX_TEXT_LEN = 32
# vLLM's own cache_salt rules (vllm/entrypoints/generate/base/protocol.py: validate_cache_salt).
MAX_SALT_LEN = MAX_CACHE_SALT_LEN
SALT_FORBIDDEN = frozenset("@/\\\x00")

# ASCII only ([0-9], not \d: Python's \d and float() accept every unicode digit).
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)
_BLANK = " \t"  # HTTP's optional whitespace; nothing else is stripped (no NBSP, no newline)
# Where a route carries engine arguments (the budget goes there): a path of keys in the body.
XARGS_PATH = (XARGS_KEY,)
GENERATE_XARGS_PATH = ("sampling_params", "extra_args")


class BudgetError(ValueError):
    """A bad budget: HTTP 400 with ``param`` naming where it came from."""

    def __init__(self, message: str, param: str, code: str = "invalid_fp16_budget") -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


@dataclasses.dataclass(frozen=True)
class BudgetSettings:
    """Server-wide budget policy (from ``thrift-vllm serve`` flags)."""

    default: float = 0.05
    cap: float = 1.0
    over_cap: str = "clamp"

    def __post_init__(self) -> None:
        for name in ("default", "cap"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or not 0.0 <= v <= 1.0:
                raise ValueError(f"budget {name} must be a number in [0, 1], got {v!r}")
            object.__setattr__(self, name, float(v) + 0.0)
        if self.default > self.cap:
            raise ValueError(f"the default FP16 budget {self.default} is above the cap {self.cap}")
        if self.over_cap not in OVER_CAP_MODES:
            raise ValueError(f"over_cap must be one of {OVER_CAP_MODES}, got {self.over_cap!r}")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Resolution:
    budget: float
    source: str  # "header", "body" or "default"
    requested: float | None = None
    clamped: bool = False


def fmt(budget: float) -> str:
    """Canonical text of a budget (shortest round-trip repr: 0.05 -> "0.05")."""
    return repr(float(budget) + 0.0)


def _show(raw: Any) -> str:
    text = raw if isinstance(raw, str) else repr(raw)
    return repr(text[:MAX_TEXT_LEN] + "...") if len(text) > MAX_TEXT_LEN else repr(text)


def parse_text(raw: str | bytes, param: str) -> float:
    """A budget written as text (header, or a string in the body)."""
    if isinstance(raw, bytes):
        raw = raw.decode("latin-1")
    if len(raw) > MAX_TEXT_LEN:
        raise BudgetError(f"{param} is too long ({len(raw)} characters, at most {MAX_TEXT_LEN}): "
                          f"{_show(raw)}", param)
    text = raw.strip(_BLANK)
    if not text:
        raise BudgetError(f"{param} is empty; expected a number in [0, 1]", param)
    if not _DECIMAL.fullmatch(text):
        raise BudgetError(f"{param} must be a decimal number in [0, 1], got {_show(raw)}", param)
    return check_range(float(text), param, raw)


def check_range(value: float, param: str, raw: Any = None) -> float:
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        shown = _show(raw) if raw is not None else repr(value)
        raise BudgetError(f"{param} must be in [0, 1], got {shown}", param)
    return value + 0.0  # -0.0 -> 0.0


class _LongFloat(float):
    """A JSON number with a fraction or exponent whose literal text is over ``MAX_TEXT_LEN``
    characters: its value where it is not a budget (the body re-serialises unchanged), rejected
    where it is one. (A JSON integer that long is >= 1e32: out of range anyway.)"""

    length = 0


class TooLongNumber:
    """A JSON integer past Python's int-conversion limit (4300 digits): neither a budget nor
    serialisable (``json.dumps`` raises ``TypeError``, the middleware answers 400)."""

    def __init__(self, length: int) -> None:
        self.length = length


def _json_float(text: str) -> float:
    if len(text) <= MAX_TEXT_LEN:
        return float(text)
    out = _LongFloat(text)
    out.length = len(text)
    return out


def _json_int(text: str) -> int | TooLongNumber:
    try:
        return int(text)
    except ValueError:
        return TooLongNumber(len(text))


def loads(raw: bytes | str) -> Any:
    """``json.loads`` that remembers which non-integer numbers were written with over
    ``MAX_TEXT_LEN`` characters (so the body's budget obeys the text grammar's length limit)
    and does not fail on integers past Python's digit limit. Raises ``ValueError`` (or
    ``RecursionError``) on JSON that is not valid."""
    try:  # integers through json's own fast path (a 100K-token prompt is 100K of them)
        return json.loads(raw, parse_float=_json_float)
    except ValueError:  # not JSON, or an integer of over 4300 digits: once more to tell
        return json.loads(raw, parse_float=_json_float, parse_int=_json_int)


def parse_value(raw: Any, param: str) -> float:
    """A budget from JSON: a number, or a numeric string, both in the one grammar (module doc);
    bools, null, lists... are rejected."""
    if isinstance(raw, str):
        return parse_text(raw, param)
    if isinstance(raw, (_LongFloat, TooLongNumber)):
        raise BudgetError(f"{param} is too long ({raw.length} characters, at most "
                          f"{MAX_TEXT_LEN}); expected a number in [0, 1]", param)
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise BudgetError(f"{param} must be a number in [0, 1], got {_show(raw)}", param)
    try:
        value = float(raw)
    except OverflowError:  # a huge JSON integer
        raise BudgetError(f"{param} must be in [0, 1], got {_show(raw)}", param) from None
    return check_range(value, param, raw)


def header_budget(values: list[bytes] | list[str]) -> float | None:
    """The ``X-FP16-Budget`` header (all its raw values, as received) -> budget or None."""
    if not values:
        return None
    if len(values) > 1:
        raise BudgetError(f"{HEADER_DISPLAY} is repeated ({len(values)} times); send it once",
                          HEADER_DISPLAY)
    return parse_text(values[0], HEADER_DISPLAY)


def _engine_args(body: Mapping[str, Any], where: tuple[str, ...]) -> Mapping[str, Any] | None:
    """The mapping at ``where`` in ``body`` (None where a level is absent or null). A level of
    another type is a ``BudgetError`` (vLLM answers ``"vllm_xargs": [1]`` with 400 too; replacing
    it silently would run a request the client did not send)."""
    node: Any = body
    for i, key in enumerate(where):
        node = node.get(key)
        if node is None:
            return None
        if not isinstance(node, Mapping):
            name = ".".join(where[:i + 1])
            raise BudgetError(f"{name} must be a JSON object, got {_show(node)}", name,
                              code="invalid_request")
    return node


def body_budget(body: Mapping[str, Any], where: tuple[str, ...] = XARGS_PATH) -> float | None:
    """``fp16_budget`` at the top level and/or in the engine arguments at ``where``
    (``vllm_xargs``; ``sampling_params.extra_args`` on ``/inference/v1/generate``) -> budget or
    None. The containers on that path must be objects (or null)."""
    found: list[float] = []
    if BODY_KEY in body:
        found.append(parse_value(body[BODY_KEY], BODY_KEY))
    xargs = _engine_args(body, where)
    inner = ".".join((*where, BODY_KEY))
    if xargs is not None and BODY_KEY in xargs:
        found.append(parse_value(xargs[BODY_KEY], inner))
    if len(found) == 2 and found[0] != found[1]:
        raise BudgetError(f"{BODY_KEY} ({fmt(found[0])}) and {inner} ({fmt(found[1])}) "
                          "disagree; give one", BODY_KEY)
    return found[0] if found else None


def resolve(settings: BudgetSettings, header: float | None, body: float | None) -> Resolution:
    """Header wins over body, body over the default; then the cap (clamp or reject)."""
    if header is not None:
        requested, source = header, "header"
    elif body is not None:
        requested, source = body, "body"
    else:
        return Resolution(settings.default, "default")
    if requested > settings.cap:
        if settings.over_cap == "reject":
            param = HEADER_DISPLAY if source == "header" else BODY_KEY
            raise BudgetError(f"{param} {fmt(requested)} is above this server's cap "
                              f"{fmt(settings.cap)}", param, code="fp16_budget_over_cap")
        return Resolution(settings.cap, source, requested, clamped=True)
    return Resolution(requested, source, requested)


def salt_for(budget: float, client_salt: Any) -> Any:
    """The ``cache_salt`` that keeps prefix-cache blocks of different budgets apart, merged with
    the client's salt (``config.budget_cache_salt``: the engine writes the same token). A
    client salt vLLM would reject is returned as is (vLLM then answers 400 for it)."""
    if client_salt is not None and (
            not isinstance(client_salt, str) or not client_salt
            or len(client_salt) > MAX_SALT_LEN or any(c in SALT_FORBIDDEN for c in client_salt)):
        return client_salt
    return budget_cache_salt(budget, client_salt)


def rewrite_body(body: dict[str, Any], budget: float, salt: bool = True,
                 where: tuple[str, ...] = XARGS_PATH) -> dict[str, Any]:
    """A copy of the request body with the applied budget in the engine arguments at ``where``
    (created if absent; an absent outer level, e.g. a missing ``sampling_params``, is left for
    vLLM to reject), top-level ``fp16_budget`` removed and, when ``salt``, the per-budget
    ``cache_salt``. Call ``body_budget`` first (it rejects containers that are not objects)."""
    out = dict(body)
    out.pop(BODY_KEY, None)
    node = out
    for key in where[:-1]:
        inner = node.get(key)
        if not isinstance(inner, Mapping):
            node = None
            break
        node[key] = dict(inner)
        node = node[key]
    if node is not None:
        xargs = node.get(where[-1])
        xargs = dict(xargs) if isinstance(xargs, Mapping) else {}
        xargs[BODY_KEY] = budget
        node[where[-1]] = xargs
    if salt:
        out[SALT_KEY] = salt_for(budget, body.get(SALT_KEY))
    return out


def error_body(message: str, param: str | None, code: str | int = 400,
               type_: str = "BadRequestError") -> dict[str, Any]:
    """OpenAI's error JSON (the shape vLLM's own errors have)."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
