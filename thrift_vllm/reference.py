"""ThriftAttention numerics, defined once in plain PyTorch (fp32). This is the CPU execution path
and the reference every kernel is tested against.

For query row ``i`` (absolute position ``t_i = Skv - Sq + i``) and key tile ``j`` (``block_size``
keys), with ``s = sm_scale * q . k``:

* FP16 tile (``j`` selected for the row's query block): scores from the original fp16/bf16
  ``q, k``; weights ``w = exp(s - M_i)``; values the original ``v``.
* FP4 tile (all others): scores from FP4 ``q`` and ``k`` (both quantised along head_dim, per
  token). With the tile's own row max ``mt = max_j s``, ``p = exp(s - mt)`` (so ``max p = 1``) is
  quantised along the keys in groups of 16 (nvfp4) or 32 (mxfp4). NVFP4 P uses two levels: group
  scale ``e4m3(448 * amax_g)`` times the constant ``1 / 2688``, so the tile's largest weight is
  exactly 1; MXFP4 P uses its e8m0 group scale. Then ``w = deq(P) * exp(mt - M_i)`` and the values
  are FP4 ``v``, quantised along the sequence (16/32 tokens per group per channel, groups aligned
  to token 0, so each group lies in one tile).
* ``out_i = sum_j w_ij v_j / sum_j w_ij``: the denominator sums the very weights that multiply V
  (for FP4 tiles, the quantised ones). Keys past the causal diagonal get no weight at all.

Because each FP4 tile is quantised against its own row max, the result does not depend on the
order tiles are visited; an online-softmax kernel computes the same function up to fp32 rounding
(and the rare e2m1 rounding tie that fp32 noise flips).

Causality and FP4 V (by design: native block-scaled P @ V MMA needs V grouped along tokens).
A V group is G = 16 (nvfp4) or 32 (mxfp4) consecutive tokens of one channel, aligned to token 0
and hence to the tiles. The group holding query position ``t`` also holds the up to G - 1 later
tokens ``t + 1 .. G * (t // G + 1) - 1``; they get no weight, but their values enter the group's
per-channel scale. So when the row's *diagonal* tile is FP4, ``out_t`` can depend on values at
those later positions (and on no others: earlier groups, and every FP4 tile before the diagonal,
hold only tokens ``<= t``). Keys never leak (FP4 k is per token; P groups see masked zeros), and
a diagonal tile computed in FP16 (selection "local", ``force_sink_recent=True`` with a positive
budget, or budget 1 / method "fp16") removes the effect entirely.
"""

from __future__ import annotations

import torch

from thrift_vllm.formats import (
    E4M3_MAX,
    GROUP_SIZE,
    dequantize,
    e2m1_decode,
    e2m1_encode,
    e8m0_ceil,
    e8m0_to_float,
    quantize,
    round_e4m3,
)
from thrift_vllm.selection import BlockGrid

# NVFP4 P: group scale e4m3(amax * P_SCALE_MUL) times 1 / P_ROW_DIV; the max weight 1 maps to the
# group scale 448 and the code 6, both exact.
P_SCALE_MUL = E4M3_MAX
P_ROW_DIV = 6.0 * E4M3_MAX


