"""Server-wide settings of the ThriftAttention vLLM backend: one dataclass, validated on creation.

Where the values come from (in this order, later wins):
1. the dataclass defaults below;
2. environment variables ``THRIFT_VLLM_<FIELD>`` (e.g. ``THRIFT_VLLM_FP16_BUDGET=0.1``), read in
   exactly one place, ``_env_values``; they reach every engine and worker process because vLLM's
   processes inherit the environment;
3. vLLM's ``additional_config["thrift_vllm"]`` (``LLM(..., additional_config={"thrift_vllm":
   {"fp16_budget": 0.1}})`` or ``--additional-config '{"thrift_vllm": {...}}'``), which travels
   inside the VllmConfig to every process.

Unknown keys and bad values raise ``ValueError`` naming them. This module does not import vLLM.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import numbers
import os
from collections.abc import Mapping
from typing import Any

from thrift_vllm.api import BLOCK_SIZES, IMPLS
from thrift_vllm.formats import check_format
from thrift_vllm.selection import BlockGrid, budget_to_k, check_selection

ADDITIONAL_CONFIG_KEY = "thrift_vllm"
ENV_PREFIX = "THRIFT_VLLM_"
# Prefill's FP4-block arithmetic on the Triton path: bf16 (exact, any GPU), fp8 (Hopper's fast
# approximation), native (Blackwell's block-scaled MMA on the packed pages, exact, auto layout).
BACKEND_BULK_MATHS = ("bf16", "fp8", "native")
# Prefill route: flash = exact attention through vLLM's FlashAttention (FP4 pages still written);
# thrift = the FP4 prefill semantics with bulk_math; auto = flash where it runs (Hopper FA3).
PREFILLS = ("auto", "flash", "thrift")
# Decode arithmetic: fp4 = the paper's semantics (q and P quantised to FP4: what FP4 tensor cores
# compute), fp16 = FP4 as storage (K/V decoded, q and P in the model dtype); auto = fp4 where the
# decode runs on FP4 MMAs (sm_120), fp16 elsewhere (Hopper, sm_100, CPU).
DECODE_MATHS = ("auto", "fp4", "fp16")


def check_budget(value: Any, what: str = "fp16_budget") -> float:
    """``value`` as a float in [0, 1]; bools, strings, None and NaN raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} must be a number in [0, 1], got {value!r}")
    f = float(value)
    if math.isnan(f) or not 0.0 <= f <= 1.0:
        raise ValueError(f"{what} must be in [0, 1], got {value!r}")
    return f


