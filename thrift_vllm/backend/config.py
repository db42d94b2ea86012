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
import math
import numbers
import os
from collections.abc import Mapping
from typing import Any

from thrift_vllm.api import BLOCK_SIZES, IMPLS
from thrift_vllm.formats import check_format
from thrift_vllm.selection import check_selection

ADDITIONAL_CONFIG_KEY = "thrift_vllm"
ENV_PREFIX = "THRIFT_VLLM_"
# Prefill's FP4-block arithmetic on the Triton path: bf16 (exact, any GPU), fp8 (Hopper's fast
# approximation), native (Blackwell's block-scaled MMA on the packed pages, exact, auto layout).
BACKEND_BULK_MATHS = ("bf16", "fp8", "native")


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
    """Arithmetic of the FP4 blocks in prefill on the Triton path: ``bf16`` (the exact FP4
    semantics) or ``fp8`` (e4m3 operands, P in e4m3: Hopper's fast path, approximate — on the
    embedded model thrift 5 % recovers 93 % of the FP4 gap with it instead of 95 %), or
    ``native`` (Blackwell: the packed pages straight into the block-scaled MMA, exact; the
    ``auto`` KV layout only). Decode always runs the FP4 decode kernel (block-scaled MMAs on
    sm_120 by itself); the PyTorch path computes ``bf16`` only."""
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
