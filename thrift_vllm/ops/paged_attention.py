"""ThriftAttention over the paged FP4 KV cache on the Triton kernels (= ``thrift_vllm.paged``).

* :func:`paged_select_triton`: decode selection from the summaries stored in the pages.
* :func:`paged_decode_triton`: one query token per sequence, FP4 read straight from the pages;
  every per-sequence quantity (seq_lens, k) is a device tensor and the grid depends only on the
  batch size and the block table's width, so it launches without a host sync (CUDA graphs).
* :func:`paged_attention_triton`: any batch (prefill, chunked prefill, decode, mixed), with
  ``thrift_vllm.paged.paged_attention``'s arguments: decode rows go to the paged decode kernel
  in one launch; each prefill sequence is gathered into contiguous buffers and run through the
  contiguous prefill kernel (``ops.paged_prefill``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton

from thrift_vllm.kernels.paged_decode import _paged_decode_kernel, _paged_reduce_kernel
from thrift_vllm.kernels.paged_decode_fp16 import _paged_decode_fp16_kernel
from thrift_vllm.kernels.paged_select import _paged_score_kernel, _paged_topk_kernel
from thrift_vllm.kv_layout import KVLayout
from thrift_vllm.ops.attention import LOG2E, SPLIT_CHUNK, decode_split_plan
from thrift_vllm.ops.kv_write import cache_bytes, region_offsets
from thrift_vllm.ops.paged_prefill import PAGED_BULK_MATHS, prefill_sequence
from thrift_vllm.ops.quantize import triton_interpreted
from thrift_vllm.ops.select import MAX_KV_BLOCKS
from thrift_vllm.selection import BlockGrid, budget_to_k

# Paged decode launch, from the H200 probes (`bench_paged.py --sections probe`; BENCHMARKS.md,
# "Paged decode, second pass" and "Third H200 pass"). The FP4 tiles are ALU- and latency-bound,
# so programs per SM matter: ~16 per SM (target_programs) and a 128-register cap (four CTAs of
# 4 warps per SM) had the best geometric mean over 8 cases (1.06x the 1056 / 168 launch on the
# large ones); 8 warps lost everywhere, 2 warps did not win overall. At batch 1 the target
# gives ~2-3 units per program; a floor of 8 (min_tiles_per_split) made the graph-replayed
# batch-1 32K kernel 1.43x (nvfp4) / 1.55x (auto) faster and left 16 x 32K and 1 x 128K as they
# were (BENCHMARKS.md "Fourth H200 pass", call 8). A floor, not a lower target: the plan sees
# the block-table width (max_model_len), not the context.
PAGED_DECODE_LAUNCH = {"target_programs": 2112, "num_warps": 4, "num_stages": 2, "maxnreg": 128,
                       "min_tiles_per_split": 8}
# math "fp16" (Hopper: FP4 as storage; kernels/paged_decode_fp16.py). Options for probes:
# units_per_iter (1 or 2 units of U tokens per loop step), swap (S^T = K q^T, query heads in N,
# padded to block_h: 0 = max(8 if swap else 16, next power of two of the GQA group)). Not yet
# timed on a GPU: the FP4 kernel's launch, plus swap, which in the sm90 SASS (notes/kernels.md
# "Fifth pass") is wgmma with 8 rows, no spills at 128 registers, fewer instructions per unit
# than the unswapped loop in both layouts.
# fp16_operands (bf16 models, NVFP4 pages): the FP4 units' dots in fp16 (q rounded to fp16,
# exact in its normal range; P rounded to fp16, finer than bf16), saving the decoded values'
# fp16 -> bf16 conversion (sm90 has no direct one: 128 F2F per unit and thread).
PAGED_DECODE_FP16_LAUNCH = {**PAGED_DECODE_LAUNCH, "units_per_iter": 1, "swap": True,
                            "block_h": 0, "fp16_operands": False}
DECODE_MATHS = ("fp4", "fp16")
_TILE = 4096  # fp32 summary elements per score program: [BLOCK_N, D] (two tiles for quest)


def _check_decode(layout: KVLayout, query, key, value, block_table, seq_lens, num_fp16_blocks):
    B, D = query.shape[0], query.shape[2]
    if D != layout.head_size or query.dtype != layout.dtype:
        raise ValueError(f"query {tuple(query.shape)} {query.dtype} does not match the layout "
                         f"(D={layout.head_size}, {layout.dtype})")
    for name, t in (("key", key), ("value", value)):
        if t is not None and (t.dim() != 3 or t.shape[0] < B or t.shape[2] != D
                              or t.dtype != query.dtype or t.stride(2) != 1):
            raise ValueError(f"{name} must be [>= {B}, Hkv, {D}] {query.dtype}, last dim "
                             f"contiguous; got {tuple(t.shape)} {t.dtype}")
    if block_table.dim() != 2 or block_table.shape[0] < B or block_table.dtype != torch.int32:
        raise ValueError(f"block_table must be int32 [>= {B}, max_pages], got "
                         f"{block_table.dtype} {tuple(block_table.shape)}")
    for name, t in (("seq_lens", seq_lens), ("num_fp16_blocks", num_fp16_blocks)):
        if t.dim() != 1 or t.shape[0] < B or t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32 [>= {B}], got {t.dtype} {tuple(t.shape)}")
    if query.stride(2) != 1:
        raise ValueError("query needs a contiguous last dim")


def _max_units(layout: KVLayout, block_table: torch.Tensor) -> int:
    n = block_table.shape[1] * layout.n_units
    if n > MAX_KV_BLOCKS:
        raise ValueError(f"block table of {block_table.shape[1]} pages = {n} selection units "
                         f"exceeds the selection kernel's {MAX_KV_BLOCKS}")
    return n


def paged_select_triton(
    layout: KVLayout, kv_cache: torch.Tensor, query: torch.Tensor, *,
    block_table: torch.Tensor, seq_lens: torch.Tensor, num_fp16_blocks: torch.Tensor,
    force_sink_recent: bool = False, max_num_fp16_blocks: int | None = None,
) -> torch.Tensor:
    """Decode selection: int32 ``[B, Hkv, K]``, per (sequence, KV head) the
    ``min(num_fp16_blocks[b], cdiv(seq_lens[b], U))`` selected units ascending, -1 padded.

    query ``[B, Hq, D]`` (model dtype, the step's token of each sequence); block_table int32
    ``[B, max_pages]``; seq_lens, num_fp16_blocks int32 ``[B]`` on the device. Scores from the
    layout's stored summaries (block_mean / quest; local = most recent), as
    ``select_blocks_reference`` on the sequence's stored keys. ``K`` = ``max_num_fp16_blocks``
    (a host bound, e.g. the batch's largest k) or, by default, the table's unit capacity.
    """
    B, Hq, D = query.shape
    Hkv = kv_cache.shape[1]
    cache = cache_bytes(kv_cache, layout, Hkv)
    n_max = _max_units(layout, block_table)
    k_out = n_max if max_num_fp16_blocks is None else max(0, min(max_num_fp16_blocks, n_max))
    out = torch.empty(B, Hkv, k_out, dtype=torch.int32, device=query.device)
    if k_out == 0 or B == 0:
        return out
    offs = region_offsets(layout)
    n_pow2 = max(triton.next_power_of_2(n_max), 2)
    if layout.selection == "local":  # scores are the unit indices: nothing to read
        scores = out
    else:
        scores = torch.empty(B, Hkv, n_max, dtype=torch.float32, device=query.device)
        tile = _TILE // (2 if layout.selection == "quest" else 1)
        block_n = max(16, min(triton.next_power_of_2(n_max), tile // D))
        _paged_score_kernel[(B * Hkv, triton.cdiv(n_max, block_n))](
            query, cache, block_table, seq_lens, scores,
            query.stride(0), query.stride(1), block_table.stride(0), cache.stride(0),
            cache.stride(1), scores.stride(0), scores.stride(1),
            Hkv=Hkv, GROUP=Hq // Hkv, U=layout.unit, NU=layout.n_units, D=D,
            SELECTION=layout.selection, BLOCK_N=block_n, OFF_SUM=offs["OFF_SUM"],
            OFF_MAX=offs["OFF_MAX"], num_warps=4,
        )
    _paged_topk_kernel[(B * Hkv,)](
        scores, seq_lens, num_fp16_blocks, out, scores.stride(0), scores.stride(1),
        out.stride(0), out.stride(1), k_out, Hkv=Hkv, U=layout.unit,
        SELECTION=layout.selection, N_POW2=n_pow2, FORCE_SINK_RECENT=bool(force_sink_recent),
        num_warps=8 if n_pow2 >= 1024 else 4,
    )
    return out


@functools.cache
def native_fp4_decode(device: torch.device) -> bool:
    """Whether the paged decode's FP4 dots go through the block-scaled MMA on ``device``:
    sm_120 (RTX / RTX PRO Blackwell) runs it at the decode's 16 query rows (warp-level
    ``mma.sync ... block_scale``, tests/test_blackwell_aot.py); sm_100 needs >= 128 rows
    (tcgen05), where Triton decomposes the dot into bf16 MMAs, so it keeps the decoded path of
    Hopper, which has no FP4 MMA at all. Cached: it is asked on every decode launch."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 12


def paged_decode_triton(
    layout: KVLayout, kv_cache: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None,
    value: torch.Tensor | None, *, block_table: torch.Tensor, seq_lens: torch.Tensor,
    num_fp16_blocks: torch.Tensor, scale: float, force_sink_recent: bool = False,
    out: torch.Tensor | None = None, max_num_fp16_blocks: int | None = None,
    sel: torch.Tensor | None = None, launch: dict | None = None, native: bool | None = None,
    math: str = "fp4",
) -> torch.Tensor:
    """Paged ThriftAttention decode, after the step's K/V were written (``write_kv_triton``).

    query ``[B, Hq, D]`` (row b = sequence b's one new token; fp16/bf16 = ``layout.dtype``);
    key/value ``[B, Hkv, D]``: the step's fresh K/V (read in the nvfp4 layout only, may be None
    in the auto layout); block_table int32 ``[B, max_pages]``; seq_lens int32 ``[B]`` (context
    including the new token; 0 = idle row, output zeros); num_fp16_blocks int32 ``[B]``: FP16
    units per sequence (``budget_to_k`` of a one-row grid); scale: softmax scale. ``sel``:
    precomputed :func:`paged_select_triton` output. ``launch``: overrides of
    ``PAGED_DECODE_LAUNCH`` (tuning probes). ``native``: FP4 dots on the block-scaled MMA
    (None: :func:`native_fp4_decode` of the device; True elsewhere is for tests and
    ahead-of-time compiles, same numbers). ``math``: ``"fp4"`` (the paper's semantics: q and P
    quantised to FP4) or ``"fp16"`` (Hopper, FP4 as storage: K/V decoded to the model dtype,
    q unquantised, P in the model dtype for the PV dot; ``thrift_vllm.paged.paged_attention``'s
    ``decode_math``); in the nvfp4 layout "fp16" runs no selection (``num_fp16_blocks`` and
    ``sel`` are ignored: only the step's own token is in the model dtype). ``launch`` then
    overrides ``PAGED_DECODE_FP16_LAUNCH``. Returns ``out`` ``[B, Hq, D]``.
    """
    B, Hq, D = query.shape
    if math not in DECODE_MATHS:
        raise ValueError(f"math must be one of {DECODE_MATHS}, got {math!r}")
    if math == "fp16" and native:
        raise ValueError("native=True (block-scaled FP4 MMA) needs math 'fp4', got 'fp16'")
    fp16 = math == "fp16"
    cfg = {**(PAGED_DECODE_FP16_LAUNCH if fp16 else PAGED_DECODE_LAUNCH), **(launch or {})}
    _check_decode(layout, query, key, value, block_table, seq_lens, num_fp16_blocks)
    Hkv = kv_cache.shape[1]
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads are not a multiple of {Hkv} KV heads")
    if layout.kv_layout == "nvfp4" and (key is None or value is None):
        raise ValueError("the nvfp4 layout needs the step's key and value")
    key = query if key is None else key  # unused (auto): any pointer of the right dtype
    value = query if value is None else value
    cache = cache_bytes(kv_cache, layout, Hkv)
    out = torch.empty_like(query) if out is None else out
    if B == 0:
        return out
    auto = layout.kv_layout == "auto"
    if fp16 and not auto:  # no selection: any int32 device pointer (not read), no launch
        sel = seq_lens.view(1, 1, -1)
    elif sel is None:
        sel = paged_select_triton(layout, kv_cache, query, block_table=block_table,
                                  seq_lens=seq_lens, num_fp16_blocks=num_fp16_blocks,
                                  force_sink_recent=force_sink_recent,
                                  max_num_fp16_blocks=max_num_fp16_blocks)
    k_sel = sel.shape[-1]
    sel_arg = sel if k_sel else torch.full((1, 1, 1), -1, dtype=torch.int32, device=query.device)
    n_max = _max_units(layout, block_table)
    splits, per = decode_split_plan(B, Hkv, n_max, cfg["target_programs"],
                                    cfg.get("min_tiles_per_split", 1))
    if fp16:  # a split holds whole tiles of units_per_iter units
        upi = int(cfg["units_per_iter"])
        if upi not in (1, 2):
            raise ValueError(f"units_per_iter must be 1 or 2, got {upi}")
        per = -(-per // upi) * upi
        splits = -(-n_max // per)
    acc = torch.empty(B, Hq, splits, D, dtype=torch.float32, device=query.device)
    ml = torch.empty(B, Hq, splits, 2, dtype=torch.float32, device=query.device)
    offs = region_offsets(layout)
    offs.pop("OFF_SUM")
    offs.pop("OFF_MAX")
    # The two kernels take the same tensors, strides and layout constants.
    args = (query, key, value, cache, block_table, seq_lens, sel_arg, acc, ml, scale * LOG2E,
            per, k_sel, query.stride(0), query.stride(1), key.stride(0), key.stride(1),
            value.stride(0), value.stride(1), block_table.stride(0), cache.stride(0),
            cache.stride(1), sel_arg.stride(0), sel_arg.stride(1), *acc.stride()[:3],
            *ml.stride()[:3])
    common = dict(Hkv=Hkv, U=layout.unit, P=layout.page_size, D=D, G=layout.group,
                  FMT=layout.quant_format, AUTO=auto, DOT_FP32=triton_interpreted(),
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                  **({"maxnreg": cfg["maxnreg"]} if cfg["maxnreg"] else {}), **offs)
    if fp16:
        group = Hq // Hkv
        block_h = int(cfg["block_h"]) or max(8 if cfg["swap"] else 16,
                                             triton.next_power_of_2(group))
        if block_h < group or block_h & (block_h - 1):
            raise ValueError(f"block_h {block_h}: a power of two >= the GQA group {group}")
        ops_f16 = bool(cfg["fp16_operands"])
        if ops_f16 and layout.quant_format != "nvfp4":
            raise ValueError(f"fp16_operands needs NVFP4 pages (exact in fp16), got "
                             f"{layout.quant_format!r}")
        _paged_decode_fp16_kernel[(B * Hkv, splits)](
            *args, GROUP=group, BLOCK_H=block_h, UPI=upi, SWAP=bool(cfg["swap"]),
            OPS_F16=ops_f16, **common)
    else:
        _paged_decode_kernel[(B * Hkv, splits)](
            *args, GROUP=Hq // Hkv, BLOCK_H=max(16, triton.next_power_of_2(Hq // Hkv)),
            NATIVE=native_fp4_decode(query.device) if native is None else bool(native),
            **common)
    _paged_reduce_kernel[(B * Hq,)](
        acc, ml, seq_lens, out, per, *acc.stride()[:3], *ml.stride()[:3], out.stride(0),
        out.stride(1), Hq=Hq, U=layout.unit, D=D, SPLIT_CHUNK=SPLIT_CHUNK,
    )
    return out


def host_to_device(values: Sequence[int], dtype: torch.dtype, device: torch.device
                   ) -> torch.Tensor:
    """A 1-D tensor of host ints on ``device`` without a stream sync: on CUDA through pinned
    memory and a non-blocking copy (PyTorch's caching host allocator keeps the pinned block
    until the copy has run); ``torch.tensor(..., device=cuda)`` copies from pageable memory
    and synchronises the stream, which per step stalls vLLM's asynchronous scheduling."""
    if torch.device(device).type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


@dataclass
class DecodeBatch:
    """Inputs of one :func:`paged_decode_triton` launch for a batch's one-token sequences."""

    rows: torch.Tensor | None  # int64 [n]: their query rows; None = rows 0..n-1 in order
    seq_lens: torch.Tensor  # int32 [n]: context incl. the new token; 0 = idle (padding) row
    num_fp16_blocks: torch.Tensor  # int32 [n]: FP16 units per sequence
    block_table: torch.Tensor  # int32 [n, max_pages]
    max_num_fp16_blocks: int  # width of the selected-unit lists

    @property
    def size(self) -> int:
        return self.seq_lens.shape[0]

    @classmethod
    def make(cls, query_start_loc: Sequence[int], seq_lens: Sequence[int], ks: Sequence[int],
             block_table: torch.Tensor) -> DecodeBatch | None:
        """The sequences with one query, from host lists (``ks``: FP16 units per sequence);
        None when there are none."""
        dec = [i for i in range(len(seq_lens)) if query_start_loc[i + 1] - query_start_loc[i] == 1]
        if not dec:
            return None
        dev = block_table.device

        def dev_tensor(values, dtype):
            return host_to_device(values, dtype, dev)

        return cls(rows=dev_tensor([query_start_loc[i] for i in dec], torch.long),
                   seq_lens=dev_tensor([seq_lens[i] for i in dec], torch.int32),
                   num_fp16_blocks=dev_tensor([ks[i] for i in dec], torch.int32),
                   block_table=block_table[dev_tensor(dec, torch.long)].to(torch.int32)
                   .contiguous(),
                   max_num_fp16_blocks=max(ks[i] for i in dec))

    @classmethod
    def from_budgets(cls, query_start_loc: Sequence[int], seq_lens: Sequence[int],
                     fp16_budgets: Sequence[float], block_table: torch.Tensor, unit: int
                     ) -> DecodeBatch | None:
        """:meth:`make` with each one-query sequence's k from its budget (``budget_to_k`` of
        its one-row grid)."""
        ks = [budget_to_k(float(b), BlockGrid(1, s, unit, True))
              if query_start_loc[i + 1] - query_start_loc[i] == 1 else 0
              for i, (b, s) in enumerate(zip(fp16_budgets, seq_lens, strict=True))]
        return cls.make(query_start_loc, seq_lens, ks, block_table)


def paged_decode_batch(layout: KVLayout, kv_cache: torch.Tensor, query: torch.Tensor,
                       key: torch.Tensor | None, value: torch.Tensor | None, dec: DecodeBatch,
                       *, scale: float, output: torch.Tensor, force_sink_recent: bool = False,
                       math: str = "fp4", launch: dict | None = None) -> torch.Tensor:
    """:func:`paged_decode_triton` for ``dec``'s sequences: query/key/value ``[T, H, D]`` (key
    and value read in the nvfp4 layout only), results into ``output [T, Hq, D]``'s rows (in
    place when the rows are 0..n-1 and the dtypes agree). ``math``: the decode math ("fp4" or
    "fp16", :func:`paged_decode_triton`); ``launch``: its launch overrides."""
    fresh = layout.kv_layout == "nvfp4"  # the auto layout reads only the pages
    rows = slice(0, dec.size) if dec.rows is None else dec.rows
    direct = dec.rows is None and output.dtype == query.dtype
    out = paged_decode_triton(
        layout, kv_cache, query[rows], key[rows] if fresh else None,
        value[rows] if fresh else None, block_table=dec.block_table, seq_lens=dec.seq_lens,
        num_fp16_blocks=dec.num_fp16_blocks, scale=scale, force_sink_recent=force_sink_recent,
        max_num_fp16_blocks=dec.max_num_fp16_blocks, out=output[:dec.size] if direct else None,
        math=math, launch=launch)
    if not direct:
        output[rows] = out.to(output.dtype)
    return output


def paged_attention_triton(
    layout: KVLayout, kv_cache: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None,
    value: torch.Tensor | None, *, query_start_loc: Sequence[int], seq_lens: Sequence[int],
    block_table: torch.Tensor, fp16_budgets: Sequence[float], scale: float,
    force_sink_recent: bool = False, output: torch.Tensor | None = None,
    skip_single_query: bool = False, bulk_math: str = "bf16", decode_math: str = "fp4",
) -> torch.Tensor:
    """``thrift_vllm.paged.paged_attention`` on the Triton kernels (same arguments, except the
    cache itself instead of its views): query ``[T, Hq, D]``, key/value ``[T, Hkv, D]`` (the
    step's fresh K/V), host ``query_start_loc [B + 1]``, ``seq_lens [B]``, ``fp16_budgets [B]``;
    block_table int32 ``[B, max_pages]``. Returns ``output [T, Hq, D]`` (rows of no sequence
    untouched). Sequences with one query go through one paged decode launch; longer ones are
    gathered and run through the contiguous prefill kernel, one launch set per sequence.
    ``skip_single_query``: leave the one-query sequences to the caller (the vLLM backend runs
    them through :func:`paged_decode_batch` with inputs its builder made once per step).
    ``bulk_math``: the prefill's FP4 blocks in ``"bf16"`` (exact), ``"fp8"`` (e4m3 operands,
    approximate) or ``"native"`` (Blackwell block-scaled MMA on the packed pages, exact; auto
    layout only; ``ops.paged_prefill``). ``decode_math``: the one-query sequences' math,
    ``"fp4"`` (exact FP4 semantics) or ``"fp16"`` (FP4 as storage; :func:`paged_decode_triton`).
    """
    if query.dim() != 3 or query.shape[2] != layout.head_size:
        raise ValueError(f"query must be [T, Hq, {layout.head_size}], got {tuple(query.shape)}")
    B = len(seq_lens)
    if len(query_start_loc) != B + 1 or len(fp16_budgets) != B:
        raise ValueError(f"{B} sequences need {B + 1} query_start_loc and {B} budgets")
    if layout.kv_layout == "nvfp4" and (key is None or value is None):
        raise ValueError("the nvfp4 layout needs the step's key and value")
    if decode_math not in DECODE_MATHS:
        raise ValueError(f"decode_math must be one of {DECODE_MATHS}, got {decode_math!r}")
    if bulk_math not in PAGED_BULK_MATHS:
        raise ValueError(f"bulk_math must be one of {PAGED_BULK_MATHS}, got {bulk_math!r}")
    if bulk_math == "native" and layout.kv_layout != "auto":
        raise ValueError(f"bulk_math 'native' needs the auto layout (V grouped along tokens), "
                         f"got the {layout.kv_layout!r} layout")
    output = torch.empty_like(query) if output is None else output
    dec = None if skip_single_query else DecodeBatch.from_budgets(
        query_start_loc, seq_lens, fp16_budgets, block_table, layout.unit)
    if dec is not None:
        paged_decode_batch(layout, kv_cache, query, key, value, dec, scale=scale,
                           output=output, force_sink_recent=force_sink_recent, math=decode_math)
    views = None
    for i in range(B):
        q0, q1, skv = query_start_loc[i], query_start_loc[i + 1], seq_lens[i]
        if q1 - q0 <= 1:
            continue
        if q1 - q0 > skv:
            raise ValueError(f"sequence {i}: {q1 - q0} queries but seq_len {skv}")
        views = layout.views(kv_cache) if views is None else views
        pages = block_table[i, :-(-skv // layout.page_size)].to(torch.int64)
        q = query[q0:q1].transpose(0, 1)[None].contiguous()
        kn = None if key is None else key[q0:q1]
        vn = None if value is None else value[q0:q1]
        out = prefill_sequence(layout, views, q, kn, vn, pages, skv, float(fp16_budgets[i]),
                               scale, force_sink_recent, bulk_math)
        output[q0:q1] = out[0].transpose(0, 1).to(output.dtype)
    return output
