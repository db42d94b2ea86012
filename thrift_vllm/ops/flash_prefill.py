"""Exact prefill over the paged FP4 KV cache through a FlashAttention varlen kernel.

On GPUs without FP4 arithmetic (Hopper) the FP4 prefill semantics cost more than they save: P
is quantised per element in the inner loop and the FP4 values are decoded on the ALUs, so the
prompt's attention ran at ~0.56x FlashAttention-3 (BENCHMARKS.md). This route computes it
exactly instead, with the kernel vLLM itself ships (``vllm.vllm_flash_attn``; the backend passes
it in as ``varlen_attn``, since ops import no vLLM), while the FP4 pages and key summaries are
still written as before, so decode and capacity are unchanged:

* ``auto`` layout: FlashAttention reads the pages' model-dtype ``k_hi`` / ``v_hi`` in place
  through the block table — :func:`flash_kv_views` gives them as the ``[num_blocks, P, Hkv, D]``
  tensors FlashAttention expects (a strided view: the head stride is a page's bytes), so
  nothing is copied;
* ``nvfp4`` layout: the pages hold only FP4, so each prefill sequence's context is decoded into
  contiguous model-dtype rows (``kernels/kv_gather.py``), the chunk's own tokens taken from the
  forward's fresh ``key`` / ``value`` (FlashAttention's own semantics for the prompt itself).

Per step the metadata builder makes one :class:`FlashPrefillBatch` (host lists to device once);
every layer then runs one gather (nvfp4) and one varlen call.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from thrift_vllm.kernels.kv_gather import _gather_dequant_kernel
from thrift_vllm.kv_layout import KVLayout
from thrift_vllm.ops.kv_write import cache_bytes, region_offsets
from thrift_vllm.ops.paged_attention import host_to_device

GATHER_TILE = 64  # tokens per gather program; divides every page size (pages hold whole units)


@dataclass
class FlashPrefillBatch:
    """One step's prefill sequences (query length > 1) for :func:`flash_prefill`.

    ``rows``: their indices in the batch; ``q_lo``/``q_hi``: their query rows when they are a
    contiguous run of ``query`` (vLLM orders decodes first), else ``q_index`` (int64 [n_q])
    lists them. Device int32: ``cu_seqlens_q [S + 1]`` (relative to the run), ``seq_lens [S]``,
    ``block_table [S, max_pages]``; the nvfp4 gather's ``cu_seqlens_k [S + 1]``, ``tile_seq``,
    ``tile_start [tiles]``, ``ctx_lens``, ``q_start [S]`` (None in the auto layout).
    """

    rows: list[int]
    q_lo: int
    q_hi: int
    q_index: torch.Tensor | None
    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    total_k: int
    cu_seqlens_k: torch.Tensor | None = None
    tile_seq: torch.Tensor | None = None
    tile_start: torch.Tensor | None = None
    ctx_lens: torch.Tensor | None = None
    q_start: torch.Tensor | None = None

    @classmethod
    def make(cls, query_start_loc: Sequence[int], seq_lens: Sequence[int],
             block_table: torch.Tensor, *, gather: bool) -> FlashPrefillBatch | None:
        """From host ``query_start_loc [B + 1]`` / ``seq_lens [B]`` and the device block table
        ``[>= B, max_pages]``; ``gather``: the nvfp4 layout (context decoded into rows). None
        when no sequence has more than one query."""
        rows = [i for i in range(len(seq_lens)) if query_start_loc[i + 1] - query_start_loc[i] > 1]
        if not rows:
            return None
        for i in rows:
            if query_start_loc[i + 1] - query_start_loc[i] > seq_lens[i]:
                raise ValueError(f"sequence {i}: {query_start_loc[i + 1] - query_start_loc[i]} "
                                 f"queries but seq_len {seq_lens[i]}")
        dev = block_table.device
        q_lens = [query_start_loc[i + 1] - query_start_loc[i] for i in rows]
        contiguous = rows == list(range(rows[0], rows[-1] + 1))  # vLLM puts decodes first
        q_lo = query_start_loc[rows[0]]
        q_hi = query_start_loc[rows[-1] + 1]
        q_index = None
        if not contiguous:
            idx = [r for i in rows for r in range(query_start_loc[i], query_start_loc[i + 1])]
            q_index = host_to_device(idx, torch.long, dev)
            q_lo, q_hi = 0, len(idx)
        cu_q = [0, *itertools.accumulate(q_lens)]
        lens = [seq_lens[i] for i in rows]

        def ints(values):
            return host_to_device(values, torch.int32, dev)

        bt = block_table[rows[0]:rows[-1] + 1] if contiguous else \
            block_table[host_to_device(rows, torch.long, dev)]
        out = cls(rows=rows, q_lo=q_lo, q_hi=q_hi, q_index=q_index, cu_seqlens_q=ints(cu_q),
                  seq_lens=ints(lens), block_table=bt.to(torch.int32), max_seqlen_q=max(q_lens),
                  max_seqlen_k=max(lens), total_k=sum(lens))
        if gather:
            tiles = [(s, t) for s, n in enumerate(lens) for t in range(0, n, GATHER_TILE)]
            out.cu_seqlens_k = ints([0, *itertools.accumulate(lens)])
            out.tile_seq = ints([s for s, _ in tiles])
            out.tile_start = ints([t for _, t in tiles])
            out.ctx_lens = ints([n - q for n, q in zip(lens, q_lens, strict=True)])
            out.q_start = ints(cu_q[:-1])
        return out


def flash_kv_views(layout: KVLayout, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``auto`` layout's model-dtype K and V as FlashAttention's paged cache: two views
    ``[num_blocks, P, Hkv, D]`` of ``kv_cache`` ``[num_blocks, Hkv, P, C / itemsize]`` (strides
    ``(Hkv * P * C, D, P * C, 1)`` in bytes / itemsize: no copy)."""
    if layout.kv_layout != "auto":
        raise ValueError(f"only the auto layout stores model-dtype K/V, not {layout.kv_layout!r}")
    views = layout.views(kv_cache)
    return views.k_hi.transpose(1, 2), views.v_hi.transpose(1, 2)


