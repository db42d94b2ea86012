"""Prefill and decode kernels (TRITON_INTERPRET=1 on CPU) against the PyTorch reference.

Tolerances. bf16 and native FP4 math compute the reference's function exactly up to fp32
summation order, the bf16/fp16 rounding of the output and of P on the FP16 tiles (FlashAttention
casts P to the input dtype for the PV product), and the rare e2m1 tie that fp32 noise flips. The
output rounding alone is ~2**-9 relative for bf16 and ~2**-12 for fp16: we allow 1e-2 and 2e-3.
fp8 math is a different function (e4m3 operands, P in e4m3): it is held to its error against
exact attention, which must not exceed the FP4 reference's by more than 10 %.
"""

from __future__ import annotations

import pytest
import torch

from thrift_vllm.api import _exact_attention
from thrift_vllm.ops.attention import thrift_attention_triton
from thrift_vllm.reference import thrift_attention_reference
from thrift_vllm.selection import select_blocks_reference

TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _inputs(B, Hq, Hkv, Sq, Skv, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Skv, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Skv, D, generator=g).to(dtype)
    return q, k, v


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def _run(q, k, v, *, causal, f, fmt, math_mode, selection="block_mean"):
    sel = select_blocks_reference(q, k, fp16_budget=f, selection=selection, block_size=64,
                                  causal=causal)
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    thrift_attention_triton(q, k, v, causal=causal, fp16_budget=f, selection=selection,
                            quant_format=fmt, block_size=64, sm_scale=None, bulk_math=math_mode,
                            sel=sel, out=out)
    assert not torch.isnan(out).any(), "output elements left unwritten"
    ref = thrift_attention_reference(q, k, v, sel, causal=causal, quant_format=fmt)
    return out, ref


CASES = [
    # B, Hq, Hkv, Sq, Skv, D, dtype, causal, budget, fmt
    (1, 4, 1, 63, 63, 64, torch.float16, True, 0.3, "nvfp4"),
    (1, 4, 1, 65, 65, 128, torch.bfloat16, True, 0.3, "mxfp4"),
    (1, 8, 1, 200, 200, 64, torch.bfloat16, True, 0.05, "nvfp4"),
    (1, 2, 2, 77, 200, 128, torch.float16, True, 0.25, "nvfp4"),
    (2, 4, 1, 65, 130, 64, torch.float16, False, 0.25, "mxfp4"),
    (1, 2, 1, 200, 200, 64, torch.float16, True, 0.0, "nvfp4"),
    (1, 1, 1, 1000, 1000, 64, torch.bfloat16, True, 0.05, "nvfp4"),
]
DECODE = [
    (2, 8, 1, 1, 1, 64, torch.float16, True, 0.05, "nvfp4"),
    (1, 4, 1, 1, 63, 128, torch.bfloat16, True, 0.3, "nvfp4"),
    (1, 8, 2, 1, 200, 64, torch.float16, True, 0.1, "mxfp4"),
    (2, 8, 1, 1, 1000, 128, torch.bfloat16, True, 0.05, "nvfp4"),
    (1, 4, 4, 1, 65, 64, torch.float16, False, 0.0, "mxfp4"),
]


@pytest.mark.parametrize("math_mode", ["bf16", "native"])
@pytest.mark.parametrize("case", CASES + DECODE, ids=lambda c: f"{c[:8]}-{c[8]}-{c[9]}"
                         if isinstance(c, tuple) else str(c))
def test_kernel_matches_reference(case, math_mode):
    B, Hq, Hkv, Sq, Skv, D, dtype, causal, f, fmt = case
    if math_mode == "native" and (Skv > 300 or (D == 128 and Sq > 1)):
        pytest.skip("native path: covered on the smaller shapes (interpreter time)")
    q, k, v = _inputs(B, Hq, Hkv, Sq, Skv, D, dtype, seed=hash(case) % 1000)
    out, ref = _run(q, k, v, causal=causal, f=f, fmt=fmt, math_mode=math_mode)
    assert _rel(out, ref) < TOL[dtype], f"rel err {_rel(out, ref):.3e}"


