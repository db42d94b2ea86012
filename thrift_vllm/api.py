"""Public operator API: ``attention``, ``select_blocks``. Validates, then dispatches to the Triton
ops (CUDA tensors, or any tensor with ``impl="triton"``) or the PyTorch reference (CPU)."""

from __future__ import annotations

import math
import numbers

import torch

from thrift_vllm.formats import check_format
from thrift_vllm.selection import check_selection, select_blocks_reference

METHODS = ("thrift", "fp4", "fp16")
BULK_MATHS = ("bf16", "fp8", "native")
IMPLS = ("auto", "triton", "torch")
HEAD_DIMS = (64, 128, 256)
BLOCK_SIZES = (32, 64, 128)


def _check_budget(fp16_budget: float) -> float:
    """``fp16_budget`` as a float in [0, 1]. Only real numbers are accepted (int, float, numpy
    scalars): bools, strings such as "0.5", None and tensors raise ValueError."""
    if isinstance(fp16_budget, bool) or not isinstance(fp16_budget, numbers.Real):
        raise ValueError(f"fp16_budget must be a number in [0, 1], got {fp16_budget!r}")
    f = float(fp16_budget)
    if math.isnan(f) or not 0.0 <= f <= 1.0:
        raise ValueError(f"fp16_budget must be in [0, 1], got {fp16_budget!r}")
    return f


