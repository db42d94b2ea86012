"""Launch the block-selection kernels (same result as ``select_blocks_reference``, exactly)."""

from __future__ import annotations

import torch
import triton

from thrift_vllm.kernels.select import _block_summary_kernel, _select_blocks_kernel
from thrift_vllm.selection import BlockGrid, budget_to_k, check_selection

# Elements of one [rows, BLOCK_D] register tile; the head-dim chunk is sized from it.
_TILE = 4096
# One program sorts a whole row of key blocks in registers. Rows up to 4096 blocks (256K tokens
# at block 64) are what was compiled and checked on the H200; longer rows are refused rather
# than risk a kernel that spills or does not compile.
MAX_KV_BLOCKS = 4096


def _check_inputs(q: torch.Tensor, k: torch.Tensor, block_size: int) -> None:
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 4 or not t.is_floating_point():
            raise ValueError(f"{name} must be a float tensor [B, H, S, D], got {tuple(t.shape)}")
    if q.device != k.device:
        raise ValueError(f"q and k are on different devices: {q.device} vs {k.device}")
    B, Hq, Sq, D = q.shape
    _, Hkv, Skv, _ = k.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads {Hq} must be a multiple of KV heads {Hkv}")
    if B == 0 or D == 0 or not 1 <= Sq <= Skv:
        raise ValueError(
            f"need B, D > 0 and 1 <= Sq <= Skv: q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def key_block_summaries(
    k: torch.Tensor, block_size: int, minmax: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """fp32 per-block ``(mean, min, max)`` of ``k [B, Hkv, Skv, D]``, each ``[B * Hkv, n, D]``.

    ``n = cdiv(Skv, block_size)``; the last block is reduced over its valid keys only. ``min`` and
    ``max`` are None unless ``minmax``. ``k`` is read through its strides (no copy). Stored
    block-index fastest (strides ``(D * n, 1, n)``): the selection kernel reads each channel of
    all key blocks as one contiguous run.
    """
    B, Hkv, Skv, D = k.shape
    n = triton.cdiv(Skv, block_size)
    mean = torch.empty(B * Hkv, D, n, dtype=torch.float32, device=k.device).transpose(1, 2)
    kmin = torch.empty_like(mean) if minmax else None  # empty_like keeps the strides
    kmax = torch.empty_like(mean) if minmax else None
    tok = triton.next_power_of_2(block_size)
    block_d = min(triton.next_power_of_2(D), max(8192 // tok, 1))  # a [tok, block_d] tile
    grid = (n, B * Hkv, triton.cdiv(D, block_d))
    _block_summary_kernel[grid](
        k,
        mean,
        kmin if minmax else mean,
        kmax if minmax else mean,
        Hkv,
        Skv,
        D,
        k.stride(0),
        k.stride(1),
        k.stride(2),
        k.stride(3),
        mean.stride(0),
        mean.stride(1),
        mean.stride(2),
        BLOCK_SIZE=block_size,
        TOK=tok,
        BLOCK_D=block_d,
        MINMAX=minmax,
    )
    return mean, kmin, kmax


def select_blocks_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    fp16_budget: float,
    selection: str,
    block_size: int,
    causal: bool,
    force_sink_recent: bool = False,
    summaries: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Triton :func:`thrift_vllm.select_blocks`: int32 ``[B, Hq, n_q_blocks, k]``.

    ``summaries``: ``(mean, min, max)`` from :func:`key_block_summaries` over the same keys
    (min/max may be None unless ``selection == "quest"``), e.g. kept from an earlier step in
    decode; without it they are computed here, which reads every key once.

    q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Skv, D]`` (fp16/bf16, any strides). Per (batch, query head,
    query block) the selected key-block indices in ascending order, -1 padded where a row has
    fewer candidates than ``k``; identical to ``select_blocks_reference`` (exact ties in the score
    go to the smaller block index). Two launches: key-block summaries (skipped for "local"), then
    one program per (query-block row, batch x selection head) that scores and takes the top k.
    """
    check_selection(selection)
    _check_inputs(q, k, block_size)
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    grid_ = BlockGrid(Sq, Skv, block_size, causal)
    kk = budget_to_k(fp16_budget, grid_)
    nq, nk = grid_.num_q_blocks, grid_.num_kv_blocks
    if nk > MAX_KV_BLOCKS:
        raise ValueError(f"{nk} key blocks (Skv={Skv}, block_size={block_size}) exceed the "
                         f"Triton selection's {MAX_KV_BLOCKS}; use a larger block_size")
    out = torch.empty(B, Hq, nq, kk, dtype=torch.int32, device=q.device)
    if kk == 0:
        return out

    group = Hq // Hkv
    # Decode selects once per KV head (score = max over the group, same row for every head).
    qg = group if grid_.is_decode else 1
    h_sel = Hq // qg
    if selection == "local":
        mean = kmin = kmax = out  # never read
    else:
        if summaries is None:
            summaries = key_block_summaries(k, block_size, minmax=selection == "quest")
        mean, kmin, kmax = summaries
        if selection == "quest" and (kmin is None or kmax is None):
            raise ValueError("selection='quest' needs min/max key summaries")
        if mean.shape != (B * Hkv, nk, D):
            raise ValueError(f"summaries have shape {tuple(mean.shape)}, expected "
                             f"{(B * Hkv, nk, D)}")
        if kmin is None:
            kmin = kmax = mean  # never read
    n_pow2 = max(triton.next_power_of_2(nk), 2)  # tl.sort needs at least two elements
    tok = triton.next_power_of_2(block_size)
    block_d = min(triton.next_power_of_2(D), max(_TILE // max(n_pow2, tok), 1))
    _select_blocks_kernel[(nq, B * h_sel)](
        q,
        mean,
        kmin,
        kmax,
        out,
        h_sel,
        Hkv,
        Sq,
        D,
        nk,
        grid_.q_offset,
        grid_.first_q_block,
        kk,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        q.stride(3),
        mean.stride(0),
        mean.stride(1),
        mean.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        SELECTION=selection,
        GROUP=group,
        QG=qg,
        BLOCK_SIZE=block_size,
        TOK=tok,
        N_POW2=n_pow2,
        BLOCK_D=block_d,
        ROW_CAUSAL=grid_.row_causal,
        FORCE_SINK_RECENT=bool(force_sink_recent),
        num_warps=8 if n_pow2 >= 1024 else 4,
    )
    return out
