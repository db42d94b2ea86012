"""Paged FP4 KV cache semantics in plain PyTorch (``notes/paged_kv.md``).

This is the CPU path of the vLLM backend and the reference the Triton kernels
(``thrift_vllm.ops.kv_write``, ``thrift_vllm.ops.paged_attention``) are tested against. Numerics
are not re-implemented here: FP4 is ``thrift_vllm.formats``, selection
``thrift_vllm.selection.select_blocks_reference``, attention
``thrift_vllm.reference.thrift_attention_reference`` (and the exact path of
``thrift_vllm.attention`` at budget 1).

* :func:`write_kv` stores one step's K/V through ``slot_mapping`` (slot = block * P + offset,
  -1 = padding): model-dtype copies (auto layout), per-token FP4 of K (and V in the nvfp4 layout),
  the auto layout's V groups re-quantised along tokens, and the key summaries of every touched
  selection unit.
* :func:`paged_attention` gathers each sequence through its block table and computes the doc's
  definition on the contiguous tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from thrift_vllm.api import _exact_attention
from thrift_vllm.formats import QuantizedTensor, dequantize, quantize
from thrift_vllm.kv_layout import KVLayout, KVViews
from thrift_vllm.reference import thrift_attention_reference
from thrift_vllm.selection import select_blocks_reference


def _scale_bytes(qt: QuantizedTensor) -> torch.Tensor:
    """Stored scales as uint8 bytes (nvfp4 e4m3 bits, mxfp4 e8m0 exponents)."""
    return qt.scales.view(torch.uint8) if qt.scales.dtype != torch.uint8 else qt.scales


def dequantize_stored(data: torch.Tensor, scales: torch.Tensor, quant_format: str,
                      n: int | None = None) -> torch.Tensor:
    """Decode stored FP4 bytes along the last axis: ``data`` uint8 ``[..., m/2]`` and ``scales``
    uint8 ``[..., m/g]`` -> fp32 ``[..., n]`` (``n`` defaults to ``m``; exact in fp32)."""
    n = data.shape[-1] * 2 if n is None else n
    sc = scales.view(torch.float8_e4m3fn) if quant_format == "nvfp4" else scales
    qt = QuantizedTensor(data, sc, quant_format, data.dim() - 1, (*data.shape[:-1], n),
                         torch.float32)
    return dequantize(qt)


def _check_step(layout: KVLayout, key: torch.Tensor, value: torch.Tensor,
                slot_mapping: torch.Tensor, num_kv_heads: int) -> None:
    D = layout.head_size
    for name, t in (("key", key), ("value", value)):
        if t.dim() != 3 or t.shape[1:] != (num_kv_heads, D):
            raise ValueError(f"{name} must be [T, {num_kv_heads}, {D}], got {tuple(t.shape)}")
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] > key.shape[0]:
        raise ValueError(f"slot_mapping must be [T <= {key.shape[0]}], got "
                         f"{tuple(slot_mapping.shape)}")


def _touched(blocks: torch.Tensor, offsets: torch.Tensor, span: int, per_page: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct ``(block, offset // span)`` cells hit by a step and, for each, the number of
    valid tokens ``max offset in the cell - cell start + 1``. Returns (blocks, cells, counts)."""
    ids = blocks * per_page + offsets // span
    uniq, inv = torch.unique(ids, return_inverse=True)
    last = torch.full_like(uniq, -1).scatter_reduce(0, inv, offsets % span, "amax")
    return uniq // per_page, uniq % per_page, last + 1


