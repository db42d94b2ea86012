"""Reference attention numerics (``thrift_vllm.reference`` and ``attention(impl="torch")``).

Compared against
* float64 ``scaled_dot_product_attention`` with an explicit bottom-right causal mask (exact path);
* a slow float64 implementation of the documented FP4 semantics written below, one query row and
  one key tile at a time, with its own table-based P quantiser (the FP4 q / k / v operands come
  from ``thrift_vllm.formats``, which ``test_formats.py`` checks bit-exactly).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F  # noqa: N812

import thrift_vllm
from thrift_vllm.formats import fake_quantize
from thrift_vllm.reference import thrift_attention_reference
from thrift_vllm.selection import BlockGrid, select_blocks_reference

GROUP = {"nvfp4": 16, "mxfp4": 32}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The float64 references here are loops of tiny tensor ops; intra-op threads only add
    synchronisation (10x slower on a busy 2-core machine). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Half an ulp of the output dtype, relative: the library computes in fp32 and rounds once to the
# output dtype (bf16 keeps 8 significant bits, fp16 11), so |out - exact| <= 2**-8 |exact| (bf16)
# or 2**-11 |exact| (fp16), plus fp32 noise (ATOL_FP32 * max|v|: fp32 has 24 bits, and softmax
# over <= 1000 keys loses at most a few more).
HALF_ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
ATOL_FP32 = 2e-5


# ----------------------------------------------------------------------------------------------
# Independent float64 machinery
# ----------------------------------------------------------------------------------------------

E2M1_POS = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
E2M1_THRESH = (E2M1_POS[1:] + E2M1_POS[:-1]) / 2


def _e4m3_positive_values() -> torch.Tensor:
    """All finite non-negative e4m3fn values (bytes 0..126) from the bit fields."""
    vals = []
    for b in range(127):
        e, m = (b >> 3) & 15, b & 7
        vals.append(m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return torch.tensor(vals, dtype=torch.float64)


E4M3_POS = _e4m3_positive_values()
E4M3_MID = (E4M3_POS[1:] + E4M3_POS[:-1]) / 2


def nearest_even(a: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest table entry (ties to the even index = even code / mantissa)."""
    dist = (a[..., None] - table).abs()
    is_best = dist == dist.min(-1, keepdim=True).values
    idx = torch.arange(table.numel())
    key = torch.where(is_best, idx + 1000 * (idx % 2), torch.full_like(idx, 10**9))
    return key.argmin(-1)


def near(x: torch.Tensor, points: torch.Tensor, rel: float) -> torch.Tensor:
    """Whether each x is within ``rel`` (relative) of one of ``points`` (rounding could flip)."""
    return ((x[..., None] - points).abs() <= rel * points.abs().clamp(min=1e-30)).any(-1)


# fp32 vs float64 scores differ by ~1e-6 relative in p = exp(s - mt); decisions closer than this
# to a rounding boundary may legitimately go either way (the reference's docstring says so).
AMBIGUOUS_REL = 3e-5


