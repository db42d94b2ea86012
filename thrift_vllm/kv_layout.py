"""The paged FP4 KV cache layout (``notes/paged_kv.md``): sizes, offsets and typed views.

One page is one vLLM block of ``P`` tokens for one layer. vLLM's per-layer cache is
``[num_blocks, num_kv_heads, P, C]`` (layout LBHNC), ``C`` = bytes per head per token; the
``P * C`` bytes of one ``(block, head)`` hold these regions, in this order, each contiguous and
row-major (``D`` head size, ``g`` FP4 group, ``U`` selection unit, ``n_u = P / U``):

=============  =====================  ======================  ==================================
region         ``auto``               ``nvfp4``               dtype
=============  =====================  ======================  ==================================
``k_hi``       ``[P, D]``             --                      model dtype
``v_hi``       ``[P, D]``             --                      model dtype
``k4``         ``[P, D/2]``           ``[P, D/2]``            uint8, e2m1 pairs along head_dim
``k4_scales``  ``[P, D/g]``           ``[P, D/g]``            uint8 (e4m3 bytes / e8m0 bytes)
``v4``         ``[D, P/2]`` (tokens)  ``[P, D/2]`` (head_dim) uint8
``v4_scales``  ``[D, P/g]``           ``[P, D/g]``            uint8
``k_mean``     ``[n_u, D]``           ``[n_u, D]``            fp32 (selection ``block_mean``)
``k_min/max``  ``[n_u, D]`` each      ``[n_u, D]`` each       fp32 (selection ``quest``)
=============  =====================  ======================  ==================================

Everything here is plain Python arithmetic except :meth:`KVLayout.views`, which returns strided
views (no copies) of a cache tensor. The kernels (``kernels/kv_write.py``,
``kernels/paged_decode.py``) address the same bytes with :meth:`KVLayout.region_offset`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from thrift_vllm.formats import GROUP_SIZE, check_format
from thrift_vllm.selection import check_selection

KV_LAYOUTS = ("auto", "nvfp4")
HEAD_SIZES = (64, 128)
UNITS = (32, 64, 128)
MODEL_DTYPES = (torch.float16, torch.bfloat16)
SUMMARIES = {"block_mean": ("k_mean",), "quest": ("k_min", "k_max"), "local": ()}
REGION_NAMES = ("k_hi", "v_hi", "k4", "k4_scales", "v4", "v4_scales", "k_mean", "k_min", "k_max")


class Region(NamedTuple):
    """One region of a ``(block, head)`` page: byte ``offset`` and ``nbytes`` inside the
    ``P * C`` bytes, element ``dtype`` and per-(block, head) ``shape``."""

    name: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, int]


class KVViews(NamedTuple):
    """Typed strided views of one layer's cache ``[nb, H, P, C]`` (``None`` = region absent).

    k_hi, v_hi: model dtype ``[nb, H, P, D]`` (auto layout only).
    k4:         uint8 ``[nb, H, P, D/2]``; k4_scales uint8 ``[nb, H, P, D/g]``.
    v4:         uint8 ``[nb, H, D, P/2]`` (auto: along tokens) or ``[nb, H, P, D/2]`` (nvfp4).
    v4_scales:  uint8 ``[nb, H, D, P/g]`` (auto) or ``[nb, H, P, D/g]`` (nvfp4).
    k_mean:     fp32 ``[nb, H, n_u, D]`` (block_mean); k_min, k_max the same (quest).
    """

    k_hi: torch.Tensor | None
    v_hi: torch.Tensor | None
    k4: torch.Tensor
    k4_scales: torch.Tensor
    v4: torch.Tensor
    v4_scales: torch.Tensor
    k_mean: torch.Tensor | None
    k_min: torch.Tensor | None
    k_max: torch.Tensor | None


def _check_int(name: str, value: object, allowed: tuple[int, ...] | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if allowed is not None and value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


@dataclass(frozen=True)
class KVLayout:
    """Layout of one layer's paged KV cache (validated on creation; ValueError names the value).

    kv_layout:    ``"auto"`` (model-dtype K/V + FP4 copies, V FP4 along tokens) or ``"nvfp4"``
                  (FP4 only, V FP4 along head_dim).
    head_size:    ``D``, 64 or 128.
    page_size:    ``P``, vLLM's block size in tokens; a multiple of ``unit``.
    unit:         ``U``, the selection unit = the operator's ``block_size`` (32, 64, 128).
    quant_format: FP4 format of ``k4``/``v4``: ``"nvfp4"`` (g = 16) or ``"mxfp4"`` (g = 32).
    selection:    ``block_mean`` (stores ``k_mean``), ``quest`` (``k_min``, ``k_max``), ``local``.
    dtype:        model dtype (fp16 / bf16) of ``k_hi``/``v_hi`` and of the attention inputs.
    """

    kv_layout: str
    head_size: int
    page_size: int
    unit: int = 64
    quant_format: str = "nvfp4"
    selection: str = "block_mean"
    dtype: torch.dtype = torch.float16

    def __post_init__(self) -> None:
        if self.kv_layout not in KV_LAYOUTS:
            raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}, got {self.kv_layout!r}")
        _check_int("head_size", self.head_size, HEAD_SIZES)
        _check_int("unit", self.unit, UNITS)
        _check_int("page_size", self.page_size)
        if self.page_size % self.unit:
            raise ValueError(f"page_size {self.page_size} must be a multiple of the selection "
                             f"unit {self.unit} (a unit must not straddle pages)")
        check_format(self.quant_format)
        check_selection(self.selection)
        if self.dtype not in MODEL_DTYPES:
            raise ValueError(f"dtype must be one of {MODEL_DTYPES}, got {self.dtype!r}")
        if self.unit % self.group:  # unreachable for the allowed values; guards future edits
            raise ValueError(f"unit {self.unit} is not a multiple of the FP4 group {self.group}")

    # --- plain-Python arithmetic ----------------------------------------------------------------
    @property
    def group(self) -> int:
        """FP4 group size ``g`` (16 nvfp4, 32 mxfp4)."""
        return GROUP_SIZE[self.quant_format]

    @property
    def n_units(self) -> int:
        """Selection units per page, ``n_u = P / U``."""
        return self.page_size // self.unit

    @property
    def elem_bytes(self) -> int:
        """Model-dtype bytes ``e`` (2)."""
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def summary_names(self) -> tuple[str, ...]:
        return SUMMARIES[self.selection]

    @property
    def regions(self) -> tuple[Region, ...]:
        """The regions present in this layout, in storage order, with their byte offsets."""
        P, D, g, e = self.page_size, self.head_size, self.group, self.elem_bytes
        u8 = torch.uint8
        spec: list[tuple[str, torch.dtype, tuple[int, int], int]] = []
        if self.kv_layout == "auto":
            spec += [("k_hi", self.dtype, (P, D), e), ("v_hi", self.dtype, (P, D), e)]
        spec += [("k4", u8, (P, D // 2), 1), ("k4_scales", u8, (P, D // g), 1)]
        if self.kv_layout == "auto":  # V quantised along tokens: one row per channel
            spec += [("v4", u8, (D, P // 2), 1), ("v4_scales", u8, (D, P // g), 1)]
        else:
            spec += [("v4", u8, (P, D // 2), 1), ("v4_scales", u8, (P, D // g), 1)]
        spec += [(name, torch.float32, (self.n_units, D), 4) for name in self.summary_names]
        out, off = [], 0
        for name, dt, shape, size in spec:
            nbytes = shape[0] * shape[1] * size
            out.append(Region(name, off, nbytes, dt, shape))
            off += nbytes
        return tuple(out)

    def region(self, name: str) -> Region | None:
        """The region called ``name`` (see ``REGION_NAMES``), or None if this layout has none."""
        if name not in REGION_NAMES:
            raise ValueError(f"region must be one of {REGION_NAMES}, got {name!r}")
        return next((r for r in self.regions if r.name == name), None)

    def region_offset(self, name: str) -> int:
        """Byte offset of region ``name`` inside a ``(block, head)`` page; ValueError if absent."""
        r = self.region(name)
        if r is None:
            raise ValueError(f"the {self.kv_layout!r} layout with selection {self.selection!r} "
                             f"has no region {name!r}")
        return r.offset

    @property
    def bytes_per_head_page(self) -> int:
        """``P * C``: bytes of one ``(block, head)``."""
        return sum(r.nbytes for r in self.regions)

    @property
    def bytes_per_head_token(self) -> int:
        """``C``: bytes per head per token (vLLM's ``state_content_bytes``)."""
        total = self.bytes_per_head_page
        if total % self.page_size:  # every region is [P, x] or [x, P / g] or [P / U, D]
            raise AssertionError(f"page bytes {total} not divisible by page {self.page_size}")
        return total // self.page_size

    def bytes_per_token(self, num_kv_heads: int) -> int:
        """Bytes one token occupies in one layer: ``num_kv_heads * C``."""
        return _check_int("num_kv_heads", num_kv_heads) * self.bytes_per_head_token

    def page_bytes(self, num_kv_heads: int) -> int:
        """Bytes of one page (block) of one layer: ``num_kv_heads * P * C``."""
        return self.bytes_per_token(num_kv_heads) * self.page_size

    def stock_bytes_per_token(self, num_kv_heads: int) -> int:
        """What vLLM's dense model-dtype cache spends per token per layer: ``H * 2 * D * e``."""
        return _check_int("num_kv_heads", num_kv_heads) * 2 * self.head_size * self.elem_bytes

    def describe(self, num_kv_heads: int) -> str:
        """One line for logs: bytes/token vs stock."""
        ours, stock = self.bytes_per_token(num_kv_heads), self.stock_bytes_per_token(num_kv_heads)
        return (f"{self.kv_layout} layout ({self.quant_format}, {self.selection}, "
                f"D={self.head_size}, page {self.page_size}, unit {self.unit}): "
                f"{ours} B/token/layer vs stock {stock} ({ours / stock:.2f}x)")

    # --- views ----------------------------------------------------------------------------------
    def bytes_view(self, kv_cache: torch.Tensor) -> torch.Tensor:
        """One layer's cache ``[num_blocks, H, P, C / itemsize]`` (any dtype) as uint8
        ``[num_blocks, H, P, C]``, after checking it has this layout's page shape and that each
        (block, head)'s ``P * C`` bytes are one contiguous run; ValueError otherwise."""
        if not isinstance(kv_cache, torch.Tensor) or kv_cache.dim() != 4:
            raise ValueError(f"kv_cache must be a 4-d tensor [num_blocks, H, P, C], got "
                             f"{getattr(kv_cache, 'shape', type(kv_cache).__name__)}")
        if kv_cache.stride(-1) != 1:
            raise ValueError(f"kv_cache rows must be contiguous, strides {kv_cache.stride()}")
        u8 = kv_cache.view(torch.uint8)
        P, C = u8.shape[2:]
        if P != self.page_size or C != self.bytes_per_head_token:
            raise ValueError(f"kv_cache has pages of {P} tokens x {C} bytes; the layout needs "
                             f"{self.page_size} x {self.bytes_per_head_token} ({self})")
        if P > 1 and u8.stride(2) != C:  # a (block, head)'s P * C bytes: one contiguous run
            raise ValueError(f"kv_cache pages are not contiguous (strides {u8.stride()})")
        return u8

    def views(self, kv_cache: torch.Tensor) -> KVViews:
        """Typed views (no copies) of one layer's cache ``[num_blocks, H, P, C]`` in any dtype
        whose rows are ``C`` bytes (viewed as uint8 first). Writes through the views land in
        ``kv_cache``. Shapes in :class:`KVViews`."""
        u8 = self.bytes_view(kv_cache)
        flat = u8.flatten(2)  # [nb, H, P * C]: a view, the pages are contiguous runs
        found: dict[str, torch.Tensor] = {}
        for r in self.regions:
            t = flat[:, :, r.offset:r.offset + r.nbytes]
            if r.dtype != torch.uint8:
                t = t.view(r.dtype)
            found[r.name] = t.unflatten(-1, r.shape)
        return KVViews(**{name: found.get(name) for name in KVViews._fields})

    def allocate(self, num_blocks: int, num_kv_heads: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        """A zeroed cache ``[num_blocks, num_kv_heads, P, C / itemsize]`` for tests and tools."""
        C = self.bytes_per_head_token
        item = torch.empty((), dtype=dtype).element_size()
        if C % item:
            raise ValueError(f"C = {C} bytes is not a whole number of {dtype} elements")
        return torch.zeros(num_blocks, num_kv_heads, self.page_size, C // item, dtype=dtype,
                           device=device)