@dataclasses.dataclass(frozen=True)
class ThriftBackendConfig:
    """Defaults applied to every request (a request may override ``fp16_budget`` later)."""

    fp16_budget: float = 0.05
    """Share of candidate blocks computed in FP16 (0 = all FP4, 1 = exact)."""
    selection: str = "block_mean"
    """Block scorer: ``block_mean``, ``quest`` or ``local`` (thrift_vllm.selection)."""
    quant_format: str = "nvfp4"
    """FP4 format of the bulk blocks: ``nvfp4`` or ``mxfp4``."""
    block_size: int = 64
    """Selection unit / kernel tile in tokens (32, 64, 128); independent of vLLM's page size."""
    impl: str = "auto"
    """Kernel path: ``auto`` (Triton kernels on CUDA devices, the PyTorch path elsewhere),
    ``torch`` (the PyTorch path everywhere), ``triton`` (the kernels everywhere; on CPU only
    under ``TRITON_INTERPRET=1``, for tests)."""
    bulk_math: str = "bf16"
    """Arithmetic of the FP4 blocks in the ``thrift`` prefill route (Triton path): ``bf16`` (the
    exact FP4 semantics) or ``fp8`` (e4m3 operands, P in e4m3: Hopper's fast path, approximate —
    on the embedded model thrift 5 % recovers 93 % of the FP4 gap with it instead of 95 %), or
    ``native`` (Blackwell: the packed pages straight into the block-scaled MMA, exact; the
    ``auto`` KV layout only). Decode arithmetic is ``decode_math``'s; the PyTorch path computes
    ``bf16`` only."""
    cuda_graphs: bool = True
    """Declare FULL CUDA graphs for pure-decode batches (``UNIFORM_SINGLE_TOKEN_DECODE``) on the
    Triton path: the builder keeps the decode inputs in persistent buffers. On by default since
    it passed the GPU correctness check inside CUDA vLLM 0.26 (``vllm_gpu_check.py
    --full-decode-graphs``: greedy, teacher-forced, prefix hits, preemption; BENCHMARKS.md) and
    decodes up to 3.8x faster than piecewise at 16 x 8K; ``false``: vLLM captures the model
    piecewise and runs attention eagerly between the pieces."""
    budget_cache_salt: bool = True
    """Fold each request's budget into its prefix-cache salt (``budget_route``): blocks written
    at one budget are never read at another. ``false`` shares them (a warning at start when
    prefix caching is on); ``thrift-vllm serve --no-budget-cache-salt`` sets it."""

    prefill: str = "auto"
    """Prefill (query chunks longer than one token) route: ``flash`` computes the prompt's
    attention exactly with vLLM's FlashAttention-3 (``vllm.vllm_flash_attn``; Hopper): the
    ``auto`` layout's model-dtype K/V read in place, the ``nvfp4`` layout's context decoded from
    the pages and the chunk's own K/V fresh; the FP4 pages and summaries are written as always.
    ``thrift``: the FP4 prefill semantics with ``bulk_math``. ``auto``: ``flash`` where it runs
    and ``bulk_math`` is ``bf16``, else ``thrift`` (CPU, other GPUs, builds without FA3); the
    engine logs which at start."""
    decode_math: str = "auto"
    """Decode arithmetic: ``fp4`` (the paper's exact semantics: q and P quantised to FP4, as FP4
    tensor cores compute), ``fp16`` (FP4 as storage: K/V decoded from the pages, q and P in the
    model dtype — fewer ALU operations and smaller error on GPUs without FP4 MMAs), ``auto``:
    ``fp4`` on sm_120 (block-scaled FP4 MMA in decode), ``fp16`` everywhere else."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "fp16_budget", check_budget(self.fp16_budget))
        check_selection(self.selection)
        check_format(self.quant_format)
        if isinstance(self.block_size, bool) or self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {self.block_size!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if self.bulk_math not in BACKEND_BULK_MATHS:
            raise ValueError(f"bulk_math must be one of {BACKEND_BULK_MATHS}, got "
                             f"{self.bulk_math!r}")
        if self.bulk_math != "bf16" and self.impl == "torch":
            raise ValueError(f"bulk_math {self.bulk_math!r} runs on the Triton kernels only; "
                             "impl 'torch' computes the exact FP4 semantics (bulk_math 'bf16')")
        if self.prefill not in PREFILLS:
            raise ValueError(f"prefill must be one of {PREFILLS}, got {self.prefill!r}")
        if self.decode_math not in DECODE_MATHS:
            raise ValueError(f"decode_math must be one of {DECODE_MATHS}, got "
                             f"{self.decode_math!r}")
        if self.prefill == "flash" and self.bulk_math != "bf16":
            raise ValueError(f"bulk_math {self.bulk_math!r} has no effect with prefill 'flash' "
                             "(exact attention, no FP4 blocks): use prefill 'thrift' or 'auto'")
        for name in ("cuda_graphs", "budget_cache_salt"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")

    def uses_triton(self, device_type: str) -> bool:
        """The Triton kernels run for impl "triton", or "auto" on a CUDA device."""
        return self.impl == "triton" or (self.impl == "auto" and device_type == "cuda")

    def bulk_math_problem(self, device_type: str,
                          capability: tuple[int, int] | None = None) -> str | None:
        """Why ``bulk_math`` cannot run on ``device_type`` (of compute ``capability`` on CUDA):
        fp8 and native exist on the Triton path only, native needs Blackwell's block-scaled
        MMA; None when it can. The metadata builder raises it at engine start, not at the
        first prefill."""
        if self.bulk_math != "bf16" and not self.uses_triton(device_type):
            return (f"bulk_math {self.bulk_math!r} needs the Triton path (impl 'triton', or "
                    f"'auto' on CUDA); impl {self.impl!r} on {device_type} runs the PyTorch path")
        if self.bulk_math == "native" and capability is not None and capability[0] < 10:
            return (f"bulk_math 'native' needs a Blackwell GPU (sm_100 / sm_120, block-scaled "
                    f"FP4 MMA); this one is sm_{capability[0]}{capability[1]}: use 'bf16' or "
                    f"'fp8'")
        return None

    def resolve_prefill(self, flash_problem: str | None) -> str:
        """The prefill route this engine runs: ``flash`` or ``thrift``. ``flash_problem``: why
        vLLM's FlashAttention cannot run here (None when it can). An explicit ``flash`` that
        cannot run raises ValueError at engine start; ``auto`` keeps ``thrift`` where a
        ``bulk_math`` other than bf16 asks for the FP4 prefill math."""
        if self.prefill == "thrift":
            return "thrift"
        if self.prefill == "flash":
            if flash_problem:
                raise ValueError(f"prefill 'flash' cannot run: {flash_problem}; use prefill "
                                 "'thrift' or 'auto'")
            return "flash"
        return "flash" if flash_problem is None and self.bulk_math == "bf16" else "thrift"

    def resolve_decode_math(self, fp4_mma: bool) -> str:
        """``fp4`` or ``fp16``; ``fp4_mma``: the decode's dots run on FP4 MMAs (sm_120)."""
        if self.decode_math != "auto":
            return self.decode_math
        return "fp4" if fp4_mma else "fp16"

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], base: ThriftBackendConfig | None = None
                     ) -> ThriftBackendConfig:
        """``base`` (defaults when None) with ``values`` applied; unknown keys raise."""
        if not isinstance(values, Mapping):
            raise ValueError(f"thrift_vllm settings must be a mapping, got {values!r}")
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"unknown thrift_vllm setting(s) {unknown}; "
                             f"known: {list(cls.field_names())}")
        return dataclasses.replace(base or cls(), **dict(values))

    @classmethod
    def from_vllm_config(cls, vllm_config: Any) -> ThriftBackendConfig:
        """Defaults, then ``THRIFT_VLLM_*`` variables, then ``additional_config["thrift_vllm"]``."""
        cfg = cls.from_mapping(_env_values())
        extra = getattr(vllm_config, "additional_config", None) or {}
        if isinstance(extra, Mapping) and ADDITIONAL_CONFIG_KEY in extra:
            cfg = cls.from_mapping(extra[ADDITIONAL_CONFIG_KEY], base=cfg)
        return cfg


