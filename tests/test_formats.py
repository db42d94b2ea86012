"""FP4 formats (``thrift_vllm.formats``) against an independent, table-based encoder.

The reference below never calls the library's rounding helpers nor torch's float8 cast: the e2m1
and e4m3 value tables are built by hand from their bit fields, rounding is a brute-force nearest
search over those tables with the documented tie rule (ties to the even code / even mantissa),
and the e8m0 scale is the smallest power of two >= amax / 6 found by a float64 search. Everything
here is exact (bit-for-bit), so there are no tolerances.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from thrift_vllm.formats import dequantize, quantize

GROUP = {"nvfp4": 16, "mxfp4": 32}
LENGTHS = (1, 17, 63, 65, 200)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------
# Independent tables
# ----------------------------------------------------------------------------------------------


def _e2m1_table() -> list[float]:
    """Value of each of the 16 e2m1 codes: s (bit 3), e (bits 2..1, bias 1), m (bit 0)."""
    vals = []
    for code in range(16):
        s, e, m = code >> 3, (code >> 1) & 3, code & 1
        mag = m * 0.5 if e == 0 else (1.0 + m / 2.0) * 2.0 ** (e - 1)
        vals.append(-mag if s else mag)
    return vals


def _e4m3_table() -> list[float]:
    """Value of each of the 256 e4m3fn bytes: s (bit 7), e (bits 6..3, bias 7), m (bits 2..0).
    e == 15 and m == 7 is NaN (no infinities in the fn variant)."""
    vals = []
    for b in range(256):
        s, e, m = b >> 7, (b >> 3) & 15, b & 7
        if e == 15 and m == 7:
            mag = math.nan
        elif e == 0:
            mag = m / 8.0 * 2.0**-6
        else:
            mag = (1.0 + m / 8.0) * 2.0 ** (e - 7)
        vals.append(-mag if s else mag)
    return vals


E2M1 = _e2m1_table()
E4M3 = _e4m3_table()
# Non-negative magnitudes (codes 0..7 / bytes 0..126) as float64 tensors for brute-force search.
E2M1_POS = torch.tensor(E2M1[:8], dtype=torch.float64)
E4M3_POS = torch.tensor(E4M3[:127], dtype=torch.float64)


def _nearest_even(a: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the table entry nearest to each ``a`` (float64, >= 0); among equidistant entries
    the even index (= even code / even mantissa, as the tables are ordered by code)."""
    dist = (a[..., None] - table).abs()
    best = dist.min(dim=-1, keepdim=True).values
    is_best = dist == best
    idx = torch.arange(table.numel())
    # Prefer even indices among the nearest: key = index + (odd ? 1000 : 0); take the min.
    key = torch.where(is_best, idx + 1000 * (idx % 2), torch.full_like(idx, 10**9))
    out = key.argmin(dim=-1)
    return out


def ref_e2m1_codes(y: torch.Tensor) -> torch.Tensor:
    """float64 ``y`` (already divided by the scale) -> e2m1 codes, saturating, +0 for zero."""
    # Magnitudes above 6 saturate to 6 (clamp first: |y| - 6 would lose the table in fp64).
    mag = _nearest_even(y.abs().clamp(max=7.0), E2M1_POS)
    neg = (y < 0) & (mag > 0)
    return (mag + 8 * neg.long()).to(torch.uint8)


def ref_e4m3_byte(t: torch.Tensor) -> torch.Tensor:
    """Non-negative float64 -> e4m3fn byte: nearest, ties to even mantissa, saturating at 448."""
    return _nearest_even(t.clamp(max=448.0), E4M3_POS).to(torch.uint8)


def ref_e8m0_byte(t: torch.Tensor) -> torch.Tensor:
    """Biased exponent of the smallest power of two >= t (float64 > 0), but at least 2**-126
    (byte 1: the documented rule, byte 0 is reserved for all-zero groups); 0 for t == 0."""
    out = torch.zeros(t.shape, dtype=torch.int64)
    flat_t, flat_o = t.reshape(-1), out.view(-1)
    for i, val in enumerate(flat_t.tolist()):
        if val == 0.0:
            continue
        e = -126
        while 2.0**e < val:
            e += 1
        flat_o[i] = e + 127
    return out.to(torch.uint8)


