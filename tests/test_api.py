"""Public API validation (``thrift_vllm.attention`` / ``thrift_vllm.select_blocks``): every bad
input raises ValueError naming the offending value, and the method shortcuts equal the budgets
they stand for."""

from __future__ import annotations

import re

import pytest
import torch

import thrift_vllm


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: intra-op threads only add synchronisation on a busy machine. Restored."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def qkv(Hq=8, Hkv=2, Sq=65, Skv=200, D=64, dtype=torch.float16, B=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, Skv, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, Skv, D, generator=gen).to(dtype)
    return q, k, v


def raises_naming(fn, *needles):
    """Call ``fn``; it must raise ValueError whose message contains every needle verbatim."""
    with pytest.raises(ValueError) as info:
        fn()
    msg = str(info.value)
    for n in needles:
        assert str(n) in msg, f"{n!r} not in {msg!r}"


def both(q, k, v, **kw):
    """Calls of both entry points (torch path) with the same q, k (and v) and options."""
    att_kw = {"impl": "torch", **kw}
    sel_kw = {x: y for x, y in att_kw.items() if x in ("impl", "fp16_budget", "selection",
                                                        "block_size", "causal")}
    return [
        lambda: thrift_vllm.attention(q, k, v, **att_kw),
        lambda: thrift_vllm.select_blocks(q, k, **sel_kw),
    ]


# ----------------------------------------------------------------------------------------------
# Shapes and dtypes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["q", "k"])
@pytest.mark.parametrize("shape", [(8, 65, 64), (1, 1, 8, 65, 64), (64,)])
def test_wrong_rank(which, shape):
    q, k, v = qkv()
    bad = torch.randn(shape).half()
    if which == "q":
        q = bad
    else:
        k = v = bad
    for fn in both(q, k, v):
        raises_naming(fn, which, str(tuple(shape)))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.int64, torch.uint8])
@pytest.mark.parametrize("which", ["q", "k"])
def test_int_dtypes(dtype, which):
    q, k, v = qkv()
    if which == "q":
        q = q.to(dtype)
    else:
        k, v = k.to(dtype), v.to(dtype)
    for fn in both(q, k, v):
        raises_naming(fn, which, str(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fp32_input(dtype):
    q, k, v = qkv(dtype=dtype)
    for fn in both(q, k, v):
        raises_naming(fn, str(dtype))


def test_mismatched_dtypes():
    q, k, v = qkv()
    kb, vb = k.bfloat16(), v.bfloat16()
    for fn in both(q, kb, vb):
        raises_naming(fn, "torch.float16", "torch.bfloat16")
    # v's dtype alone differs from k's
    raises_naming(lambda: thrift_vllm.attention(q, k, vb, impl="torch"), "torch.bfloat16")


@pytest.mark.parametrize(("Hq", "Hkv"), [(6, 4), (4, 8), (3, 2)])
def test_heads_not_multiple(Hq, Hkv):
    q, k, v = qkv(Hq=Hq, Hkv=Hkv)
    for fn in both(q, k, v):
        raises_naming(fn, str(Hq), str(Hkv))


@pytest.mark.parametrize(("Sq", "Skv"), [(66, 65), (2, 1), (201, 200)])
def test_sq_greater_than_skv(Sq, Skv):
    q, k, v = qkv(Sq=Sq, Skv=Skv)
    for fn in both(q, k, v):
        raises_naming(fn, f"Sq={Sq}", f"Skv={Skv}")


@pytest.mark.parametrize("D", [96, 32, 80, 512])
def test_unsupported_head_dim(D):
    q, k, v = qkv(D=D)
    for fn in both(q, k, v):
        raises_naming(fn, str(D))


def test_head_dim_mismatch_and_batch_mismatch():
    q, _, _ = qkv(D=64)
    _, k, v = qkv(D=128)
    for fn in both(q, k, v):
        raises_naming(fn, str(tuple(k.shape)), str(tuple(q.shape)))
    _, k2, v2 = qkv(B=2)
    for fn in both(q, k2, v2):
        raises_naming(fn, str(tuple(k2.shape)))


@pytest.mark.parametrize("vshape", [(1, 2, 199, 64), (1, 1, 200, 64), (1, 2, 200, 128)])
def test_v_shape_mismatch(vshape):
    q, k, _ = qkv()
    v = torch.randn(vshape).half()
    raises_naming(lambda: thrift_vllm.attention(q, k, v, impl="torch"),
                  str(tuple(vshape)).strip("()"))


def test_v_not_a_tensor():
    q, k, _ = qkv()
    raises_naming(lambda: thrift_vllm.attention(q, k, [1.0], impl="torch"), "v")


# ----------------------------------------------------------------------------------------------
# Scalar options
# ----------------------------------------------------------------------------------------------


BAD_BUDGETS = [-0.1, 1.5, 7, -1, float("nan"), "abc", "0.5", "1", float("inf"), None, True,
               False, torch.tensor(0.5), [0.5]]


@pytest.mark.parametrize("budget", BAD_BUDGETS, ids=repr)
def test_bad_budget(budget):
    q, k, v = qkv()
    for fn in both(q, k, v, fp16_budget=budget):
        raises_naming(fn, repr(budget))


@pytest.mark.parametrize("method", ["fp4", "fp16", "thrift"])
@pytest.mark.parametrize("budget", BAD_BUDGETS, ids=repr)
def test_bad_budget_rejected_whatever_the_method(method, budget):
    """``method`` overrides the budget, but the budget is validated first: ``method="fp4",
    fp16_budget=7`` is a mistake, not a request for FP4."""
    q, k, v = qkv(Sq=1, Skv=64)
    raises_naming(lambda: thrift_vllm.attention(q, k, v, method=method, fp16_budget=budget,
                                                impl="torch"), repr(budget))


def test_numeric_budget_types_accepted():
    """Real numbers of any kind (int, float, numpy scalars) are budgets; 1 and 0 are ints."""
    np = pytest.importorskip("numpy")
    q, k, v = qkv(Sq=1, Skv=200)
    ref = thrift_vllm.select_blocks(q, k, fp16_budget=0.5, impl="torch")
    for b in (np.float32(0.5), np.float64(0.5)):
        assert torch.equal(thrift_vllm.select_blocks(q, k, fp16_budget=b, impl="torch"), ref)
    for b in (0, 1, np.int64(1)):
        thrift_vllm.attention(q, k, v, fp16_budget=b, impl="torch")
        thrift_vllm.attention(q, k, v, fp16_budget=b, method="fp4", impl="torch")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("method", "fp8"),
        ("method", "FP16"),
        ("selection", "random"),
        ("quant_format", "nvfp8"),
        ("quant_format", "MXFP4"),
        ("bulk_math", "fp16"),
        ("impl", "cuda"),
        ("impl", "numpy"),
    ],
)
def test_unknown_option(name, value):
    q, k, v = qkv()
    raises_naming(lambda: thrift_vllm.attention(q, k, v, **{"impl": "torch", name: value}),
                  repr(value))
    if name in ("selection", "impl"):
        raises_naming(lambda: thrift_vllm.select_blocks(q, k, **{"impl": "torch", name: value}),
                      repr(value))