BUDGET_SALT_PREFIX = "thrift-fp16-budget="
MAX_CACHE_SALT_LEN = 128  # vLLM's limit on cache_salt in the OpenAI protocol


def budget_cache_salt(budget: float, salt: str | None = None) -> str:
    """The prefix-cache salt that keeps blocks of different budgets apart (their stored K/V
    differ): the budget's token, appended to a non-empty ``salt``; a merged salt longer than
    vLLM allows is hashed. The one rule for the server middleware (``server/budget.py``) and the
    engine's front end (``budget_route``), so both write the same token."""
    own = BUDGET_SALT_PREFIX + repr(float(budget) + 0.0)
    if not salt:
        return own
    merged = f"{salt}|{own}"
    if len(merged) > MAX_CACHE_SALT_LEN:
        merged = "sha256:" + hashlib.sha256(merged.encode("utf-8")).hexdigest()
    return merged


def budget_effect(kv_layout: str, decode_math: str, prefill: str) -> tuple[bool, str]:
    """What ``fp16_budget`` changes for pages of ``kv_layout`` ("auto" / "nvfp4") with the
    resolved ``decode_math`` ("fp4" / "fp16") and ``prefill`` route ("flash" / "thrift"):
    ``(changes_anything, one sentence)`` for the startup log and ``/v1/thrift/config``."""
    parts = []
    if kv_layout == "auto":
        parts.append("decode: the share of key units read from the model-dtype copy, the rest "
                     + ("from FP4 pages in the model dtype's arithmetic (decode_math fp16)"
                        if decode_math == "fp16" else "in FP4 arithmetic (decode_math fp4)"))
    elif decode_math == "fp4":
        parts.append("decode: the share of key units computed in 16-bit arithmetic on the "
                     "decoded FP4 pages, the rest in FP4 arithmetic (the nvfp4 layout keeps no "
                     "model-dtype copy)")
    if prefill == "thrift":
        parts.append("prefill: the share of query-key blocks computed in 16-bit arithmetic, the "
                     "rest in FP4 arithmetic (bulk_math)")
    if not parts:
        return False, (f"fp16_budget has no effect with the {kv_layout} layout, decode_math "
                       f"{decode_math} and prefill {prefill}: prefill is exact, and decode reads "
                       "every key from the FP4 pages in 16-bit arithmetic (this layout keeps no "
                       "model-dtype copy to spend a budget on)")
    return True, "fp16_budget sets, in " + "; in ".join(parts)