def write_kv(layout: KVLayout, views: KVViews, key: torch.Tensor, value: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write one step's ``key``/``value`` ``[T, Hkv, D]`` (model dtype) into the pages.

    ``slot_mapping`` int ``[T' <= T]`` (rows past ``T'`` and slots ``-1`` are skipped). Rules
    (notes/paged_kv.md): per-token FP4 of K (and of V in the nvfp4 layout) exactly as
    ``formats.quantize(x, axis=-1)``; auto layout: every V group (``g`` tokens of one channel)
    the step touches is re-quantised from ``v_hi`` over its offsets up to the largest one written
    in this step (later slots count as zeros); every touched selection unit's summaries are
    recomputed in fp32 from its stored keys (auto: ``k_hi``, nvfp4: dequantised ``k4``) over its
    offsets up to the largest one written.
    """
    H = views.k4.shape[1]
    _check_step(layout, key, value, slot_mapping, H)
    n = slot_mapping.shape[0]
    slots = slot_mapping.to(torch.int64)
    keep = slots >= 0
    key, value = key[:n][keep], value[:n][keep]
    slots = slots[keep]
    if slots.numel() == 0:
        return
    P, fmt = layout.page_size, layout.quant_format
    blocks, offsets = slots // P, slots % P
    # Advanced indices on dims 0 and 2 of [nb, H, P, x] address [n, H, x]: the token rows.
    if layout.kv_layout == "auto":
        views.k_hi[blocks, :, offsets] = key.to(layout.dtype)
        views.v_hi[blocks, :, offsets] = value.to(layout.dtype)
    qk = quantize(key, fmt, axis=-1)
    views.k4[blocks, :, offsets] = qk.data
    views.k4_scales[blocks, :, offsets] = _scale_bytes(qk)
    if layout.kv_layout == "nvfp4":
        qv = quantize(value, fmt, axis=-1)
        views.v4[blocks, :, offsets] = qv.data
        views.v4_scales[blocks, :, offsets] = _scale_bytes(qv)
    else:
        _requantize_v_groups(layout, views, blocks, offsets)
    _update_summaries(layout, views, blocks, offsets)


def _requantize_v_groups(layout: KVLayout, views: KVViews, blocks: torch.Tensor,
                         offsets: torch.Tensor) -> None:
    """Auto layout: re-quantise every touched V group along tokens from ``v_hi``."""
    P, g = layout.page_size, layout.group
    nb, H, _, D = views.v_hi.shape
    gb, gi, count = _touched(blocks, offsets, g, P // g)
    grp = views.v_hi.view(nb, H, P // g, g, D)[gb, :, gi].float()  # [m, H, g, D]
    # [m, g]: slots past the last one written in this step are stale and count as zeros
    valid = torch.arange(g, device=grp.device)[None, :] < count[:, None]
    grp = torch.where(valid[:, None, :, None], grp, torch.zeros_like(grp))
    qv = quantize(grp, layout.quant_format, axis=-2)  # data [m, H, D, g/2], scales [m, H, D, 1]
    # v4 [nb, H, D, P/2] -> [nb, H, D, P/g, g/2]; indices on dims 0 and 3 -> [m, H, D, g/2]
    views.v4.view(nb, H, D, P // g, g // 2)[gb, :, :, gi] = qv.data
    views.v4_scales[gb, :, :, gi] = _scale_bytes(qv)[..., 0]


def unit_keys(layout: KVLayout, views: KVViews, blocks: torch.Tensor, units: torch.Tensor
              ) -> torch.Tensor:
    """Stored keys of selection units ``(blocks[i], units[i])`` as fp32 ``[m, H, U, D]``:
    ``k_hi`` (auto) or the dequantised ``k4`` (nvfp4)."""
    U, D = layout.unit, layout.head_size
    nb, H = views.k4.shape[:2]
    n_u = layout.n_units
    if layout.kv_layout == "auto":
        return views.k_hi.view(nb, H, n_u, U, D)[blocks, :, units].float()
    data = views.k4.view(nb, H, n_u, U, D // 2)[blocks, :, units]
    scales = views.k4_scales.view(nb, H, n_u, U, D // layout.group)[blocks, :, units]
    return dequantize_stored(data, scales, layout.quant_format, D)


def unit_summaries(keys: torch.Tensor, counts: torch.Tensor, selection: str
                   ) -> dict[str, torch.Tensor]:
    """fp32 summaries of units ``keys [m, H, U, D]`` over their first ``counts[i]`` tokens,
    reduced like ``thrift_vllm.selection`` does (zero / +-inf fill, sum then divide)."""
    U = keys.shape[2]
    valid = torch.arange(U, device=keys.device)[None, :] < counts[:, None]
    valid = valid[:, None, :, None]  # [m, 1, U, 1]
    out = {}
    if selection == "block_mean":
        buf = torch.where(valid, keys, torch.zeros_like(keys))
        out["k_mean"] = buf.sum(dim=2) / counts.clamp(min=1).float()[:, None, None]
    elif selection == "quest":
        inf = torch.full_like(keys, float("inf"))
        out["k_min"] = torch.where(valid, keys, inf).amin(dim=2)
        out["k_max"] = torch.where(valid, keys, -inf).amax(dim=2)
    return out


def _update_summaries(layout: KVLayout, views: KVViews, blocks: torch.Tensor,
                      offsets: torch.Tensor) -> None:
    if not layout.summary_names:
        return
    ub, ui, count = _touched(blocks, offsets, layout.unit, layout.n_units)
    sums = unit_summaries(unit_keys(layout, views, ub, ui), count, layout.selection)
    for name, val in sums.items():
        getattr(views, name)[ub, :, ui] = val  # [nb, H, n_u, D] at dims 0, 2 -> [m, H, D]


# --- attention ----------------------------------------------------------------------------------

def _gather_rows(t: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
    """``t [nb, H, R, X]`` at ``pages`` -> ``[H, n_pages * R, X]`` (pages concatenated)."""
    g = t[pages].transpose(0, 1)
    return g.reshape(g.shape[0], -1, g.shape[-1])


def gather_sequence(layout: KVLayout, views: KVViews, pages: torch.Tensor, seq_len: int
                    ) -> dict[str, torch.Tensor]:
    """One sequence's stored K/V on ``pages`` (its block-table row, int64), cut to ``seq_len``.

    Returns ``[Hkv, seq_len, D]`` tensors: ``k4``, ``v4`` (dequantised FP4, fp32) and, in the
    auto layout, ``k_hi``, ``v_hi`` (model dtype).
    """
    D, S = layout.head_size, seq_len
    out = {}
    if layout.kv_layout == "auto":
        out["k_hi"] = _gather_rows(views.k_hi, pages)[:, :S]
        out["v_hi"] = _gather_rows(views.v_hi, pages)[:, :S]
        # v4 [nb, H, D, P/2]: per channel, pages side by side along tokens
        v4 = views.v4[pages].permute(1, 2, 0, 3).flatten(-2)
        v4s = views.v4_scales[pages].permute(1, 2, 0, 3).flatten(-2)
        out["v4"] = dequantize_stored(v4, v4s, layout.quant_format)[..., :S].transpose(-1, -2)
    else:
        out["v4"] = dequantize_stored(_gather_rows(views.v4, pages),
                                      _gather_rows(views.v4_scales, pages),
                                      layout.quant_format, D)[:, :S]
    out["k4"] = dequantize_stored(_gather_rows(views.k4, pages),
                                  _gather_rows(views.k4_scales, pages),
                                  layout.quant_format, D)[:, :S]
    return out


DECODE_MATHS = ("fp4", "fp16")


def decode_fp16_reference(layout: KVLayout, kv: dict[str, torch.Tensor], q: torch.Tensor,
                          key: torch.Tensor | None, value: torch.Tensor | None, budget: float,
                          scale: float, force_sink_recent: bool = False) -> torch.Tensor:
    """Decode math "fp16" (FP4 as storage) for one sequence's one query.

    ``kv``: :func:`gather_sequence`'s tensors (``[Hkv, S, D]``); q ``[Hq, D]`` (model dtype, not
    quantised); key/value ``[Hkv, D]``: the step's fresh K/V (nvfp4 layout). K/V per position:
    auto layout: ``k_hi``/``v_hi`` on the units selected for ``budget`` (the FP4 path's
    selection, unchanged), the dequantised ``k4``/``v4`` elsewhere; nvfp4 layout: dequantised
    ``k4``/``v4`` everywhere (the budget changes nothing) except position S - 1, which is the
    fresh ``key``/``value``. Dequantised values are rounded to the model dtype (exact for NVFP4
    and for MXFP4 in bf16; MXFP4 in fp16 can leave fp16's range) — the kernel's operands.
    Computed in float32: s = scale q.K^T, p = exp(s - max s), out = (p rounded to the model
    dtype) . V / sum(p) — P is rounded before the PV product as the kernel (and FlashAttention)
    does; its online softmax rounds p against the running maximum instead, a difference of the
    model dtype's rounding. Returns fp32 ``[Hq, D]``.
    """
    dt = q.dtype
    Hq = q.shape[0]
    Hkv, S = kv["k4"].shape[:2]
    group = Hq // Hkv
    k = kv["k4"].to(dt).float()
    v = kv["v4"].to(dt).float()
    if layout.kv_layout == "nvfp4":
        k[:, S - 1] = key.float()
        v[:, S - 1] = value.float()
    else:
        sel = select_blocks_reference(
            q[None, :, None], kv["k_hi"][None], fp16_budget=budget, selection=layout.selection,
            block_size=layout.unit, causal=True, force_sink_recent=force_sink_recent)
        hi = torch.zeros(Hkv, S, dtype=torch.bool, device=q.device)
        U = layout.unit
        for h in range(Hkv):  # GQA decode: the group's heads share one selection
            for j in sel[0, h * group, 0].tolist():
                if j >= 0:
                    hi[h, j * U:(j + 1) * U] = True
        k = torch.where(hi[..., None], kv["k_hi"].float(), k)
        v = torch.where(hi[..., None], kv["v_hi"].float(), v)
    k = k.repeat_interleave(group, dim=0)  # [Hq, S, D]
    v = v.repeat_interleave(group, dim=0)
    s = torch.einsum("hd,hsd->hs", q.float(), k) * scale
    p = torch.exp(s - s.amax(dim=-1, keepdim=True))
    return torch.einsum("hs,hsd->hd", p.to(dt).float(), v) / p.sum(dim=-1, keepdim=True)


def paged_attention(
    layout: KVLayout,
    views: KVViews,
    query: torch.Tensor,
    key: torch.Tensor | None,
    value: torch.Tensor | None,
    *,
    query_start_loc: Sequence[int],
    seq_lens: Sequence[int],
    block_table: torch.Tensor,
    fp16_budgets: Sequence[float],
    scale: float,
    force_sink_recent: bool = False,
    output: torch.Tensor | None = None,
    decode_math: str = "fp4",
) -> torch.Tensor:
    """ThriftAttention over the paged cache, after :func:`write_kv` stored this step's K/V.

    query ``[T, Hq, D]`` (model dtype); ``key``/``value`` ``[T, Hkv, D]``: this step's fresh K/V
    (rows aligned with ``query``; needed by the nvfp4 layout, whose FP16 path uses them for the
    step's own tokens). ``query_start_loc`` (host ints, ``[B + 1]``), ``seq_lens`` (host ints,
    ``[B]``, context including this step's tokens), ``block_table`` int ``[B, max_blocks]``,
    ``fp16_budgets`` per sequence, ``scale`` the softmax scale. Sequence ``i``'s queries are
    rows ``query_start_loc[i]:query_start_loc[i + 1]`` = its last positions (bottom-right
    causal). Returns ``output`` (``[T, Hq, D]``, allocated if None; rows of no sequence are left
    as they are).

    Per sequence (notes/paged_kv.md): ``sel = select_blocks_reference(q, K_sel, ...)`` with the
    layout's selection and unit, then ``thrift_attention_reference(q, K16, V16, sel,
    fp4_kv=(deq k4, deq v4))``, or exact attention on ``K16, V16`` at budget 1 (as
    ``thrift_vllm.attention`` does). auto: ``K_sel = K16 = k_hi``, ``V16 = v_hi``; nvfp4:
    ``K_sel = deq(k4)``, ``K16 / V16 = deq(k4) / deq(v4)`` with the step's tokens replaced by
    the fresh ``key`` / ``value``.

    ``decode_math`` (sequences with one query only; longer ones keep the definition above):
    ``"fp4"`` = that definition (q and P quantised to FP4 on the FP4 units); ``"fp16"`` = FP4
    as storage (Hopper), :func:`decode_fp16_reference`, except budget 1 in the auto layout,
    which is the exact path above (every unit reads the model-dtype copy).
    """
    if decode_math not in DECODE_MATHS:
        raise ValueError(f"decode_math must be one of {DECODE_MATHS}, got {decode_math!r}")
    D = query.shape[-1]
    if query.dim() != 3 or D != layout.head_size:
        raise ValueError(f"query must be [T, Hq, {layout.head_size}], got {tuple(query.shape)}")
    B = len(seq_lens)
    if len(query_start_loc) != B + 1 or len(fp16_budgets) != B:
        raise ValueError(f"{B} sequences need {B + 1} query_start_loc and {B} budgets, got "
                         f"{len(query_start_loc)} and {len(fp16_budgets)}")
    fresh = layout.kv_layout == "nvfp4"
    if fresh and (key is None or value is None):
        raise ValueError("the nvfp4 layout needs this step's key and value")
    if output is None:
        output = torch.empty_like(query)
    P = layout.page_size
    for i in range(B):
        q0, q1, skv = query_start_loc[i], query_start_loc[i + 1], seq_lens[i]
        sq = q1 - q0
        if sq <= 0:
            continue
        if sq > skv:
            raise ValueError(f"sequence {i}: {sq} queries but seq_len {skv}")
        pages = block_table[i, :-(-skv // P)].to(torch.int64)
        kv = gather_sequence(layout, views, pages, skv)
        if fresh:
            k_sel = kv["k4"]
            k16 = torch.cat([kv["k4"][:, :skv - sq], key[q0:q1].transpose(0, 1).float()], 1)
            v16 = torch.cat([kv["v4"][:, :skv - sq], value[q0:q1].transpose(0, 1).float()], 1)
        else:
            k_sel, k16, v16 = kv["k_hi"], kv["k_hi"], kv["v_hi"]
        q = query[q0:q1].transpose(0, 1)[None]  # [1, Hq, sq, D]
        budget = float(fp16_budgets[i])
        # fp16 decode math, except budget 1 in the auto layout: every unit reads the model-dtype
        # copy there, and the exact path below keeps a token's bits the same as a decode and
        # inside a prefill (the nvfp4 layout has no such copy: its budget changes nothing)
        if sq == 1 and decode_math == "fp16" and (fresh or budget < 1.0):
            out = decode_fp16_reference(layout, kv, q[0, :, 0], None if key is None else key[q0],
                                        None if value is None else value[q0], budget, scale,
                                        force_sink_recent)
            output[q0] = out.to(output.dtype)
            continue
        k16, v16, k_sel = k16[None], v16[None], k_sel[None]
        if budget == 1.0:
            # float64 (its default): the same bits whether the query decodes alone or sits in
            # a prefill chunk, so preemption and chunking do not change budget-1 outputs
            out = _exact_attention(q, k16, v16, True, scale)
        else:
            sel = select_blocks_reference(
                q, k_sel, fp16_budget=budget, selection=layout.selection,
                block_size=layout.unit, causal=True, force_sink_recent=force_sink_recent)
            out = thrift_attention_reference(
                q, k16, v16, sel, causal=True, quant_format=layout.quant_format,
                block_size=layout.unit, sm_scale=scale,
                fp4_kv=(kv["k4"][None], kv["v4"][None]))
        output[q0:q1] = out[0].transpose(0, 1).to(output.dtype)
    return output