def quantize_p_64(p: torch.Tensor, fmt: str):
    """Documented P quantisation of tiles (float64 ``p [..., block]``, each tile's max is 1), per
    group of keys: NVFP4 step = e4m3(448 * amax) / 2688, MXFP4 step = the smallest power of two
    >= amax / 6. Returns (dequantised p, the alternative dequantised p for elements whose e2m1
    rounding is within noise of a threshold (else equal), per-tile flag: a group scale is within
    noise of a rounding boundary)."""
    g = GROUP[fmt]
    pg = p.view(*p.shape[:-1], p.shape[-1] // g, g)
    amax = pg.amax(-1, keepdim=True)
    if fmt == "nvfp4":
        y = (448.0 * amax).clamp(max=448.0)
        step = E4M3_POS[nearest_even(y, E4M3_POS)] / 2688.0
        scale_amb = near(y, E4M3_MID, AMBIGUOUS_REL)
    else:
        m, e = torch.frexp(amax / 6.0)  # amax / 6 = m * 2**e exactly, m in [0.5, 1)
        step = torch.where(m == 0.5, torch.exp2(e - 1.0), torch.exp2(e.double()))
        step = torch.where(amax > 0, step, 0.0)
        scale_amb = ((m - 0.5).abs() < AMBIGUOUS_REL) | ((1.0 - m).abs() < AMBIGUOUS_REL)
        scale_amb &= amax > 0
    safe = torch.where(step > 0, step, 1.0)
    y = torch.where(step > 0, pg / safe, 0.0)
    code = nearest_even(y.clamp(max=7.0), E2M1_POS)  # above 6 saturates to 6
    deq = E2M1_POS[code] * step
    # Rounding the other way at an ambiguous element: the neighbour across the nearest threshold.
    ti = (y[..., None] - E2M1_THRESH).abs().argmin(-1)
    amb = near(y, E2M1_THRESH, AMBIGUOUS_REL) & (step > 0)
    other = torch.where(code > ti, ti, ti + 1)
    alt = torch.where(amb, E2M1_POS[other] * step, deq)
    return deq.flatten(-2), alt.flatten(-2), scale_amb.squeeze(-1).any(-1)


def slow_thrift_reference(q, k, v, sel, *, causal, fmt, bs, sm_scale=None):
    """Documented ThriftAttention numerics in float64, one (batch, head, query) row at a time
    (the tiles of a row side by side). Returns (out, tol_extra, ambiguous_rows): tol_extra
    [B, Hq, Sq, D] bounds the output change that flipping every ambiguous e2m1 rounding could
    cause; rows with an ambiguous *group scale* are flagged instead."""
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    group = Hq // Hkv
    scale = sm_scale if sm_scale is not None else D**-0.5
    q64, k64, v64 = q.double(), k.double(), v.double()
    q4 = fake_quantize(q, fmt, -1).double()
    k4 = fake_quantize(k, fmt, -1).double()
    v4 = fake_quantize(v, fmt, -2).double()  # along tokens, groups aligned to token 0
    first_q_block = (Skv - Sq) // bs
    out = torch.zeros(B, Hq, Sq, D, dtype=torch.float64)
    tol = torch.zeros(B, Hq, Sq, D, dtype=torch.float64)
    ambiguous = torch.zeros(B, Hq, Sq, dtype=torch.bool)
    for b in range(B):
        for h in range(Hq):
            hk = h // group
            for i in range(Sq):
                t = Skv - Sq + i  # absolute position of the query
                n_vis = t + 1 if causal else Skv  # keys 0 .. n_vis - 1 are visible
                nt = -(-n_vis // bs)  # tiles holding visible keys
                is16 = torch.zeros(nt, dtype=torch.bool)
                for j in sel[b, h, t // bs - first_q_block].tolist():
                    if 0 <= j < nt:
                        is16[j] = True
                pad = (0, nt * bs - n_vis)
                s16 = F.pad(scale * (k64[b, hk, :n_vis] @ q64[b, h, i]), pad, value=-math.inf)
                s4 = F.pad(scale * (k4[b, hk, :n_vis] @ q4[b, h, i]), pad, value=-math.inf)
                s16, s4 = s16.view(nt, bs), s4.view(nt, bs)
                mt4 = s4.amax(-1)
                m_row = torch.where(is16, s16.amax(-1), mt4).max()
                pq, alt, scale_amb = quantize_p_64(torch.exp(s4 - mt4[:, None]), fmt)
                c = torch.exp(mt4 - m_row)[:, None]
                w = torch.where(is16[:, None], torch.exp(s16 - m_row), pq * c).flatten()[:n_vis]
                dw = torch.where(is16[:, None], 0.0, (alt - pq) * c).flatten()[:n_vis].abs()
                is16_key = is16.repeat_interleave(bs)[:n_vis, None]
                vals = torch.where(is16_key, v64[b, hk, :n_vis], v4[b, hk, :n_vis])
                den = w.sum()
                o = (w @ vals) / den
                out[b, h, i] = o
                ambiguous[b, h, i] = (scale_amb & ~is16).any()
                # Flipping weight j by dw_j moves the output by dw_j (v_j - o) / (den + dw_j).
                tol[b, h, i] = (dw / (den - dw)) @ (vals - o).abs()
    return out, tol, ambiguous


def sdpa64(q, k, v, causal, sm_scale=None):
    """float64 SDPA with an explicit bottom-right causal mask (query i sees keys <= Skv-Sq+i)."""
    Sq, Skv = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    kf = k.double().repeat_interleave(group, 1)
    vf = v.double().repeat_interleave(group, 1)
    mask = None
    if causal:
        mask = torch.arange(Skv)[None, :] <= torch.arange(Sq)[:, None] + (Skv - Sq)
    return F.scaled_dot_product_attention(q.double(), kf, vf, attn_mask=mask, scale=sm_scale)


def rel_l2(a, b) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def make_qkv(B, Hq, Hkv, Sq, Skv, D, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, Skv, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, Skv, D, generator=gen).to(dtype)
    return q, k, v


def assert_close_rounded(out, ref, dtype, extra=None, v=None):
    """|out - ref| <= half-ulp(dtype) * |ref| + fp32 noise (+ a per-element extra allowance)."""
    vmax = v.double().abs().max().item() if v is not None else 1.0
    bound = HALF_ULP[dtype] * ref.abs() + ATOL_FP32 * vmax
    if extra is not None:
        bound = bound + extra * (1 + HALF_ULP[dtype])
    err = (out.double() - ref).abs()
    worst = (err - bound).max()
    assert worst <= 0, f"max excess {worst.item():.3g}, max err {err.max().item():.3g}"


SHAPES = [
    # (Hq, Hkv, Sq, Skv, D)
    (4, 1, 1, 1, 64),
    (4, 1, 1, 200, 128),  # decode
    (8, 1, 40, 63, 64),
    (4, 1, 65, 65, 128),
    (8, 2, 17, 65, 64),
    (4, 1, 120, 200, 64),
    (8, 1, 200, 200, 128),
]


# ----------------------------------------------------------------------------------------------
# Exact path (method "fp16" / budget 1)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_exact_path_vs_float64_sdpa(shape, dtype, causal):
    Hq, Hkv, Sq, Skv, D = shape
    q, k, v = make_qkv(2, Hq, Hkv, Sq, Skv, D, dtype, seed=Sq + Skv + D)
    ref = sdpa64(q, k, v, causal)
    for kw in ({"method": "fp16"}, {"fp16_budget": 1.0}, {"fp16_budget": 1.0, "method": "thrift"}):
        out = thrift_vllm.attention(q, k, v, causal=causal, block_size=32, impl="torch", **kw)
        assert out.dtype == dtype and out.shape == q.shape
        assert_close_rounded(out, ref, dtype, v=v)
    # The reference's own FP16-tile path with every candidate selected computes the same thing.
    sel = select_blocks_reference(q, k, fp16_budget=1.0, selection="block_mean", block_size=32,
                                  causal=causal)
    out = thrift_attention_reference(q, k, v, sel, causal=causal, block_size=32)
    assert_close_rounded(out, ref, dtype, v=v)


def test_exact_path_sm_scale():
    q, k, v = make_qkv(1, 8, 2, 65, 200, 64, torch.bfloat16, seed=9)
    ref = sdpa64(q, k, v, True, sm_scale=0.3)
    out = thrift_vllm.attention(q, k, v, method="fp16", sm_scale=0.3, impl="torch")
    assert_close_rounded(out, ref, torch.bfloat16, v=v)
    sel = select_blocks_reference(q, k, fp16_budget=1.0, selection="local", block_size=64,
                                  causal=True)
    out = thrift_attention_reference(q, k, v, sel, causal=True, sm_scale=0.3)
    assert_close_rounded(out, ref, torch.bfloat16, v=v)


# ----------------------------------------------------------------------------------------------
# FP4 path
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("causal", [True, False])
def test_budget_zero_is_fp4(fmt, causal):
    q, k, v = make_qkv(1, 8, 2, 65, 200, 64, torch.float16, seed=1)
    a = thrift_vllm.attention(q, k, v, fp16_budget=0.0, quant_format=fmt, causal=causal,
                              impl="torch")
    b = thrift_vllm.attention(q, k, v, method="fp4", quant_format=fmt, causal=causal,
                              impl="torch")
    c = thrift_vllm.attention(q, k, v, method="fp4", fp16_budget=0.7, quant_format=fmt,
                              causal=causal, impl="torch")
    empty = torch.empty(1, 8, BlockGrid(65, 200, 64, causal).num_q_blocks, 0, dtype=torch.int32)
    d = thrift_attention_reference(q, k, v, empty, causal=causal, quant_format=fmt)
    assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)
    # And FP4 is not the exact result (the comparison above is not vacuous).
    assert not torch.allclose(a.double(), sdpa64(q, k, v, causal), atol=1e-3)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp4_error_bounded(fmt, dtype):
    """On randn inputs FP4 attention is ~17 % (nvfp4) / ~22 % (mxfp4) off in relative L2 (measured
    at these shapes); 0.35 leaves margin while still catching a broken scale or mask (a wrong
    mask or unscaled P gives O(1) errors). Also above 5 %: FP4 must not silently be FP16."""
    q, k, v = make_qkv(1, 8, 2, 200, 200, 128, dtype, seed=3)
    for causal in (True, False):
        out = thrift_vllm.attention(q, k, v, method="fp4", quant_format=fmt, causal=causal,
                                    impl="torch")
        err = rel_l2(out, sdpa64(q, k, v, causal))
        assert 0.05 < err < 0.35, err


def needle_inputs(seed, S=256, D=128, dtype=torch.bfloat16):
    """A few keys aligned with a direction every query shares (planted high scores) and carrying
    larger values: the attention output is dominated by those needles."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(D, generator=gen)
    u = u / u.norm()
    q = torch.randn(1, 8, S, D, generator=gen) + 3 * u
    k = torch.randn(1, 2, S, D, generator=gen)
    v = torch.randn(1, 2, S, D, generator=gen)
    idx = torch.randperm(S, generator=gen)[:6]
    k[:, :, idx] += 6 * u
    v[:, :, idx] *= 4
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("selection", ["block_mean", "quest"])
def test_thrift_beats_fp4_on_needles(fmt, selection):
    """Measured over 6 seeds at S = 256 and 512: thrift at 25 % has 0.47-0.73x the FP4 error;
    require < 0.85x."""
    for seed in (0, 1):
        q, k, v = needle_inputs(seed)
        ref = sdpa64(q, k, v, True)
        e4 = rel_l2(thrift_vllm.attention(q, k, v, method="fp4", quant_format=fmt,
                                          impl="torch"), ref)
        et = rel_l2(thrift_vllm.attention(q, k, v, fp16_budget=0.25, selection=selection,
                                          quant_format=fmt, impl="torch"), ref)
        assert et < 0.85 * e4, (seed, et, e4)


# Shapes for the slow reference: (Hq, Hkv, Sq, Skv, D, block_size)
SLOW_SHAPES = [
    (4, 1, 1, 1, 64, 32),
    (8, 1, 1, 200, 128, 64),  # decode, GQA 8:1
    (4, 1, 63, 63, 64, 32),
    (8, 2, 40, 65, 128, 32),  # GQA 4:1, chunk starting mid-block
    (4, 1, 65, 65, 64, 64),
    (8, 1, 120, 200, 64, 32),
    (4, 1, 200, 200, 128, 64),
]


@pytest.mark.parametrize("shape", SLOW_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("causal", [True, False])
def test_reference_vs_slow_float64(shape, fmt, causal):
    Hq, Hkv, Sq, Skv, D, bs = shape
    seed = Sq * 7 + Skv + D + bs + len(fmt) + causal
    dtype = torch.bfloat16 if seed % 2 else torch.float16
    q, k, v = make_qkv(1, Hq, Hkv, Sq, Skv, D, dtype, seed)
    force = bool(seed % 3)
    sel = select_blocks_reference(q, k, fp16_budget=0.3, selection="block_mean", block_size=bs,
                                  causal=causal, force_sink_recent=force)
    # A mix of FP16 and FP4 tiles whenever some row has more than one candidate tile.
    first, step, rows = BlockGrid(Sq, Skv, bs, causal).candidate_counts()
    n_cand = Hq * sum(first + step * r for r in range(rows))
    assert 0 < int((sel >= 0).sum()) and (int((sel >= 0).sum()) < n_cand or n_cand == Hq * rows)
    out = thrift_attention_reference(q, k, v, sel, causal=causal, quant_format=fmt,
                                     block_size=bs, chunk_rows=37)
    assert out.dtype == dtype and out.shape == q.shape
    ref, extra, amb = slow_thrift_reference(q, k, v, sel, causal=causal, fmt=fmt, bs=bs)
    assert amb.float().mean() < 0.02  # flagged rows must stay rare
    keep = ~amb
    assert_close_rounded(out[keep], ref[keep], dtype, extra=extra[keep], v=v)
    # The public API on the same selection rule gives the same result.
    api = thrift_vllm.attention(q, k, v, causal=causal, fp16_budget=0.3, quant_format=fmt,
                                block_size=bs, force_sink_recent=force, impl="torch")
    assert torch.equal(api, thrift_attention_reference(q, k, v, sel, causal=causal,
                                                       quant_format=fmt, block_size=bs))


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_reference_vs_slow_float64_pure_fp4_and_sm_scale(fmt):
    q, k, v = make_qkv(2, 4, 1, 65, 200, 64, torch.bfloat16, seed=21)
    grid = BlockGrid(65, 200, 32, True)
    empty = torch.empty(2, 4, grid.num_q_blocks, 0, dtype=torch.int32)
    out = thrift_attention_reference(q, k, v, empty, causal=True, quant_format=fmt,
                                     block_size=32, sm_scale=0.2)
    ref, extra, amb = slow_thrift_reference(q, k, v, empty, causal=True, fmt=fmt, bs=32,
                                            sm_scale=0.2)
    assert amb.float().mean() < 0.02
    assert_close_rounded(out[~amb], ref[~amb], torch.bfloat16, extra=extra[~amb], v=v)


def test_slow_reference_is_sensitive():
    """Guard for the comparison itself: the slow reference with the wrong P rule (no P
    quantisation) differs from the library by far more than the tolerance."""
    q, k, v = make_qkv(1, 4, 1, 65, 65, 64, torch.float16, seed=5)
    empty = torch.empty(1, 4, 2, 0, dtype=torch.int32)
    out = thrift_attention_reference(q, k, v, empty, causal=True, block_size=64)
    ref, extra, _ = slow_thrift_reference(q, k, v, empty, causal=True, fmt="nvfp4", bs=64)
    # Unquantised P with FP4 q/k/v:
    g = 4
    s = (fake_quantize(q, "nvfp4", -1).double()
         @ fake_quantize(k, "nvfp4", -1).double().repeat_interleave(g, 1).transpose(-1, -2))
    s = s * 64**-0.5
    mask = torch.arange(65)[None, :] <= torch.arange(65)[:, None]
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
    no_pq = p @ fake_quantize(v, "nvfp4", -2).double().repeat_interleave(g, 1)
    rows = extra.amax(-1) == 0  # rows without ambiguous roundings: tolerance is the base one
    bound = HALF_ULP[torch.float16] * ref.abs() + ATOL_FP32 * v.double().abs().max()
    assert (out.double() - ref)[rows].abs().max() <= bound[rows].max()
    assert (out.double() - no_pq)[rows].abs().max() > 20 * bound[rows].max()


# ----------------------------------------------------------------------------------------------
# Causality: keys above the diagonal carry no weight
# ----------------------------------------------------------------------------------------------


def _poison(x, start, value):
    y = x.clone()
    y[:, :, start:] = value
    return y


METHOD_KW = [
    {"method": "fp16"},
    {"method": "fp4"},
    {"method": "fp4", "quant_format": "mxfp4"},
    {"fp16_budget": 0.3, "selection": "local"},
    {"fp16_budget": 0.3, "selection": "block_mean", "force_sink_recent": True},
]


@pytest.mark.parametrize("kw", METHOD_KW, ids=lambda kw: "-".join(map(str, kw.values())))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_future_keys_and_values_block_aligned(kw, dtype):
    """Poisoning every key and value from a block boundary on (huge finite values) leaves the
    queries before the boundary bit-identical: no weight, no selection or scale influence."""
    q, k, v = make_qkv(1, 8, 2, 200, 200, 64, dtype, seed=11)
    for cut in (64, 128):
        base = thrift_vllm.attention(q, k, v, block_size=32, impl="torch", **kw)
        pk = _poison(k, cut, 3e4)
        pv = _poison(v, cut, -3e4)
        out = thrift_vllm.attention(q, pk, pv, block_size=32, impl="torch", **kw)
        assert torch.equal(out[:, :, :cut], base[:, :, :cut])
        assert not torch.equal(out[:, :, cut:], base[:, :, cut:])  # the poison is visible later


@pytest.mark.parametrize("kw", METHOD_KW, ids=lambda kw: "-".join(map(str, kw.values())))
@pytest.mark.parametrize("Sq", [200, 120])
def test_future_keys_carry_no_weight(kw, Sq):
    """Keys past each query's diagonal (any position, not block aligned) have no influence: their
    weight is 0, FP4 k is per token, "local" selection ignores key values, and with
    force_sink_recent the diagonal block is taken whatever its score."""
    q, k, v = make_qkv(1, 8, 1, Sq, 200, 128, torch.bfloat16, seed=12)
    base = thrift_vllm.attention(q, k, v, block_size=64, impl="torch", **kw)
    for cut in (81, 150, 199):
        i_last = cut - 1 - (200 - Sq)  # last query row whose keys are all before ``cut``
        if i_last < 0:
            continue
        out = thrift_vllm.attention(q, _poison(k, cut, 3e4), v, block_size=64, impl="torch",
                                    **kw)
        assert torch.equal(out[:, :, : i_last + 1], base[:, :, : i_last + 1])


# The diagonal tile is FP16 for these (selection "local" and force_sink_recent always take it
# when the budget is positive; budget 1 takes every block).
FP16_DIAGONAL_KW = [
    {"method": "fp16"},
    {"fp16_budget": 1.0},
    {"fp16_budget": 0.3, "selection": "local"},
    {"fp16_budget": 0.01, "selection": "block_mean", "force_sink_recent": True},
    {"fp16_budget": 0.3, "selection": "block_mean", "force_sink_recent": True},
    {"fp16_budget": 0.6, "selection": "quest", "force_sink_recent": True},
]
# The diagonal tile is (or may be) FP4.
FP4_DIAGONAL_KW = [
    {"method": "fp4"},
    {"method": "fp4", "quant_format": "mxfp4"},
    {"fp16_budget": 0.3, "selection": "block_mean"},
    {"fp16_budget": 0.3, "selection": "block_mean", "quant_format": "mxfp4"},
]


def _kw_id(kw):
    return "-".join(map(str, kw.values()))


@pytest.mark.parametrize("kw", METHOD_KW + FP16_DIAGONAL_KW[3:], ids=_kw_id)
@pytest.mark.parametrize("Sq", [200, 120])
def test_future_keys_do_not_change_past_outputs(kw, Sq):
    """(a) Keys past a query's position (cuts inside blocks and inside V groups) never change its
    output: they get no weight, FP4 k is quantised per token, P groups only see masked (zero)
    weights there, and the selections listed ignore keys past the row's diagonal block."""
    q, k, v = make_qkv(1, 8, 2, Sq, 200, 64, torch.float16, seed=13)
    base = thrift_vllm.attention(q, k, v, block_size=32, impl="torch", **kw)
    for cut in (71, 90, 100, 150):
        n_rows = cut - (200 - Sq)  # query rows whose positions are all < cut
        if n_rows <= 0:
            continue
        out = thrift_vllm.attention(q, _poison(k, cut, 3e4), v, block_size=32, impl="torch",
                                    **kw)
        assert torch.equal(out[:, :, :n_rows], base[:, :, :n_rows]), cut
        assert not torch.equal(out[:, :, n_rows:], base[:, :, n_rows:])  # poison visible later


@pytest.mark.parametrize("kw", FP16_DIAGONAL_KW, ids=_kw_id)
@pytest.mark.parametrize("Sq", [200, 120])
def test_future_values_do_not_change_past_outputs_fp16_diagonal(kw, Sq):
    """(b) With the diagonal tile in FP16, values past a query's position never change its
    output: they carry no weight, and every FP4 tile the row uses lies wholly before it."""
    q, k, v = make_qkv(1, 8, 2, Sq, 200, 64, torch.float16, seed=13)
    base = thrift_vllm.attention(q, k, v, block_size=32, impl="torch", **kw)
    for cut in (71, 90, 100, 150):
        n_rows = cut - (200 - Sq)
        if n_rows <= 0:
            continue
        out = thrift_vllm.attention(q, k, _poison(v, cut, 3e4), block_size=32, impl="torch",
                                    **kw)
        diff = (out[:, :, :n_rows].float() - base[:, :, :n_rows].float()).abs().amax((0, 1, 3))
        changed = torch.nonzero(diff).flatten().tolist()
        assert not changed, f"cut {cut}: rows {changed} changed (max {diff.max().item():.3g})"
        assert not torch.equal(out[:, :, n_rows:], base[:, :, n_rows:])


@pytest.mark.parametrize("kw", FP4_DIAGONAL_KW, ids=_kw_id)
@pytest.mark.parametrize("Sq", [200, 120])
def test_future_values_fp4_diagonal_only_own_v_group(kw, Sq):
    """(c) Documented behaviour (``thrift_vllm.reference``): V is quantised along tokens in groups
    of G = 16 / 32 aligned to token 0, so on an FP4 diagonal tile the group holding a query's
    position also holds up to G - 1 later tokens, which set that group's per-channel scale.
    Values past the query can therefore change only rows whose own V group contains a changed
    position; rows in earlier groups are bit-identical."""
    G = GROUP[kw.get("quant_format", "nvfp4")]
    q, k, v = make_qkv(1, 8, 2, Sq, 200, 64, torch.float16, seed=13)
    base = thrift_vllm.attention(q, k, v, block_size=32, impl="torch", **kw)
    off = 200 - Sq  # absolute position of query row 0
    straddled = False
    for cut in (71, 90, 96, 100, 150):
        n_rows = cut - off  # rows strictly before the first changed position
        if n_rows <= 0:
            continue
        n_safe = (cut // G) * G - off  # rows whose V group ends at or before ``cut``
        out = thrift_vllm.attention(q, k, _poison(v, cut, 3e4), block_size=32, impl="torch",
                                    **kw)
        diff = (out.float() - base.float()).abs().amax((0, 1, 3))
        changed = torch.nonzero(diff[:n_rows]).flatten()
        assert changed.numel() == 0 or changed.min().item() >= n_safe, (
            f"cut {cut}: rows {changed.tolist()} changed, only rows >= {n_safe} may")
        straddled |= changed.numel() > 0
        assert (diff[n_rows:] > 0).any()  # the poison is visible from the cut on
    if "method" in kw:
        # Pure FP4: the straddling-group effect is real (not a vacuous bound) for these inputs.
        assert straddled


def test_prefill_last_row_equals_decode_fp16():
    """Bottom-right alignment: the last query of a prefill and a decode call on the same keys are
    the same computation (exact path)."""
    q, k, v = make_qkv(1, 8, 2, 65, 65, 64, torch.bfloat16, seed=14)
    full = thrift_vllm.attention(q, k, v, method="fp16", impl="torch")
    dec = thrift_vllm.attention(q[:, :, -1:], k, v, method="fp16", impl="torch")
    assert_close_rounded(dec, full[:, :, -1:].double(), torch.bfloat16, v=v)