def startup_lines(kv_layout: str, decode_math: str, prefill: str, flash_problem: str | None
                  ) -> list[tuple[str, str]]:
    """``(level, message)`` lines an engine logs once at start: the resolved routes, why the
    flash prefill does not run where it does not, and the budget's effect (a warning when the
    budget changes nothing, so a budget a user sends is never silently meaningless)."""
    route = f"ThriftAttention: decode_math {decode_math}, prefill {prefill}"
    if prefill == "thrift" and flash_problem:
        route += f" (FlashAttention prefill not used: {flash_problem})"
    effect, text = budget_effect(kv_layout, decode_math, prefill)
    return [("info", route + "."), ("info" if effect else "warning", text + ".")]


def fp16_units(budget: float, grid: BlockGrid, kv_layout: str, decode_math: str,
               prefill: str) -> int:
    """FP16 blocks per query-block row that the attention really computes for one sequence
    (``grid``): the budget's ``budget_to_k`` where the budget applies (:func:`budget_effect`);
    every candidate for a flash prefill of the ``auto`` layout (exact, model-dtype K/V); 0 where
    no key comes from model-dtype values (the nvfp4 layout's flash prefill context and its fp16
    decode, which reads only FP4 pages). Feeds the decode launch and the realised-share metric."""
    if grid.seq_len_q == 1:
        if kv_layout == "nvfp4" and decode_math == "fp16":
            return 0
        return budget_to_k(budget, grid)
    if prefill == "flash":
        return budget_to_k(1.0, grid) if kv_layout == "auto" else 0
    return budget_to_k(budget, grid)


def boolean(raw: str) -> bool:
    """``1/true/yes/on`` and ``0/false/no/off`` (any case); anything else raises ValueError."""
    v = raw.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {raw!r}")


def _env_values(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The one place that reads the environment: ``THRIFT_VLLM_<FIELD>`` for each field."""
    environ = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for f in dataclasses.fields(ThriftBackendConfig):
        raw = environ.get(ENV_PREFIX + f.name.upper())
        if raw is None or raw == "":
            continue
        convert = {"fp16_budget": float, "block_size": int, "cuda_graphs": boolean,
                   "budget_cache_salt": boolean}.get(f.name, str)
        try:
            out[f.name] = convert(raw)
        except ValueError:
            raise ValueError(f"{ENV_PREFIX}{f.name.upper()} must be a {convert.__name__}, "
                             f"got {raw!r}") from None
    return out


# The config of the engine this process builds. vLLM calls the spec and block-size hooks outside
# its current-config context, so the Impl (built inside it, before any spec) records it here.
_engine_config: ThriftBackendConfig | None = None


def record_engine_config(config: ThriftBackendConfig) -> None:
    """Remember ``config`` as this process's engine config (called by the Impl)."""
    global _engine_config
    _engine_config = config


def engine_config(vllm_config: Any) -> ThriftBackendConfig:
    """The config of ``vllm_config`` (vLLM's current one); without one, the recorded engine's,
    else defaults and environment (no engine: unit tests, tools)."""
    if vllm_config is None and _engine_config is not None:
        return _engine_config
    return ThriftBackendConfig.from_vllm_config(vllm_config)