def _check_qk(q: torch.Tensor, k: torch.Tensor, block_size: int) -> None:
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have rank 4 [B, H, S, D], got shape {tuple(t.shape)}")
        if t.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"{name} must be float16 or bfloat16, got {t.dtype}")
    if q.dtype != k.dtype:
        raise ValueError(f"q and k dtypes differ: {q.dtype} vs {k.dtype}")
    if q.device != k.device:
        raise ValueError(f"q and k are on different devices: {q.device} vs {k.device}")
    B, Hq, Sq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)}")
    Hkv, Skv = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads {Hq} must be a multiple of KV heads {Hkv}")
    if Sq == 0 or Skv == 0 or B == 0:
        raise ValueError(f"empty input: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if Sq > Skv:
        raise ValueError(f"Sq={Sq} must be <= Skv={Skv} (queries are the last Sq positions)")
    if D not in HEAD_DIMS:
        raise ValueError(f"head dim {D} is not supported; supported: {HEAD_DIMS}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size!r}")


def _use_triton(t: torch.Tensor, impl: str) -> bool:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl == "triton" or (impl == "auto" and t.is_cuda)


def select_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    fp16_budget: float = 0.05,
    selection: str = "block_mean",
    block_size: int = 64,
    causal: bool = True,
    force_sink_recent: bool = False,
    impl: str = "auto",
) -> torch.Tensor:
    """Pick the query-key blocks computed in FP16.

    q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Skv, D]`` (fp16/bf16). Returns int32
    ``[B, Hq, n_q_blocks, k]``: per (batch, query head, query block) the selected key-block
    indices in ascending order, -1 padded where a row has fewer candidates than ``k``. Blocks,
    candidates, the budget -> k rule and the scores are documented in ``thrift_vllm.selection``.
    """
    _check_qk(q, k, block_size)
    f = _check_budget(fp16_budget)
    check_selection(selection)
    if _use_triton(q, impl):
        from thrift_vllm.ops.select import select_blocks_triton

        return select_blocks_triton(q, k, fp16_budget=f, selection=selection,
                                    block_size=block_size, causal=causal,
                                    force_sink_recent=force_sink_recent)
    return select_blocks_reference(q, k, fp16_budget=f, selection=selection,
                                   block_size=block_size, causal=causal,
                                   force_sink_recent=force_sink_recent)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    fp16_budget: float = 0.05,
    selection: str = "block_mean",
    quant_format: str = "nvfp4",
    block_size: int = 64,
    method: str = "thrift",
    sm_scale: float | None = None,
    force_sink_recent: bool = False,
    bulk_math: str = "bf16",
    impl: str = "auto",
) -> torch.Tensor:
    """ThriftAttention: FP16 on the selected query-key blocks, FP4 on the rest, one softmax.

    q ``[B, Hq, Sq, D]``; k, v ``[B, Hkv, Skv, D]``; fp16 or bf16; returns ``[B, Hq, Sq, D]`` in
    q's dtype. ``Sq <= Skv``; the causal mask is bottom-right aligned (query i sees keys
    ``<= Skv - Sq + i``), so chunked prefill and decode (``Sq == 1``) are the same call.
    ``method``: "thrift", "fp4" (no FP16 blocks, = budget 0) or "fp16" (exact, = budget 1);
    ``fp16_budget`` must be a number in [0, 1] even when ``method`` overrides it.
    ``bulk_math`` (Triton path): "bf16" computes the FP4 blocks exactly (dequantised in
    registers), "fp8" on e4m3 tensor-core operands (Hopper's fast path, approximate: see the
    README), "native" through ``tl.dot_scaled`` (Blackwell block-scaled MMA). The numerics are
    defined in ``thrift_vllm.reference``; ``impl="torch"`` runs that reference.
    """
    _check_qk(q, k, block_size)
    if not isinstance(v, torch.Tensor) or v.shape != k.shape or v.dtype != k.dtype:
        raise ValueError(f"v must match k in shape and dtype, got "
                         f"{getattr(v, 'shape', None)} {getattr(v, 'dtype', None)}")
    if v.device != q.device:
        raise ValueError(f"v is on {v.device}, q on {q.device}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if bulk_math not in BULK_MATHS:
        raise ValueError(f"bulk_math must be one of {BULK_MATHS}, got {bulk_math!r}")
    check_format(quant_format)
    check_selection(selection)
    f = _check_budget(fp16_budget)  # validated even when ``method`` overrides it
    f = {"fp4": 0.0, "fp16": 1.0}.get(method, f)
    if sm_scale is not None and not (isinstance(sm_scale, (int, float)) and sm_scale > 0):
        raise ValueError(f"sm_scale must be a positive number, got {sm_scale!r}")
    if _use_triton(q, impl):
        from thrift_vllm.ops.attention import thrift_attention_triton

        return thrift_attention_triton(
            q, k, v, causal=causal, fp16_budget=f, selection=selection,
            quant_format=quant_format, block_size=block_size, sm_scale=sm_scale,
            force_sink_recent=force_sink_recent, bulk_math=bulk_math)
    if method == "fp16" or f == 1.0:
        return _exact_attention(q, k, v, causal, sm_scale)
    from thrift_vllm.reference import thrift_attention_reference

    sel = select_blocks_reference(q, k, fp16_budget=f, selection=selection,
                                  block_size=block_size, causal=causal,
                                  force_sink_recent=force_sink_recent)
    return thrift_attention_reference(q, k, v, sel, causal=causal, quant_format=quant_format,
                                      block_size=block_size, sm_scale=sm_scale)


def _exact_attention(q, k, v, causal: bool, sm_scale: float | None,
                     acc_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """SDPA in ``acc_dtype`` with the bottom-right causal mask (budget 1 on the PyTorch path),
    returned in ``q``'s dtype. float64 by default: SDPA's summation order depends on how many
    queries share the call, and fp32 sums rounded to fp16/bf16 differ in the last bit between
    a decode token and the same token inside a prefill chunk (vLLM's CPU path: preemption and
    chunking changed budget-1 log-probs by up to 0.05 nats); float64 sums round to the same
    16-bit value."""
    Sq, Skv = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    kf = k.to(acc_dtype).repeat_interleave(group, dim=1)
    vf = v.to(acc_dtype).repeat_interleave(group, dim=1)
    mask = None
    if causal:
        pos = torch.arange(Sq, device=q.device)[:, None] + (Skv - Sq)
        mask = torch.arange(Skv, device=q.device)[None, :] <= pos
    out = torch.nn.functional.scaled_dot_product_attention(q.to(acc_dtype), kf, vf,
                                                           attn_mask=mask, scale=sm_scale)
    return out.to(q.dtype)