def ref_quantize(x: torch.Tensor, fmt: str, axis: int):
    """Independent quantiser: returns (codes [..., padded], scale bytes [..., n_groups],
    dequantised float64 [..., n]) with the quantised axis moved last."""
    g = GROUP[fmt]
    xm = x.movedim(axis, -1).to(torch.float64)  # exact: fp16/bf16/fp32 -> fp64
    n = xm.shape[-1]
    padded = -(-n // g) * g
    xp = torch.nn.functional.pad(xm, (0, padded - n)).reshape(*xm.shape[:-1], padded // g, g)
    amax = xp.abs().amax(-1)
    if fmt == "nvfp4":
        sbyte = ref_e4m3_byte(amax / 6.0)
        scale = torch.tensor(E4M3, dtype=torch.float64)[sbyte.long()]
    else:
        sbyte = ref_e8m0_byte(amax / 6.0)
        scale = torch.where(sbyte.double() > 0, 2.0 ** (sbyte.double() - 127.0), 0.0)
    safe = torch.where(scale > 0, scale, 1.0)
    y = torch.where(scale[..., None] > 0, xp / safe[..., None], 0.0)
    codes = ref_e2m1_codes(y)
    vals = torch.tensor(E2M1, dtype=torch.float64)[codes.long()] * scale[..., None]
    return codes.flatten(-2), sbyte, vals.flatten(-2)[..., :n]


def lib_codes(qt) -> torch.Tensor:
    """Unpack the library's bytes with the documented layout (even index in the low nibble)."""
    lo, hi = qt.data & 0xF, qt.data >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def lib_scale_bytes(qt) -> torch.Tensor:
    return qt.scales.view(torch.uint8) if qt.quant_format == "nvfp4" else qt.scales


def check_against_reference(x: torch.Tensor, fmt: str, axis: int) -> None:
    codes, sbytes, deq = ref_quantize(x, fmt, axis)
    qt = quantize(x, fmt, axis)
    g = GROUP[fmt]
    n = x.shape[axis]
    padded = -(-n // g) * g
    assert qt.data.dtype == torch.uint8
    assert qt.data.shape == (*codes.shape[:-1], padded // 2)
    assert qt.scales.dtype == (torch.float8_e4m3fn if fmt == "nvfp4" else torch.uint8)
    assert qt.scales.shape == sbytes.shape
    assert qt.shape == tuple(x.shape) and qt.dtype == x.dtype and qt.quant_format == fmt
    assert qt.axis == axis % x.dim()
    assert torch.equal(lib_scale_bytes(qt), sbytes)
    assert torch.equal(lib_codes(qt), codes)
    out = dequantize(qt, torch.float32)
    # Every e2m1 value times an e4m3/e8m0 scale has <= 6 significant bits: exact in fp32.
    assert torch.equal(out.movedim(axis, -1).double(), deq)
    out_native = dequantize(qt)
    assert out_native.dtype == x.dtype and out_native.shape == x.shape
    assert torch.equal(out_native, out.to(x.dtype))


def wide_random(shape, dtype, seed: int) -> torch.Tensor:
    """Random signs and magnitudes over ~40 binades (each group gets its own range) plus exact
    zeros, clipped to the dtype's range. Stays above 6 * 2**-126 so that MX scales are normal."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    exps = torch.randint(-20, 21, shape, generator=gen).double()
    x = x * 2.0**exps
    x = torch.where(torch.rand(shape, generator=gen) < 0.05, 0.0, x)
    if dtype == torch.float16:
        x = x.clamp(-60000.0, 60000.0)
    return x.to(dtype)


def extreme_random(rows: int, seed: int) -> torch.Tensor:
    """float64 [rows, 64]: per row a random binade 2**e, e in [-120, 126], whose power of two is
    every 8th element (so each group's amax is exactly 2**e); the rest spread 30 binades below."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(rows, 64, generator=gen, dtype=torch.float64) * 2 - 1
    e = torch.randint(-120, 127, (rows, 1), generator=gen).double()
    x = x * 2.0**e * 2.0 ** -torch.randint(0, 30, (rows, 64), generator=gen).double()
    x[:, ::8] = 2.0**e
    return x


# ----------------------------------------------------------------------------------------------
# Table sanity (the tables themselves must be right for the rest to mean anything)
# ----------------------------------------------------------------------------------------------


def test_reference_tables():
    assert E2M1[:8] == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert E2M1[8:] == [-v for v in E2M1[:8]]
    finite = [v for v in E4M3 if not math.isnan(v)]
    assert len(finite) == 254 and max(finite) == 448.0 and min(finite) == -448.0
    assert E4M3[1] == 2.0**-9 and E4M3[8] == 2.0**-6 and E4M3[126] == 448.0
    pos = E4M3[:127]
    assert pos == sorted(pos) and len(set(pos)) == 127


# ----------------------------------------------------------------------------------------------
# Random data against the reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_random_last_axis(fmt, n, dtype):
    x = wide_random((3, 5, n), dtype, seed=n * 7 + len(fmt))
    check_against_reference(x, fmt, -1)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_random_axis_minus_two(fmt, n, dtype):
    x = wide_random((2, n, 24), dtype, seed=1000 + n)
    check_against_reference(x, fmt, -2)
    check_against_reference(x, fmt, 1)  # same axis, positive spelling


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_random_first_axis_rank2(fmt):
    x = wide_random((65, 7), torch.float32, seed=5)
    check_against_reference(x, fmt, 0)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_extreme_exponents(fmt, dtype):
    """Group scales over the whole fp32 exponent range (nvfp4: mostly underflow to 0 or saturate
    at 448; mxfp4: bytes 7..254), elements down to fp32 subnormals. MX groups keep amax / 6 above
    2**-126 (the subnormal case is test_mxfp4_tiny_scale_bf16)."""
    x = extreme_random(300, seed=17)
    check_against_reference(x.to(dtype), fmt, -1)
    check_against_reference(x.t().to(dtype), fmt, 0)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_random_rounding_dense_near_thresholds(fmt):
    """Values k/64 times a power of two with a planted amax: many exact ties and near-ties."""
    g = GROUP[fmt]
    gen = torch.Generator().manual_seed(11)
    steps = torch.randint(-6 * 64, 6 * 64 + 1, (40, 4 * g), generator=gen).double() / 64.0
    steps[:, ::g] = 6.0  # amax 6 * 2**e -> scale exactly 2**e in both formats
    x = (steps * 2.0 ** torch.randint(-8, 8, (40, 1), generator=gen).double()).float()
    check_against_reference(x, fmt, -1)


# ----------------------------------------------------------------------------------------------
# Specific cases
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("scale_exp", [-3, 0, 2])
def test_all_16_codes_round_trip(fmt, scale_exp):
    """Group amax 6 * 2**e makes the scale exactly 2**e (e4m3 and e8m0), so every e2m1 value times
    the scale must be encoded as its own code and decode exactly."""
    g = GROUP[fmt]
    s = 2.0**scale_exp
    vals = torch.tensor(E2M1, dtype=torch.float64)
    vals[8] = -6.0  # code 8 (-0) is never produced; keep the amax and use -6 instead
    row = torch.zeros(g, dtype=torch.float64)
    row[:16] = vals
    x = (row * s).float()[None]
    qt = quantize(x, fmt)
    codes = lib_codes(qt)[0, :16]
    expected = torch.arange(16, dtype=torch.uint8)
    expected[8] = 15
    assert torch.equal(codes, expected)
    assert torch.equal(dequantize(qt), x)
    if fmt == "nvfp4":
        assert qt.scales.float().item() == s
    else:
        assert qt.scales.item() == 127 + scale_exp


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_exact_ties_go_to_even_code(fmt, sign):
    g = GROUP[fmt]
    s = 0.5  # scale = amax / 6 = 0.5 exactly in both formats
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    expect_mag = [0, 2, 2, 4, 4, 6, 6]  # codes of 0, 1, 1, 2, 2, 4, 4
    row = torch.zeros(g)
    row[0] = 6.0 * s
    row[1:8] = sign * torch.tensor(ties) * s
    qt = quantize(row[None], fmt)
    codes = lib_codes(qt)[0, 1:8].tolist()
    expected = [m + (8 if sign < 0 and m else 0) for m in expect_mag]
    assert codes == expected
    deq = dequantize(qt)[0, 1:8]
    assert deq.tolist() == [sign * E2M1[m] * s if m else 0.0 for m in expect_mag]
    # Zero is always +0 (code 0), even for negative inputs that round to zero.
    assert not torch.signbit(deq[0])


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_just_off_ties(fmt):
    """One fp32 ulp either side of each tie decides the direction."""
    g = GROUP[fmt]
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    up, down = torch.nextafter(ties, torch.tensor(10.0)), torch.nextafter(ties, torch.tensor(0.0))
    row = torch.zeros(2 * g)
    row[0] = row[g] = 6.0
    row[1:8], row[g + 1 : g + 8] = up, down
    codes = lib_codes(quantize(row[None], fmt))[0]
    assert codes[1:8].tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert codes[g + 1 : g + 8].tolist() == [0, 1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nvfp4_saturation(dtype):
    # amax 1e4 > 2688: scale saturates at 448, and 1e4 / 448 > 6 saturates to code 7.
    x = torch.zeros(1, 32, dtype=dtype)
    x[0, 0], x[0, 1], x[0, 2] = 1e4, -5e3, 2688.0
    x[0, 16] = 3000.0  # second group: amax / 6 = 500 rounds to 448 (nearest and saturation)
    qt = quantize(x, "nvfp4")
    assert qt.scales.float().tolist() == [[448.0, 448.0]]
    deq = dequantize(qt, torch.float32)[0]
    assert deq[:3].tolist() == [2688.0, -2688.0, 2688.0]
    assert deq[16].item() == 2688.0
    codes, sbytes, _ = ref_quantize(x, "nvfp4", -1)
    assert torch.equal(lib_codes(qt), codes) and torch.equal(lib_scale_bytes(qt), sbytes)


def test_value_saturation_with_rounded_down_scale():
    """amax / 6 = 0.53125 rounds (to nearest e4m3) down to 0.5, so amax / scale = 6.375 > 6 and
    the largest element saturates to code 7 (6 * 0.5 = 3) instead of overflowing."""
    x = torch.zeros(1, 16)
    x[0, 0] = 6 * 0.53125
    qt = quantize(x, "nvfp4")
    assert qt.scales.float().item() == 0.5
    assert lib_codes(qt)[0, 0].item() == 7
    assert dequantize(qt)[0, 0].item() == 3.0


def test_mxfp4_never_clips():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 96, generator=gen) * 2.0 ** torch.randint(-10, 10, (64, 1), generator=gen)
    deq = dequantize(quantize(x, "mxfp4"), torch.float32)
    # Scale >= amax / 6: no |x| exceeds 6 * scale, so nothing saturates and the error of each
    # element is at most half the local e2m1 gap (at most 1 * scale, i.e. amax / 3).
    amax = x.view(64, 3, 32).abs().amax(-1, keepdim=True)
    assert ((deq - x).view(64, 3, 32).abs() <= amax / 3).all()


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_zero_groups(fmt, dtype):
    x = torch.zeros(2, 3, 40, dtype=dtype)
    x[0, 0, 35] = 6.0  # one non-zero element (scale 1) in the last, partial group of one row
    qt = quantize(x, fmt, -1)
    sb = lib_scale_bytes(qt)
    nz = torch.zeros_like(sb, dtype=torch.bool)
    nz[0, 0, 35 // GROUP[fmt]] = True
    assert (sb[~nz] == 0).all()  # nvfp4: +0.0 (byte 0); mxfp4: exponent byte 0
    assert (qt.data.view(2, 3, -1)[..., :16] == 0).all()
    deq = dequantize(qt)
    assert torch.equal(deq, x) and not torch.signbit(deq).any()
    # Negative zeros also encode as +0.
    xn = -torch.zeros(1, 16, dtype=dtype)
    qn = quantize(xn, fmt)
    assert (qn.data == 0).all() and not torch.signbit(dequantize(qn)).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_nvfp4_tiny_groups_underflow_to_zero(dtype):
    """amax / 6 below half the smallest e4m3 subnormal (2**-9) rounds the scale to zero and the
    group decodes to zeros; exactly half (amax = 6 * 2**-10) is a tie that goes to the even byte 0;
    just above it rounds to 2**-9."""
    x = torch.zeros(4, 16, dtype=torch.float64)
    x[0, :3] = torch.tensor([5.9, -3.0, 1.0]) * 2.0**-10  # amax < 6 * 2**-10
    x[1, 0] = 6 * 2.0**-10  # tie -> 0
    x[2, 0] = 6.5 * 2.0**-10  # -> 2**-9
    x[3, :2] = torch.tensor([6 * 2.0**-9, 1.5 * 2.0**-9])  # smallest subnormal scale exactly
    x = x.to(dtype)
    qt = quantize(x, "nvfp4")
    assert qt.scales.float().flatten().tolist() == [0.0, 0.0, 2.0**-9, 2.0**-9]
    deq = dequantize(qt, torch.float32)
    assert (deq[:2] == 0).all()
    assert deq[2, 0].item() == 3 * 2.0**-9  # 6.5 * 2**-10 / 2**-9 = 3.25 -> 3
    assert deq[3, :2].tolist() == [6 * 2.0**-9, 1.5 * 2.0**-9]
    codes, sbytes, _ = ref_quantize(x, "nvfp4", -1)
    assert torch.equal(lib_codes(qt), codes) and torch.equal(lib_scale_bytes(qt), sbytes)


def test_nvfp4_e4m3_subnormal_scales_exhaustive():
    """Every e4m3 value (and every midpoint between neighbours) times 6 as a group amax."""
    pos = torch.tensor(E4M3[:127], dtype=torch.float64)
    mids = (pos[1:] + pos[:-1]) / 2
    amax = torch.cat([pos, mids, torch.tensor([464.0, 470.0, 2000.0], dtype=torch.float64)])
    x = torch.zeros(amax.numel(), 16, dtype=torch.float64)
    x[:, 0] = 6 * amax
    x[:, 1] = 6 * amax * 0.3
    x = x.float()
    assert torch.equal(x[:, 0].double(), 6 * amax)  # the construction itself is exact in fp32
    qt = quantize(x, "nvfp4")
    codes, sbytes, _ = ref_quantize(x, "nvfp4", -1)
    assert torch.equal(lib_scale_bytes(qt), sbytes)
    assert torch.equal(lib_codes(qt), codes)
    # Spot-check the tie rule on the scale: midpoint between bytes 1 and 2 (1.5 * 2**-9) goes to
    # byte 2 (even mantissa), between 2 and 3 goes to 2.
    assert sbytes[127 + 0].item() == 0  # midpoint 0 / 2**-9 -> 0
    assert sbytes[127 + 1].item() == 2 and sbytes[127 + 2].item() == 2


def test_mxfp4_scale_exponents():
    # amax / 6 exactly a power of two keeps it; one ulp above goes to the next power.
    x = torch.zeros(4, 32)
    x[0, 0] = 6.0 * 2.0**-3
    x[1, 0] = torch.nextafter(torch.tensor(6.0 * 2.0**-3), torch.tensor(1.0))
    x[2, 0] = 6.0 * 2.0**100
    x[3, 0] = 1.0
    qt = quantize(x, "mxfp4")
    # 1 / 6 lies in (2**-3, 2**-2]: byte 127 - 2.
    assert qt.scales.flatten().tolist() == [124, 125, 227, 125]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mxfp4_tiny_scale_bf16(dtype):
    """bf16 reaches fp32's exponent range, so amax / 6 can be an fp32 *subnormal*. Documented:
    a non-zero group whose amax / 6 is below 2**-126 gets exponent byte 1 (scale 2**-126), never
    byte 0, which only all-zero groups store; values are then rounded against 2**-126. Checked
    against the table-based encoder with that rule, one group per row."""
    # Group amax values, all exact in bf16: amax / 6 = 2**-127, 1.5 * 2**-128, 2**-130 / 6,
    # 2**-133 / 6 (bf16's smallest subnormal as amax), then 2**-126 and 1.25 * 2**-126 (normal).
    amaxes = [6 * 2.0**-127, 9 * 2.0**-128, 2.0**-130, 2.0**-133, 6 * 2.0**-126,
              7.5 * 2.0**-126]
    x = torch.zeros(len(amaxes), 32, dtype=torch.float64)
    for r, a in enumerate(amaxes):
        x[r, :5] = torch.tensor([a, -a / 2, a / 4, 0.75 * a, -a / 8], dtype=torch.float64)
    x = x.to(dtype)
    x64 = x.double()
    amax = x64.abs().amax(-1)
    assert amax.tolist() == amaxes  # the cases are what they claim (exact in bf16 and fp32)
    expected = ref_e8m0_byte(torch.tensor(amaxes, dtype=torch.float64) / 6).tolist()
    assert expected == [1, 1, 1, 1, 1, 2]
    qt = quantize(x, "mxfp4")
    assert qt.scales.flatten().tolist() == expected
    # Values: the table-based e2m1 rounding against the documented scale 2**(byte - 127).
    scale = torch.exp2(torch.tensor(expected, dtype=torch.float64) - 127.0)[:, None]
    codes = ref_e2m1_codes(x64 / scale)
    assert torch.equal(lib_codes(qt), codes)
    deq = torch.tensor(E2M1, dtype=torch.float64)[codes.long()] * scale
    assert torch.equal(dequantize(qt, torch.float32).double(), deq)
    # 6 * 2**-127 / 2**-126 = 3 exactly: that group's largest value survives the round-up.
    assert dequantize(qt, torch.float32)[0, 0].item() == 6 * 2.0**-127


def test_mxfp4_fp32_underflowing_amax_stores_byte_0():
    """Documented corner: an fp32 group with 0 < amax <= 3 * 2**-149 has amax / 6 == 0 in fp32,
    stores byte 0 like an all-zero group and decodes to zeros (as it would under 2**-126)."""
    x = torch.zeros(3, 32)
    x[0, 0] = 3 * 2.0**-149
    x[1, :2] = torch.tensor([2.0**-149, -2 * 2.0**-149])
    x[2, 0] = 4 * 2.0**-149  # amax / 6 rounds up to 2**-149 > 0: byte 1
    assert x[0, 0].item() == 3 * 2.0**-149
    qt = quantize(x, "mxfp4")
    assert qt.scales.flatten().tolist() == [0, 0, 1]
    assert (qt.data == 0).all()
    assert torch.equal(dequantize(qt), torch.zeros_like(x))


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_raises(fmt, bad, dtype):
    x = torch.randn(3, 40).to(dtype)
    x[2, 37] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize(x, fmt)


@pytest.mark.parametrize("bad", ["nvfp8", "NVFP4", "fp4", ""])
def test_bad_format_raises(bad):
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        quantize(x, bad)


@pytest.mark.parametrize(
    ("shape", "axis"), [((4, 16), 2), ((4, 16), -3), ((8,), 1), ((2, 3, 4), 7)]
)
def test_bad_axis_raises(shape, axis):
    with pytest.raises(ValueError, match=rf"axis {axis}\b"):
        quantize(torch.randn(shape), "nvfp4", axis)


@pytest.mark.parametrize("axis", [1.0, -1.0, "1", None, True, 0.5])
def test_non_int_axis_raises(axis):
    """A non-int axis is a ValueError naming the value (not a TypeError from movedim)."""
    with pytest.raises(ValueError, match=re.escape(f"got {axis!r}")):
        quantize(torch.randn(4, 16), "nvfp4", axis)


def test_integer_like_axis_accepted():
    np = pytest.importorskip("numpy")
    x = torch.randn(4, 32)
    assert torch.equal(quantize(x, "nvfp4", np.int64(0)).data, quantize(x, "nvfp4", 0).data)


@pytest.mark.parametrize("x", [torch.arange(16), torch.ones(16, dtype=torch.bool), [1.0] * 16])
def test_non_float_raises(x):
    with pytest.raises(ValueError, match="floating-point"):
        quantize(x, "nvfp4")


def test_scalar_raises():
    with pytest.raises(ValueError, match="scalar"):
        quantize(torch.tensor(1.0), "nvfp4")


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_packing_order(fmt):
    """Element 2i goes in the low nibble of byte i, element 2i + 1 in the high nibble."""
    g = GROUP[fmt]
    x = torch.zeros(1, g)
    x[0, 0] = 6.0  # code 7 at even index 0
    x[0, 1] = -0.5  # code 9 at odd index 1
    x[0, 2] = 1.0  # code 2 at index 2
    x[0, 5] = 4.0  # code 6 at index 5
    qt = quantize(x, fmt)
    assert qt.data.shape == (1, g // 2)
    assert qt.data[0, :3].tolist() == [7 | (9 << 4), 2, 6 << 4]
    assert (qt.data[0, 3:] == 0).all()


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "axis"), [((2, 3, 65), -1), ((2, 63, 8), -2), ((17, 4), 0)])
def test_dequantize_dtype_and_shape(fmt, dtype, shape, axis):
    x = torch.randn(shape).to(dtype)
    qt = quantize(x, fmt, axis)
    out = dequantize(qt)
    assert out.dtype == dtype and out.shape == x.shape
    out16 = dequantize(qt, torch.float32)
    assert out16.dtype == torch.float32 and out16.shape == x.shape
    # Sanity of the round trip: an element's error is at most half the largest e2m1 gap (2), i.e.
    # one scale, and a scale is at most amax / 6 * 17 / 16 (nvfp4, e4m3 rounds by <= 1/16) or
    # < amax / 3 (mxfp4, rounded up to a power of two): bound by the tensor's amax / 3.
    err = (out16 - x.float()).abs()
    assert (err <= x.float().abs().amax() / 3).all()


# ----------------------------------------------------------------------------------------------
# Triton kernel (interpreted on CPU) against the PyTorch definition
# ----------------------------------------------------------------------------------------------


def _kernel_vs_torch(x, fmt, axis, pad_to=None):
    from thrift_vllm.ops.quantize import quantize_fp4

    ref = quantize(x, fmt, axis)
    got = quantize_fp4(x, fmt, axis, pad_to=pad_to)
    assert got.quant_format == fmt and got.axis == ref.axis and got.shape == ref.shape
    assert got.dtype == ref.dtype
    nb, ns = ref.data.shape[-1], ref.scales.shape[-1]
    assert got.data.shape[:-1] == ref.data.shape[:-1]
    assert got.scales.dtype == ref.scales.dtype
    assert torch.equal(got.data[..., :nb], ref.data)
    assert torch.equal(lib_scale_bytes(got)[..., :ns], lib_scale_bytes(ref))
    # Extra padding (pad_to) is all-zero codes with zero scales.
    assert (got.data[..., nb:] == 0).all()
    assert (lib_scale_bytes(got)[..., ns:] == 0).all()
    if pad_to:
        assert got.data.shape[-1] * 2 % pad_to == 0
    assert torch.equal(dequantize(got), dequantize(ref))


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize(
    ("shape", "axis", "dtype", "pad_to"),
    [
        ((3, 17, 64), -1, torch.float16, None),
        ((2, 5, 65), -1, torch.float32, None),
        ((2, 65, 24), -2, torch.bfloat16, None),
        ((2, 65, 24), -2, torch.float16, 64),
        ((1, 63, 128), -2, torch.float32, 64),
        ((4, 200), 0, torch.bfloat16, None),
    ],
)
def test_triton_quantize_matches(fmt, shape, axis, dtype, pad_to):
    x = wide_random(shape, dtype, seed=sum(shape))
    x.view(-1)[:40] = 0  # some all-zero groups
    _kernel_vs_torch(x, fmt, axis, pad_to)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_triton_quantize_extreme_exponents(fmt):
    x = extreme_random(48, seed=23).float()
    _kernel_vs_torch(x, fmt, -1)
    _kernel_vs_torch(x.bfloat16(), fmt, 0, pad_to=64)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_triton_quantize_special_values(fmt):
    g = GROUP[fmt]
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    x = torch.zeros(6, 64)
    x[0, 0], x[0, 1:8] = 3.0, -ties * 0.5  # exact ties at scale 0.5
    x[1, 0], x[1, 1] = 1e4, -3000.0  # saturation
    x[2, :3] = torch.tensor([5.9, -3.0, 1.0]) * 2.0**-10  # nvfp4 scale underflow
    x[3, 0] = 6 * 2.0**-10
    x[4, :g] = torch.linspace(-7, 7, g)
    x[5, 0] = 6 * 0.53125
    _kernel_vs_torch(x, fmt, -1)
    _kernel_vs_torch(x.t().contiguous(), fmt, 0, pad_to=64)


@pytest.mark.parametrize("axis", [3, -4, 7])
def test_triton_quantize_bad_axis_raises(axis):
    """``quantize_fp4`` rejects out-of-range axes like ``quantize`` (it used to wrap them with
    ``axis % x.dim()``: axis 3 on rank 3 quietly quantised axis 0)."""
    from thrift_vllm.ops.quantize import quantize_fp4

    x = torch.randn(2, 16, 32)
    with pytest.raises(ValueError, match=rf"axis {axis}\b"):
        quantize(x, "nvfp4", axis)
    with pytest.raises(ValueError, match=rf"axis {axis}\b"):
        quantize_fp4(x, "nvfp4", axis)


@pytest.mark.parametrize("axis", [1.0, "1", None, True])
def test_triton_quantize_non_int_axis_raises(axis):
    from thrift_vllm.ops.quantize import quantize_fp4

    with pytest.raises(ValueError, match=re.escape(f"got {axis!r}")):
        quantize_fp4(torch.randn(2, 16, 32), "nvfp4", axis)


def test_triton_quantize_negative_axis_in_range():
    _kernel_vs_torch(wide_random((2, 16, 32), torch.float32, seed=2), "nvfp4", -3)


def test_triton_quantize_tiny_mx_scales():
    """The kernel follows the documented MXFP4 rule for subnormal amax / 6 (byte 1) too."""
    x = torch.zeros(4, 64)
    x[0, 0], x[1, 0], x[2, 0] = 6 * 2.0**-127, 2.0**-133, 2.0**-130
    x[2, 40] = 2.0**-140
    _kernel_vs_torch(x, "mxfp4", -1)
    from thrift_vllm.ops.quantize import quantize_fp4

    assert quantize_fp4(x, "mxfp4").scales[:, 0].tolist() == [1, 1, 1, 0]


# ----------------------------------------------------------------------------------------------
# The Hopper decode's inline-PTX FP4 conversion (kernels/fp4.py), run by a tiny PTX emulator:
# the interpreter never executes inline asm, so without this only the GPU would check it.
# ----------------------------------------------------------------------------------------------


def _run_ptx(asm: str, word: int) -> list[int]:
    """Execute the straight-line PTX of `_e2m1x2_f16_div64` on one packed word ($4); returns the
    four output registers $0..$3 (f16x2 bit patterns). Knows exactly the instructions it uses."""
    regs: dict[str, int] = {"$4": word}

    def val(tok: str) -> int:
        return int(tok, 16) if tok.startswith("0x") else (int(tok) if tok.isdigit() else regs[tok])

    def f16_bits(x: float) -> int:
        return int(torch.tensor(x, dtype=torch.float16).view(torch.int16)) & 0xFFFF

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line[0] in "{}." or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        if op == "mov.b32":  # mov.b32 {lo16, hi16}, src
            halves, src = args.split("},")
            lo, hi = (h.strip(" {") for h in halves.split(","))
            regs[lo], regs[hi] = regs[src.strip()] & 0xFFFF, regs[src.strip()] >> 16
            continue
        d, *srcs = (a.strip() for a in args.split(","))
        x = [val(s) for s in srcs]
        if op == "shl.b32":
            regs[d] = (x[0] << x[1]) & 0xFFFFFFFF
        elif op == "shr.b32":
            regs[d] = x[0] >> x[1]
        elif op == "and.b32":
            regs[d] = x[0] & x[1]
        elif op == "or.b32":
            regs[d] = x[0] | x[1]
        elif op == "cvt.rn.f16x2.e4m3x2":  # low byte -> low half
            lo, hi = E4M3[x[0] & 0xFF], E4M3[x[0] >> 8]
            regs[d] = f16_bits(lo) | (f16_bits(hi) << 16)
        else:
            raise AssertionError(f"emulator does not know {op!r}")
    return [regs[f"${i}"] for i in range(4)]


def test_ptx_e2m1_to_f16_via_e4m3_is_exact():
    """Every nibble of random packed words decodes to its e2m1 value / 64 (fp16 bits), with the
    output order the kernel expects: $0/$1 the low nibbles of bytes 0-1 / 2-3, $2/$3 the high."""
    import inspect

    from thrift_vllm.kernels import fp4

    src = inspect.getsource(fp4._e2m1x2_f16_div64.fn)
    asm = re.search(r'asm="""(.*?)"""', src, re.S).group(1)
    gen = torch.Generator().manual_seed(7)
    words = torch.randint(0, 2**32, (300,), generator=gen, dtype=torch.int64).tolist()
    words += [int.from_bytes(bytes([b, b ^ 0xFF, (b * 7) & 0xFF, 255 - b]), "little")
              for b in range(256)]  # every byte value, in every position
    for w in words:
        out = _run_ptx(asm, w)
        halves = [(r >> (16 * i)) & 0xFFFF for r in out for i in (0, 1)]
        got = torch.tensor(halves, dtype=torch.int32).to(torch.int16).view(torch.float16)
        by = w.to_bytes(4, "little")
        want = [E2M1[b & 15] / 64 for b in by] + [E2M1[b >> 4] / 64 for b in by]
        assert got.tolist() == want, hex(w)