@pytest.mark.parametrize("bs", [48, 16, 256, 0])
def test_bad_block_size(bs):
    q, k, v = qkv()
    for fn in both(q, k, v, block_size=bs):
        raises_naming(fn, f"got {bs}")


@pytest.mark.parametrize("sm_scale", [0.0, -1.0, float("nan"), "0.1"])
def test_bad_sm_scale(sm_scale):
    q, k, v = qkv()
    raises_naming(lambda: thrift_vllm.attention(q, k, v, sm_scale=sm_scale, impl="torch"),
                  repr(sm_scale))


def test_messages_are_value_errors_not_others():
    """A few odd inputs must still be ValueError (not TypeError / IndexError)."""
    q, k, v = qkv()
    with pytest.raises(ValueError, match=re.escape("'abc'")):
        thrift_vllm.attention(q, k, v, fp16_budget="abc", impl="torch")
    raises_naming(lambda: thrift_vllm.attention("q", k, v, impl="torch"), "str")
    raises_naming(lambda: thrift_vllm.select_blocks(q, None, impl="torch"), "NoneType")


# ----------------------------------------------------------------------------------------------
# Method shortcuts and valid extremes on the torch path
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(8, 2, 65, 200, 64), (4, 1, 1, 63, 128), (8, 1, 63, 63, 64)])
def test_method_shortcuts(dtype, causal, shape):
    Hq, Hkv, Sq, Skv, D = shape
    q, k, v = qkv(Hq, Hkv, Sq, Skv, D, dtype=dtype, seed=Sq + D)
    kw = {"causal": causal, "impl": "torch", "block_size": 32}
    fp16 = thrift_vllm.attention(q, k, v, method="fp16", **kw)
    assert torch.equal(fp16, thrift_vllm.attention(q, k, v, fp16_budget=1.0, **kw))
    assert torch.equal(fp16, thrift_vllm.attention(q, k, v, fp16_budget=1, **kw))
    for fmt in ("nvfp4", "mxfp4"):
        fp4 = thrift_vllm.attention(q, k, v, method="fp4", quant_format=fmt, **kw)
        assert torch.equal(fp4, thrift_vllm.attention(q, k, v, fp16_budget=0.0, quant_format=fmt,
                                                      **kw))
        assert torch.equal(fp4, thrift_vllm.attention(q, k, v, fp16_budget=0, quant_format=fmt,
                                                      **kw))
        assert fp4.dtype == dtype and fp4.shape == q.shape
        assert not torch.equal(fp4, fp16)  # the two shortcuts do differ


def test_valid_extremes_accepted():
    """Boundary values that are valid must not raise."""
    for D in (64, 128, 256):
        for bs in (32, 64, 128):
            q, k, v = qkv(Hq=2, Hkv=1, Sq=1, Skv=1, D=D)
            out = thrift_vllm.attention(q, k, v, block_size=bs, fp16_budget=0.0, impl="torch")
            assert out.shape == q.shape
    q, k, v = qkv(Hq=8, Hkv=8, Sq=65, Skv=65)
    thrift_vllm.attention(q, k, v, fp16_budget=1.0, impl="torch")
    sel = thrift_vllm.select_blocks(q, k, fp16_budget=0.5, impl="torch")
    assert sel.dtype == torch.int32