@pytest.mark.parametrize("case", [CASES[1], CASES[3], DECODE[2]], ids=str)
def test_fp8_math_error_bounded(case):
    B, Hq, Hkv, Sq, Skv, D, dtype, causal, f, fmt = case
    q, k, v = _inputs(B, Hq, Hkv, Sq, Skv, D, dtype, seed=7)
    out, ref = _run(q, k, v, causal=causal, f=f, fmt=fmt, math_mode="fp8")
    exact = _exact_attention(q, k, v, causal, None)
    assert _rel(out, exact) <= 1.1 * _rel(ref, exact) + 1e-3


@pytest.mark.parametrize("Sq,Skv,dtype", [(1, 65, torch.float16), (65, 65, torch.bfloat16),
                                          (40, 200, torch.float16)])
def test_budget_one_is_exact_attention(Sq, Skv, dtype):
    q, k, v = _inputs(1, 4, 1, Sq, Skv, 64, dtype, seed=3)
    out, _ = _run(q, k, v, causal=True, f=1.0, fmt="nvfp4", math_mode="bf16")
    qf, kf, vf = q.double(), k.double().repeat_interleave(4, 1), v.double().repeat_interleave(4, 1)
    mask = torch.arange(Skv)[None, :] <= (torch.arange(Sq)[:, None] + Skv - Sq)
    exact = torch.nn.functional.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask)
    assert _rel(out, exact) < TOL[dtype]


def test_budget_zero_equals_method_fp4():
    q, k, v = _inputs(1, 4, 2, 70, 150, 64, torch.float16, seed=5)
    common = dict(causal=True, selection="block_mean", quant_format="nvfp4", block_size=64,
                  sm_scale=None)
    a = thrift_attention_triton(q, k, v, fp16_budget=0.0, **common)
    empty = select_blocks_reference(q, k, fp16_budget=0.0, selection="block_mean",
                                    block_size=64, causal=True)
    assert empty.shape == (1, 4, 2, 0)
    ref = thrift_attention_reference(q, k, v, empty, causal=True)
    assert _rel(a, ref) < TOL[torch.float16]


@pytest.mark.parametrize("Sq,Skv", [(70, 130), (1, 100)])
def test_head_dim_256(Sq, Skv):
    """D = 256 (accepted by the API) through the prefill and decode kernels."""
    q, k, v = _inputs(1, 2, 1, Sq, Skv, 256, torch.bfloat16, seed=13)
    out, ref = _run(q, k, v, causal=True, f=0.3, fmt="nvfp4", math_mode="bf16")
    assert _rel(out, ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("block_size,math_mode,fmt", [(32, "bf16", "mxfp4"), (128, "bf16", "nvfp4"),
                                                      (128, "native", "nvfp4"),
                                                      (32, "fp8", "nvfp4")])
@pytest.mark.parametrize("Sq", [1, 90])
def test_block_sizes(block_size, math_mode, fmt, Sq):
    """Block (selection unit = tile) 32 and 128; 128 is what sm_100's native MMA needs."""
    q, k, v = _inputs(1, 4, 2, Sq, 300, 64, torch.float16, seed=17)
    sel = select_blocks_reference(q, k, fp16_budget=0.2, selection="quest", block_size=block_size,
                                  causal=True)
    out = torch.full_like(q, float("nan"))
    thrift_attention_triton(q, k, v, causal=True, fp16_budget=0.2, selection="quest",
                            quant_format=fmt, block_size=block_size, sm_scale=None,
                            bulk_math=math_mode, sel=sel, out=out)
    ref = thrift_attention_reference(q, k, v, sel, causal=True, quant_format=fmt,
                                     block_size=block_size)
    if math_mode == "fp8":
        exact = _exact_attention(q, k, v, True, None)
        assert _rel(out, exact) <= 1.1 * _rel(ref, exact) + 1e-3
    else:
        assert _rel(out, ref) < TOL[torch.float16]