def quantize_p(p: torch.Tensor, quant_format: str) -> torch.Tensor:
    """Fake-quantise softmax weights ``p [..., n_tiles, block]`` (values in [0, 1]) per group of
    keys inside each tile; returns the dequantised fp32 weights."""
    group = GROUP_SIZE[quant_format]
    shp = p.shape
    g = p.reshape(*shp[:-1], shp[-1] // group, group)
    amax = g.amax(dim=-1, keepdim=True)
    if quant_format == "nvfp4":
        gscale = round_e4m3(amax * P_SCALE_MUL)
        step = gscale / P_ROW_DIV
    else:
        step = e8m0_to_float(e8m0_ceil(amax / 6.0))
        step = torch.where(amax > 0, step, torch.zeros_like(step))
    safe = torch.where(step > 0, step, torch.ones_like(step))
    codes = e2m1_encode(torch.where(step > 0, g / safe, torch.zeros_like(g)))
    return (e2m1_decode(codes) * step).reshape(shp)


def fp4_operands(q, k, v, quant_format: str, v_axis: str = "tokens"):
    """FP4 (dequantised, fp32) copies of q, k (along head_dim) and v (along ``v_axis``)."""
    q4 = dequantize(quantize(q, quant_format, -1), torch.float32)
    k4 = dequantize(quantize(k, quant_format, -1), torch.float32)
    vax = -2 if v_axis == "tokens" else -1
    v4 = dequantize(quantize(v, quant_format, vax), torch.float32)
    return q4, k4, v4


def tile_mask(sel: torch.Tensor, n_kv_blocks: int) -> torch.Tensor:
    """Selected block lists ``[B, Hq, nq, k]`` (-1 padded) -> bool ``[B, Hq, nq, n_kv_blocks]``."""
    B, H, nq, _ = sel.shape
    m = torch.zeros(B, H, nq, n_kv_blocks + 1, dtype=torch.bool, device=sel.device)
    idx = torch.where(sel < 0, n_kv_blocks, sel).long()
    m.scatter_(-1, idx, True)
    return m[..., :n_kv_blocks]


def thrift_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sel: torch.Tensor,
    *,
    causal: bool = True,
    quant_format: str = "nvfp4",
    block_size: int = 64,
    sm_scale: float | None = None,
    v_axis: str = "tokens",
    chunk_rows: int = 256,
    fp4_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Reference ThriftAttention.

    q ``[B, Hq, Sq, D]``, k and v ``[B, Hkv, Skv, D]`` (fp16/bf16/fp32), ``sel`` int32
    ``[B, Hq, n_q_blocks, k]`` from ``select_blocks`` (-1 padded; empty last dim = pure FP4).
    Returns ``[B, Hq, Sq, D]`` in q's dtype. Queries are processed in chunks of ``chunk_rows`` to
    bound memory (fp32 scores of one chunk against all keys). ``fp4_kv``: the FP4 tiles' keys and
    values already dequantised (``[B, Hkv, Skv, D]`` each, e.g. read from a paged FP4 cache)
    instead of quantising ``k`` and ``v`` here (``v_axis`` is then unused).
    """
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    group = Hq // Hkv
    grid = BlockGrid(Sq, Skv, block_size, causal)
    nk = grid.num_kv_blocks
    scale = sm_scale if sm_scale is not None else D**-0.5
    tiles = tile_mask(sel, nk) if sel.shape[-1] else torch.zeros(
        B, Hq, grid.num_q_blocks, nk, dtype=torch.bool, device=q.device)
    if fp4_kv is None:
        q4, k4, v4 = fp4_operands(q, k, v, quant_format, v_axis)
    else:
        q4 = dequantize(quantize(q, quant_format, -1), torch.float32)
        k4, v4 = (t.float() for t in fp4_kv)
    kf, vf = k.float(), v.float()
    if group > 1:
        kf, vf, k4, v4 = (t.repeat_interleave(group, dim=1) for t in (kf, vf, k4, v4))
    pad = nk * block_size - Skv
    key_pos = torch.arange(nk * block_size, device=q.device)
    out = torch.empty(B, Hq, Sq, D, dtype=torch.float32, device=q.device)
    for r0 in range(0, Sq, chunk_rows):
        r1 = min(r0 + chunk_rows, Sq)
        pos = torch.arange(r0, r1, device=q.device) + grid.q_offset
        allowed = key_pos[None, :] < Skv
        if causal:
            allowed = allowed & (key_pos[None, :] <= pos[:, None])
        blk = pos // block_size - grid.first_q_block
        sel_rows = tiles[:, :, blk]  # [B, Hq, R, nk]
        s16 = torch.nn.functional.pad(q[:, :, r0:r1].float() @ kf.transpose(-1, -2), (0, pad))
        s4 = torch.nn.functional.pad(q4[:, :, r0:r1] @ k4.transpose(-1, -2), (0, pad))
        s16 = (s16 * scale).masked_fill(~allowed, float("-inf"))
        s4 = (s4 * scale).masked_fill(~allowed, float("-inf"))
        t16 = s16.view(B, Hq, r1 - r0, nk, block_size)
        t4 = s4.view(B, Hq, r1 - r0, nk, block_size)
        mt4 = t4.amax(-1)
        mt16 = t16.amax(-1)
        m_row = torch.where(sel_rows, mt16, mt4).amax(-1)  # finite: every row sees key 0
        safe_mt4 = torch.where(torch.isfinite(mt4), mt4, torch.zeros_like(mt4))
        p4 = quantize_p(torch.exp(t4 - safe_mt4[..., None]), quant_format)
        w4 = p4 * torch.exp(mt4 - m_row[..., None])[..., None]
        w16 = torch.exp(t16 - m_row[..., None, None])
        w4 = torch.where(sel_rows[..., None], torch.zeros_like(w4), w4).flatten(-2)[..., :Skv]
        w16 = torch.where(sel_rows[..., None], w16, torch.zeros_like(w16)).flatten(-2)[..., :Skv]
        num = w16 @ vf + w4 @ v4
        den = w16.sum(-1, keepdim=True) + w4.sum(-1, keepdim=True)
        out[:, :, r0:r1] = num / den
    return out.to(q.dtype)