def gather_context(layout: KVLayout, kv_cache: torch.Tensor, key: torch.Tensor,
                   value: torch.Tensor, batch: FlashPrefillBatch
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``nvfp4`` layout's prefill sequences as contiguous model-dtype rows: K and V
    ``[total_k, Hkv, D]`` (sequence s at ``cu_seqlens_k[s]``), positions before the chunk
    decoded from the pages, the chunk's own from ``key`` / ``value`` ``[T, Hkv, D]`` (the step's
    fresh rows, in ``batch``'s query order)."""
    if batch.tile_seq is None:
        raise ValueError("the batch was made without gather=True")
    Hkv, D = kv_cache.shape[1], layout.head_size
    if key.shape[1:] != (Hkv, D) or value.shape != key.shape or key.stride(2) != 1 \
            or value.stride(2) != 1 or key.dtype != layout.dtype:
        raise ValueError(f"key/value must be [T, {Hkv}, {D}] {layout.dtype} with a contiguous "
                         f"last dim; got {tuple(key.shape)} {key.dtype}, {tuple(value.shape)}")
    if layout.page_size % GATHER_TILE:
        raise ValueError(f"page size {layout.page_size} is not a multiple of {GATHER_TILE}")
    cache = cache_bytes(kv_cache, layout, Hkv)
    kn, vn = _run_rows(key, batch), _run_rows(value, batch)
    out_k = torch.empty(batch.total_k, Hkv, D, dtype=key.dtype, device=key.device)
    out_v = torch.empty_like(out_k)
    offs = region_offsets(layout)
    n_tiles = batch.tile_seq.shape[0]
    _gather_dequant_kernel[(n_tiles, Hkv)](
        cache, batch.block_table, batch.tile_seq, batch.tile_start, batch.seq_lens,
        batch.ctx_lens, batch.q_start, batch.cu_seqlens_k, kn, vn, out_k, out_v,
        batch.block_table.stride(0), cache.stride(0), cache.stride(1), kn.stride(0),
        kn.stride(1), vn.stride(0), vn.stride(1), out_k.stride(0), out_k.stride(1),
        T=GATHER_TILE, P=layout.page_size, D=D, G=layout.group, FMT=layout.quant_format,
        OFF_K4=offs["OFF_K4"], OFF_K4S=offs["OFF_K4S"], OFF_V4=offs["OFF_V4"],
        OFF_V4S=offs["OFF_V4S"], num_warps=4,
    )
    return out_k, out_v


def _run_rows(t: torch.Tensor, batch: FlashPrefillBatch) -> torch.Tensor:
    """``t``'s rows of the batch's prefill queries, in order (a view when contiguous)."""
    if batch.q_index is None:
        return t[batch.q_lo:batch.q_hi]
    return t[batch.q_index]


def flash_prefill(layout: KVLayout, kv_cache: torch.Tensor, query: torch.Tensor,
                  key: torch.Tensor | None, value: torch.Tensor | None,
                  batch: FlashPrefillBatch, *, scale: float, output: torch.Tensor,
                  varlen_attn: Callable[..., torch.Tensor]) -> torch.Tensor:
    """Exact causal attention of ``batch``'s prefill rows over their pages (the step's K/V
    already written). query ``[T, Hq, D]``, key/value ``[T, Hkv, D]`` (fresh; read in the nvfp4
    layout only), kv_cache ``[num_blocks, Hkv, P, C / itemsize]``; writes the rows into
    ``output [T, Hq, D]`` and returns it. ``varlen_attn``: a function with the keywords of
    ``vllm.vllm_flash_attn.flash_attn_varlen_func`` (bottom-right causal, paged through
    ``block_table`` + ``seqused_k`` or contiguous through ``cu_seqlens_k``)."""
    if query.dim() != 3 or query.shape[2] != layout.head_size or query.dtype != layout.dtype:
        raise ValueError(f"query must be [T, Hq, {layout.head_size}] {layout.dtype}, got "
                         f"{tuple(query.shape)} {query.dtype}")
    if layout.kv_layout == "nvfp4" and (key is None or value is None):
        raise ValueError("the nvfp4 layout needs the step's key and value")
    q = _run_rows(query, batch)
    direct = batch.q_index is None and output.dtype == query.dtype
    out = output[batch.q_lo:batch.q_hi] if direct else torch.empty_like(q)
    common = dict(q=q, out=out, cu_seqlens_q=batch.cu_seqlens_q, max_seqlen_q=batch.max_seqlen_q,
                  max_seqlen_k=batch.max_seqlen_k, softmax_scale=scale, causal=True)
    if layout.kv_layout == "auto":
        k, v = flash_kv_views(layout, kv_cache)
        varlen_attn(k=k, v=v, seqused_k=batch.seq_lens, block_table=batch.block_table, **common)
    else:
        k, v = gather_context(layout, kv_cache, key, value, batch)
        varlen_attn(k=k, v=v, cu_seqlens_k=batch.cu_seqlens_k, **common)
    if not direct:
        if batch.q_index is None:
            output[batch.q_lo:batch.q_hi] = out.to(output.dtype)
        else:
            output[batch.q_index] = out.to(output.dtype)
    return output
