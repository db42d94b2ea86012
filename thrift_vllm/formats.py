"""FP4 formats, defined once in plain PyTorch.

Both formats store e2m1 values (codes 0..15, sign in bit 3) packed two per byte, the element with
the lower index in the low nibble (the layout `tl.dot_scaled` and `torch.float4_e2m1fn_x2` use),
plus one scale per group of consecutive elements along the quantised axis:

* ``nvfp4``: groups of 16, scale = e4m3(amax / 6), stored as ``torch.float8_e4m3fn``.
* ``mxfp4``: groups of 32, scale = 2**ceil(log2(amax / 6)) (e8m0, rounded *up* so no value ever
  clips; at least 2**-126 for non-zero groups, see below), stored as the biased exponent byte in
  ``torch.uint8`` (the fp32 exponent bias, 127).

Rounding, saturation and special cases (the Triton kernels implement exactly these rules):

* Values: ``x / scale`` (correctly rounded fp32 division) is rounded to the nearest e2m1 value
  {0, 0.5, 1, 1.5, 2, 3, 4, 6}; ties go to the even code (0.25 -> 0, 0.75 -> 1, 1.25 -> 1,
  1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4); magnitudes above 6 saturate to 6. Zero is always +0
  (code 0); negative values get the sign bit.
* NVFP4 scales: amax / 6 is rounded to nearest-even e4m3 and saturates at 448, so groups with
  amax > 2688 clip to +-2688. A group whose amax / 6 rounds to zero (amax <= 6 * 2**-10: half the
  smallest e4m3 subnormal 2**-9, and the tie rounds to zero, the even byte; this includes
  all-zero groups) has scale 0 and decodes to all zeros.
* MXFP4 scales: amax / 6 is computed in fp32 and the ceil rule is applied to its bits: the biased
  exponent byte is that of the smallest power of two >= amax / 6 for *normal* fp32 values
  (amax / 6 >= 2**-126), clamped to 254. A non-zero group whose amax / 6 is below 2**-126 (an
  fp32 subnormal) gets exponent byte 1, i.e. scale 2**-126 (never byte 0, not 2**-127): the
  subnormal rounds up to the smallest normal power of two. Byte 0 is reserved for all-zero
  groups; it decodes to zeros (the kernels read byte 0 as scale 0; ``e8m0_to_float`` gives
  2**-127, but every code of such a group is 0). The one exception is an fp32 input group with
  0 < amax <= 3 * 2**-149 (three fp32 subnormal ulps; unreachable from fp16/bf16), whose
  amax / 6 underflows to 0 in fp32: it also stores byte 0 and decodes to zeros, as every
  element would round to 0 under scale 2**-126 anyway.
* NaN or inf inputs raise ``ValueError`` in :func:`quantize` (checked on the host: one reduction).
* The quantised axis is zero-padded up to a whole group; padding never raises a group's amax.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

FORMATS = ("nvfp4", "mxfp4")
GROUP_SIZE = {"nvfp4": 16, "mxfp4": 32}
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E4M3_MAX = 448.0
E2M1_MAX = 6.0
# Decision thresholds between neighbouring e2m1 magnitudes; `>=` at a threshold means the tie
# goes up (the upper neighbour has the even code), `>` means it goes down.
_UP_AT_TIE = (False, True, False, True, False, True, False)
_THRESHOLDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def check_format(quant_format: str) -> int:
    """Return the group size of ``quant_format``; raise ValueError for unknown formats."""
    if quant_format not in GROUP_SIZE:
        raise ValueError(f"quant_format must be one of {FORMATS}, got {quant_format!r}")
    return GROUP_SIZE[quant_format]


def check_axis(axis: int) -> int:
    """``axis`` as a Python int (ints and integer scalars such as numpy ints); raise ValueError
    naming the value for anything else (floats such as 1.0, bools, strings, None)."""
    if isinstance(axis, bool):
        raise ValueError(f"axis must be an int, got {axis!r}")
    try:
        return operator.index(axis)
    except TypeError:
        raise ValueError(f"axis must be an int, got {axis!r}") from None


@dataclass(frozen=True)
class QuantizedTensor:
    """FP4 tensor: packed codes and per-group scales, with the quantised axis moved last.

    data:   uint8 ``[..., padded_len // 2]``, two e2m1 codes per byte.
    scales: ``[..., padded_len // group]``; float8_e4m3fn (nvfp4) or uint8 exponents (mxfp4).
    shape:  the original tensor's shape; ``axis`` the quantised axis (non-negative);
    dtype:  the original dtype, which :func:`dequantize` returns.
    """

    data: torch.Tensor
    scales: torch.Tensor
    quant_format: str
    axis: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def group_size(self) -> int:
        return GROUP_SIZE[self.quant_format]


def e2m1_encode(y: torch.Tensor) -> torch.Tensor:
    """Round fp32 ``y`` (already divided by its scale) to e2m1 codes (uint8, 0..15)."""
    a = y.abs()
    mag = torch.zeros_like(a, dtype=torch.int32)
    for t, up in zip(_THRESHOLDS, _UP_AT_TIE, strict=True):
        mag += (a >= t) if up else (a > t)
    sign = ((y < 0) & (mag > 0)).to(torch.int32) << 3
    return (mag | sign).to(torch.uint8)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """Decode e2m1 codes (any integer dtype, 0..15) to fp32."""
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    c = codes.to(torch.int64)
    val = lut[c & 7]
    return torch.where((c & 8) != 0, -val, val)


def round_e4m3(y: torch.Tensor) -> torch.Tensor:
    """Round non-negative fp32 to the nearest-even e4m3 value, saturating at 448 (fp32 out)."""
    y = y.clamp(max=E4M3_MAX)
    return y.to(torch.float8_e4m3fn).to(torch.float32)


def e8m0_ceil(y: torch.Tensor) -> torch.Tensor:
    """Biased exponent byte of 2**ceil(log2(y)) for fp32 ``y >= 0`` (0 for y == 0), int32."""
    bits = y.contiguous().view(torch.int32)
    exp = (bits >> 23) & 0xFF
    exp = exp + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return torch.where(y > 0, exp.clamp(max=254), torch.zeros_like(exp))


def e8m0_to_float(exp: torch.Tensor) -> torch.Tensor:
    """Scale value 2**(exp - 127) of e8m0 exponent bytes, fp32 (byte 0 decodes as 2**-127)."""
    return torch.exp2(exp.to(torch.float32) - 127.0)


def _quantize_groups(x: torch.Tensor, quant_format: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise fp32 ``x [..., n_groups, group]``; returns (codes uint8 same shape, scales)."""
    amax = x.abs().amax(dim=-1, keepdim=True)
    if quant_format == "nvfp4":
        scale = round_e4m3(amax / E2M1_MAX)
        stored = scale.squeeze(-1).to(torch.float8_e4m3fn)
    else:
        exp = e8m0_ceil(amax / E2M1_MAX)
        scale = e8m0_to_float(exp)
        stored = exp.squeeze(-1).to(torch.uint8)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = e2m1_encode(torch.where(scale > 0, x / safe, torch.zeros_like(x)))
    return codes, stored


def scales_to_float(scales: torch.Tensor, quant_format: str) -> torch.Tensor:
    """Stored scales (e4m3 or e8m0 bytes) as fp32."""
    if quant_format == "nvfp4":
        return scales.to(torch.float32)
    return e8m0_to_float(scales)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Pack uint8 codes ``[..., 2n]`` into bytes ``[..., n]`` (even index in the low nibble)."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_codes(data: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 ``[..., n]`` -> codes ``[..., 2n]``."""
    lo, hi = data & 0xF, data >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def quantize(x: torch.Tensor, quant_format: str = "nvfp4", axis: int = -1) -> QuantizedTensor:
    """Quantise ``x`` (any float dtype and shape) to FP4 along ``axis``.

    Returns a :class:`QuantizedTensor` whose ``data`` is uint8 ``[..., ceil(n / g) * g / 2]`` and
    ``scales`` ``[..., ceil(n / g)]`` with the quantised axis moved last (g = 16 for nvfp4, 32 for
    mxfp4). Rounding rules are in the module docstring. Plain PyTorch; runs on any device.
    Raises ValueError for an unknown format, a non-float or 0-d ``x``, an ``axis`` that is not an
    int or is out of range, and NaN / inf values (one host-side check).
    """
    group = check_format(quant_format)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"quantize expects a floating-point tensor, got {type(x).__name__}"
                         f"{'' if not isinstance(x, torch.Tensor) else ' of ' + str(x.dtype)}")
    if x.dim() == 0:
        raise ValueError("quantize expects at least one dimension, got a scalar")
    axis = check_axis(axis)
    ax = axis % x.dim() if -x.dim() <= axis < x.dim() else None
    if ax is None:
        raise ValueError(f"axis {axis} out of range for a tensor of rank {x.dim()}")
    if not torch.isfinite(x).all():
        raise ValueError("quantize got NaN or inf values; FP4 has no encoding for them")
    xm = x.movedim(ax, -1).to(torch.float32)
    n = xm.shape[-1]
    padded = -(-n // group) * group
    if padded != n:
        xm = torch.nn.functional.pad(xm, (0, padded - n))
    codes, scales = _quantize_groups(xm.reshape(*xm.shape[:-1], padded // group, group),
                                     quant_format)
    data = pack_codes(codes.flatten(-2))
    return QuantizedTensor(data.contiguous(), scales.contiguous(), quant_format, ax,
                           tuple(x.shape), x.dtype)


def dequantize(qt: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode a :class:`QuantizedTensor` back to its original shape, in ``dtype`` (default: the
    original dtype). Every FP4 value times its scale is exact in fp32."""
    group = qt.group_size
    codes = unpack_codes(qt.data)
    vals = e2m1_decode(codes)
    vals = vals.reshape(*vals.shape[:-1], vals.shape[-1] // group, group)  # -1: empty inputs
    vals = vals * scales_to_float(qt.scales, qt.quant_format).unsqueeze(-1)
    vals = vals.flatten(-2)[..., : qt.shape[qt.axis]]
    return vals.movedim(-1, qt.axis).to(dtype or qt.dtype)


def fake_quantize(x: torch.Tensor, quant_format: str = "nvfp4", axis: int = -1) -> torch.Tensor:
    """``dequantize(quantize(x))`` in fp32, the value every FP4 path computes with."""
    return dequantize(quantize(x, quant_format, axis), torch.float32)
