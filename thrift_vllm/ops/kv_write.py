"""Launch the paged KV write (quantise-on-write; semantics in ``notes/paged_kv.md``)."""

from __future__ import annotations

import torch
import triton

from thrift_vllm.kernels.kv_write import _kv_write_groups_kernel, _kv_write_tokens_kernel
from thrift_vllm.kv_layout import KVLayout

BLOCK_T = 16  # tokens per program of the per-token pass


def region_offsets(layout: KVLayout) -> dict[str, int]:
    """Byte offsets of every region as the kernels' constexprs (0 for absent regions)."""
    off = {r.name: r.offset for r in layout.regions}
    sums = layout.summary_names
    return dict(
        OFF_KHI=off.get("k_hi", 0), OFF_VHI=off.get("v_hi", 0),
        OFF_K4=off["k4"], OFF_K4S=off["k4_scales"], OFF_V4=off["v4"], OFF_V4S=off["v4_scales"],
        OFF_SUM=off[sums[0]] if sums else 0, OFF_MAX=off[sums[-1]] if sums else 0,
    )


def cache_bytes(kv_cache: torch.Tensor, layout: KVLayout, num_kv_heads: int) -> torch.Tensor:
    """``kv_cache`` ``[num_blocks, Hkv, P, C / itemsize]`` (any dtype) as uint8 ``[nb, Hkv, P, C]``
    after checking it matches ``layout`` with contiguous pages (``KVLayout.views`` rules)."""
    u8 = layout.bytes_view(kv_cache)  # validates page shape and contiguity
    if u8.shape[1] != num_kv_heads:
        raise ValueError(f"kv_cache has {u8.shape[1]} KV heads, the inputs {num_kv_heads}")
    return u8


def write_kv_triton(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    layout: KVLayout,
) -> None:
    """Write this step's K/V into the paged cache, in place (= ``thrift_vllm.paged.write_kv``).

    key, value: ``[T, Hkv, D]`` in ``layout.dtype`` (last dim contiguous; extra rows past
    ``slot_mapping``'s length are ignored). kv_cache: ``[num_blocks, Hkv, P, C / itemsize]`` laid
    out as ``layout``. slot_mapping: int ``[T']`` (``T' <= T``), ``block * P + offset``, -1 = skip;
    slots must be distinct, and the slots of one page written in a step must lie within one
    selection unit of each other in ``slot_mapping`` (vLLM: a request's tokens are contiguous
    and in order). Writes the per-token FP4 codes (and model-dtype copies in the auto
    layout), re-quantises every touched V group (auto) and recomputes the summaries of every
    touched selection unit. Two launches, no host synchronisation.
    """
    if key.dim() != 3 or value.shape != key.shape:
        raise ValueError(f"key/value must be [T, Hkv, D] of one shape, got {tuple(key.shape)}, "
                         f"{tuple(value.shape)}")
    if key.dtype != layout.dtype or value.dtype != layout.dtype:
        raise ValueError(f"key/value dtype {key.dtype}/{value.dtype} != layout {layout.dtype}")
    if key.shape[2] != layout.head_size:
        raise ValueError(f"head size {key.shape[2]} != layout {layout.head_size}")
    if key.stride(2) != 1 or value.stride(2) != 1:
        raise ValueError("key/value need a contiguous last dim")
    if slot_mapping.dim() != 1 or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32/int64 [T], got {slot_mapping.dtype} "
                         f"{tuple(slot_mapping.shape)}")
    T = slot_mapping.shape[0]
    if T > key.shape[0]:
        raise ValueError(f"slot_mapping has {T} slots for {key.shape[0]} tokens")
    Hkv = key.shape[1]
    cache = cache_bytes(kv_cache, layout, Hkv)
    if T == 0:
        return
    auto = layout.kv_layout == "auto"
    offs = region_offsets(layout)
    common = dict(D=layout.head_size, G=layout.group, P=layout.page_size, FMT=layout.quant_format,
                  AUTO=auto)
    _kv_write_tokens_kernel[(triton.cdiv(T, BLOCK_T), Hkv)](
        key, value, slot_mapping, cache, T,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        cache.stride(0), cache.stride(1),
        BLOCK_T=BLOCK_T, **common,
        **{k: offs[k] for k in ("OFF_KHI", "OFF_VHI", "OFF_K4", "OFF_K4S", "OFF_V4", "OFF_V4S")},
    )
    summary = {"block_mean": "mean", "quest": "minmax", "local": "none"}[layout.selection]
    if not auto and summary == "none":
        return
    _kv_write_groups_kernel[(T, Hkv)](
        key, slot_mapping, cache, T, cache.stride(0), cache.stride(1),
        U=layout.unit, SUMMARY=summary, **common,
        **offs,
    )
