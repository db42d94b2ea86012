"""vLLM plugin entry points (``vllm.general_plugins`` -> ``register``).

``register()`` runs in vLLM's front end, engine core and every worker, possibly several times in
one process, so it is idempotent. It

0. checks the vLLM version (``compat``); on an unsupported vLLM it logs why and registers
   nothing, so vLLM itself keeps working (``--attention-backend CUSTOM`` then fails in vLLM with
   "must be registered", after our error line);
1. registers ``ThriftAttentionBackend`` as ``AttentionBackendEnum.CUSTOM`` (unless another plugin
   already took CUSTOM: then it warns and leaves it), and
2. on vLLM's CPU platform, which ignores ``--attention-backend`` and always returns CPU_ATTN,
   wraps ``CpuPlatform.get_attn_backend_cls`` so that an explicit ``CUSTOM`` request returns this
   backend (after ``validate_configuration``: unsupported models fail here with the reasons).
   Every other request goes to the original method unchanged, so without
   ``attention_backend="CUSTOM"`` vLLM behaves exactly as before;
3. on vLLM 0.26 only (no ``customize_spec`` there), wraps ``Attention.get_kv_cache_spec`` so
   that layers running this backend get pages of the layout's real bytes
   (``compat.install_spec_hook_026``); other layers and backends are untouched;
4. installs the per-request budget hooks (``budget_route``): an engine whose config selects
   this backend gets the budget logits processor and per-budget prefix-cache salts with no
   extra flag; other engines are untouched.
"""

from __future__ import annotations

BACKEND_QUALNAME = "thrift_vllm.backend.thrift_attn.ThriftAttentionBackend"
_WRAPPED_MARK = "_thrift_vllm_wrapped"


def register() -> None:
    try:
        from thrift_vllm.backend import compat
    except Exception as e:  # unsupported or broken vLLM: never take vLLM down with us
        import logging

        logging.getLogger("vllm").error(
            "thrift_vllm: attention backend CUSTOM not registered: %s", e)
        return

    enum = compat.AttentionBackendEnum
    custom = enum.CUSTOM
    if custom.is_overridden() and custom.get_path() != BACKEND_QUALNAME:
        compat.get_logger(__name__).warning(
            "AttentionBackendEnum.CUSTOM is already registered to %s; thrift_vllm leaves it",
            custom.get_path())
        return
    compat.register_backend(custom, BACKEND_QUALNAME)
    _route_custom_on_cpu()
    if compat.LEGACY_026:
        compat.install_spec_hook_026(BACKEND_QUALNAME, _bytes_per_head_token)
    from thrift_vllm.backend import budget_route

    compat.install_budget_hooks(budget_route.prepare_config, budget_route.route_request)


def _bytes_per_head_token(kv_cache_dtype: str, head_size: int, dtype) -> int:
    """``C`` of this engine's layout (vLLM 0.26's spec hook; the config of the engine being
    built, as ``customize_spec`` reads it on 0.32+)."""
    from thrift_vllm.backend import kv_pages, thrift_attn

    return kv_pages.bytes_per_head_token(kv_cache_dtype, head_size, dtype, thrift_attn._config())


def _route_custom_on_cpu() -> None:
    from thrift_vllm.backend import compat

    platform = compat.cpu_platform_cls()
    original = platform.__dict__["get_attn_backend_cls"]
    if getattr(original.__func__, _WRAPPED_MARK, False):
        return
    original_func = original.__func__

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        custom = compat.AttentionBackendEnum.CUSTOM
        if (selected_backend is not custom or not custom.is_overridden()
                or custom.get_path() != BACKEND_QUALNAME):
            return original_func(cls, selected_backend, attn_selector_config, num_heads)
        backend_cls = compat.resolve_qualname(BACKEND_QUALNAME)
        reasons = backend_cls.validate_configuration(device_capability=None,
                                                     **attn_selector_config._asdict())
        if reasons:
            raise ValueError(f"attention backend CUSTOM (ThriftAttention) cannot run this "
                             f"layer ({attn_selector_config}): {', '.join(reasons)}")
        compat.get_logger(__name__).info_once("Using CUSTOM (ThriftAttention) backend on CPU.")
        return BACKEND_QUALNAME

    setattr(get_attn_backend_cls, _WRAPPED_MARK, True)
    get_attn_backend_cls.__wrapped__ = original_func
    platform.get_attn_backend_cls = classmethod(get_attn_backend_cls)
