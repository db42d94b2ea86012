"""FP4 K/V *storage* with full-precision math, and two levers that make FP4 pages keep more
(issue 17), at reference level (plain PyTorch, any device).

"FP4 as storage": K and V are kept only as FP4 (per token, groups along head_dim — the ``nvfp4``
paged layout's storage) and read back dequantised; q, the softmax weights P and all arithmetic
stay in full precision (the Hopper decode math). Levers, applied before quantising:

* **K smoothing** (SageAttention): store ``K - m`` with ``m`` a per-channel mean of K.
  ``smooth="first"``: ``m`` = mean of the first ``unit`` tokens of the sequence, one vector per
  (layer, head), fixed after the first page (causal: usable on the write path of a decode).
  ``"head"``: mean over the whole sequence (an oracle bound for a per-(layer, head) mean).
  ``"unit"``: each unit of ``unit`` tokens subtracts its own mean (= the block_mean summary).
  A mean shared by all keys of a query's row adds ``q . m`` to every score of the row, so the
  softmax is unchanged and readers may drop it; a per-unit mean differs between units, so a
  reader adds ``q . m_u`` back (one dot per unit, the dot block_mean selection already does).
  ``store_kv`` returns the reconstruction ``deq(K - m) + m``, which gives the same scores.
* **Hadamard rotation** (QuaRot style): store ``K H`` and ``V H`` with ``H`` the orthonormal
  Sylvester-Hadamard matrix of size head_dim; a reader rotates q the same way
  (``(qH) . (KH) = q . K``) and applies ``H^T`` to the output (``P (VH) H^T = P V``).
  ``store_kv`` returns ``deq(KH) H^T``, ``deq(VH) H^T`` (the same scores and outputs).

``storage_attention`` is exact causal attention over such K/V; ``mixed_attention`` is the
``auto`` layout's variant: per (query block, key block), the blocks a selection picked read the
model-dtype K/V and the others the FP4 reconstruction, all math full precision.
"""

from __future__ import annotations

import math

import torch

from thrift_vllm.formats import fake_quantize
from thrift_vllm.reference import tile_mask
from thrift_vllm.selection import BlockGrid

SMOOTHS = ("none", "first", "head", "unit")


def hadamard(d: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard matrix ``[d, d]`` (``H @ H.T = I``); ``d`` a power of 2."""
    if not isinstance(d, int) or d < 1 or d & (d - 1):
        raise ValueError(f"hadamard needs a power-of-2 size, got {d!r}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(d)).to(device=device, dtype=dtype)


def k_mean(k: torch.Tensor, smooth: str, unit: int = 64) -> torch.Tensor | None:
    """The per-channel mean to subtract from ``k [..., S, D]`` (broadcastable to k, fp32), or
    None for ``"none"``. Modes: module docstring."""
    if smooth not in SMOOTHS:
        raise ValueError(f"smooth must be one of {SMOOTHS}, got {smooth!r}")
    if not isinstance(unit, int) or unit < 1:
        raise ValueError(f"unit must be a positive int, got {unit!r}")
    kf = k.float()
    if smooth == "none":
        return None
    if smooth == "first":
        return kf[..., :unit, :].mean(-2, keepdim=True)
    if smooth == "head":
        return kf.mean(-2, keepdim=True)
    S = kf.shape[-2]
    n = -(-S // unit)
    pad = torch.nn.functional.pad(kf, (0, 0, 0, n * unit - S))
    sums = pad.unflatten(-2, (n, unit)).sum(-2)  # padding rows are zeros
    counts = torch.full((n,), float(unit), device=k.device)
    counts[-1] = S - (n - 1) * unit
    means = sums / counts[:, None]
    return means.repeat_interleave(unit, dim=-2)[..., :S, :]


def store_kv(k: torch.Tensor, v: torch.Tensor, quant_format: str = "nvfp4",
             smooth: str = "none", rotate: bool = False, unit: int = 64,
             v_axis: str = "head_dim"):
    """What a reader of FP4 pages sees, in the original basis (fp32, shapes of k ``[..., S, D]``
    and v): K quantised per token along head_dim after smoothing / rotation, V after rotation,
    along head_dim (the nvfp4 layout) or along tokens (``v_axis="tokens"``: groups of tokens
    aligned to token 0, the auto layout's ``v4``); see the module docstring for why these
    reconstructions give the readers' scores/outputs."""
    if v_axis not in ("head_dim", "tokens"):
        raise ValueError(f"v_axis must be 'head_dim' or 'tokens', got {v_axis!r}")
    vax = -1 if v_axis == "head_dim" else -2
    m = k_mean(k, smooth, unit)
    kf, vf = k.float(), v.float()
    ks = kf if m is None else kf - m
    if rotate:
        h = hadamard(k.shape[-1], k.device)
        k_hat = fake_quantize(ks @ h, quant_format, -1) @ h.T
        v_hat = fake_quantize(vf @ h, quant_format, vax) @ h.T
    else:
        k_hat = fake_quantize(ks, quant_format, -1)
        v_hat = fake_quantize(vf, quant_format, vax)
    return (k_hat if m is None else k_hat + m), v_hat


def _expand(t: torch.Tensor, group: int) -> torch.Tensor:
    return t.repeat_interleave(group, dim=1) if group > 1 else t


def storage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      scale: float | None = None) -> torch.Tensor:
    """Exact causal attention in fp32 (GQA): q ``[B, Hq, S, D]``, k/v ``[B, Hkv, S, D]`` (e.g.
    ``store_kv``'s reconstructions) -> ``[B, Hq, S, D]`` fp32."""
    g = q.shape[1] // k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        q.float(), _expand(k.float(), g), _expand(v.float(), g), is_causal=True,
        scale=scale)


def mixed_attention(q: torch.Tensor, k_hi: torch.Tensor, v_hi: torch.Tensor,
                    k_lo: torch.Tensor, v_lo: torch.Tensor, sel: torch.Tensor,
                    block_size: int = 64, scale: float | None = None,
                    chunk_rows: int = 256) -> torch.Tensor:
    """Causal attention (square, ``Sq = Skv = S``) where, for each query block, the key blocks in
    ``sel`` (``[B, Hq, n_q_blocks, k]`` int32, -1 padded, from ``select_blocks``) read
    ``k_hi/v_hi`` and every other key block ``k_lo/v_lo``; one softmax over the row, fp32 math.
    q ``[B, Hq, S, D]``, the K/V ``[B, Hkv, S, D]``. Returns ``[B, Hq, S, D]`` fp32."""
    B, Hq, S, D = q.shape
    g = Hq // k_hi.shape[1]
    grid = BlockGrid(S, S, block_size, True)
    nk = grid.num_kv_blocks
    scale = scale if scale is not None else D ** -0.5
    tiles = tile_mask(sel, nk) if sel.shape[-1] else torch.zeros(
        B, Hq, grid.num_q_blocks, nk, dtype=torch.bool, device=q.device)
    kh, vh, kl, vl = (_expand(t.float(), g) for t in (k_hi, v_hi, k_lo, v_lo))
    qf = q.float() * scale
    key_blk = torch.arange(S, device=q.device) // block_size
    out = torch.empty(B, Hq, S, D, dtype=torch.float32, device=q.device)
    for r0 in range(0, S, chunk_rows):
        r1 = min(r0 + chunk_rows, S)
        pos = torch.arange(r0, r1, device=q.device)
        hi = tiles[:, :, pos // block_size][..., key_blk[:r1]]  # [B, Hq, R, r1]
        s = torch.where(hi, qf[:, :, r0:r1] @ kh[:, :, :r1].transpose(-1, -2),
                        qf[:, :, r0:r1] @ kl[:, :, :r1].transpose(-1, -2))
        s = s.masked_fill(torch.arange(r1, device=q.device)[None] > pos[:, None], float("-inf"))
        p = torch.softmax(s, -1)
        out[:, :, r0:r1] = (p * hi) @ vh[:, :, :r1] + (p * ~hi) @ vl[:, :, :r1]
    return out
