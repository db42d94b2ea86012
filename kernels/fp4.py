"""FP4 (e2m1) encode/decode helpers and the quantisation kernel.

Bit-exact with ``thrift_vllm/formats.py``: same thresholds, same e4m3 / e8m0 scale rounding.
"""

import triton
import triton.language as tl


@triton.jit
def _e2m1_code(y):
    """fp32 (already divided by the scale) -> int32 e2m1 code, nearest with ties to even code."""
    a = tl.abs(y)
    mag = (a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
    mag += (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32)
    mag += (a > 5.0).to(tl.int32)
    return mag + ((y < 0) & (mag > 0)).to(tl.int32) * 8


@triton.jit
def _e2m1_value(code):
    """int32 e2m1 code -> fp32 value. The code's exponent/mantissa bits placed at the top of an
    fp16 exponent give 2**(e-15) * (1 + m/2) (or m * 2**-15 for e == 0); times 2**14 that is the
    e2m1 value, exactly. No lookup table, four integer ops."""
    bits = ((code & 8) << 12) | ((code & 7) << 9)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * 16384.0


@triton.jit
def _round_e4m3(y):
    """Non-negative fp32 -> nearest-even e4m3 value (as fp32), saturating at 448."""
    y = tl.minimum(y, 448.0)
    bits = y.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    # Below 2**-6 e4m3 is subnormal with a fixed quantum 2**-9; adding 2**14 rounds to it (RNE).
    sub = (y + 16384.0) - 16384.0
    return tl.where(y < 0.015625, sub, normal)


@triton.jit
def _e8m0_ceil(y):
    """fp32 >= 0 -> biased exponent (int32) of 2**ceil(log2(y)); 0 for y == 0."""
    bits = y.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    return tl.where(y > 0, tl.minimum(e, 254), 0)


@triton.jit
def _e8m0_value(e):
    """Biased exponent (int32, 1..254) -> 2**(e - 127) as fp32; 0 -> 0 (only all-zero groups)."""
    return (e << 23).to(tl.float32, bitcast=True)


@triton.jit
def _scale_value(s, FMT: tl.constexpr):
    """Stored scale bytes (uint8: e4m3 bits for nvfp4, exponent for mxfp4) -> fp32."""
    if FMT == "nvfp4":
        return s.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        return _e8m0_value(s.to(tl.int32))


@triton.jit
def _mma_scale(s, FMT: tl.constexpr):
    """Stored scale bytes (uint8) in the type tl.dot_scaled expects (e4m3 for nvfp4)."""
    if FMT == "nvfp4":
        return s.to(tl.float8e4nv, bitcast=True)
    else:
        return s


@triton.jit
def _unpack(packed):
    """uint8 [R, C/2] -> int32 codes [R, C] (low nibble first)."""
    p = packed.to(tl.int32)
    return tl.interleave(p & 0xF, p >> 4)


@triton.jit
def _pack(codes, R: tl.constexpr, C: tl.constexpr):
    """int32 codes [R, C] -> uint8 [R, C/2] (low nibble first)."""
    lo, hi = tl.split(tl.reshape(codes, [R, C // 2, 2]))
    return (lo | (hi << 4)).to(tl.uint8)


@triton.jit
def _e2m1x2_f16(packed):
    """uint8 packed FP4 -> (low-nibble values, high-nibble values) as fp16, unscaled, exact.

    PTX on packed words (sm_80+; never used under the interpreter): prmt spreads two bytes
    into the two halves of a register, two shifts and two lop3 place each nibble's sign at bit
    15 and its exponent/mantissa at bits 9-11 (an fp16 2**(e-15) * (1 + m/2), or m * 2**-15),
    and one HMUL2 by 2**14 gives the e2m1 value: about 3 instructions per value instead of ~12
    for the integer/fp32 route of `_e2m1_value`."""
    return tl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 t<5>;
        mov.b32 t4, 0x74007400;
        prmt.b32 t0, $4, 0, 0x4140;
        prmt.b32 t1, $4, 0, 0x4342;
        shl.b32 t2, t0, 9;
        shl.b32 t3, t0, 12;
        lop3.b32 t2, t2, 0x0E000E00, 0, 0xc0;
        lop3.b32 $0, t3, 0x80008000, t2, 0xea;
        mul.f16x2 $0, $0, t4;
        shl.b32 t2, t1, 9;
        shl.b32 t3, t1, 12;
        lop3.b32 t2, t2, 0x0E000E00, 0, 0xc0;
        lop3.b32 $1, t3, 0x80008000, t2, 0xea;
        mul.f16x2 $1, $1, t4;
        shl.b32 t2, t0, 5;
        shl.b32 t3, t0, 8;
        lop3.b32 t2, t2, 0x0E000E00, 0, 0xc0;
        lop3.b32 $2, t3, 0x80008000, t2, 0xea;
        mul.f16x2 $2, $2, t4;
        shl.b32 t2, t1, 5;
        shl.b32 t3, t1, 8;
        lop3.b32 t2, t2, 0x0E000E00, 0, 0xc0;
        lop3.b32 $3, t3, 0x80008000, t2, 0xea;
        mul.f16x2 $3, $3, t4;
        }
        """,
        constraints="=r,=r,=r,=r,r",
        args=[packed],
        dtype=(tl.float16, tl.float16),
        is_pure=True,
        pack=4,
    )


@triton.jit
def _e2m1x2_f16_div64(packed):
    """As `_e2m1x2_f16`, but each value comes out divided by 64 (exact in fp16), through the
    hardware e4m3 -> f16x2 conversion (sm_89+): the nibble's sign goes to bit 7 and its
    exponent/mantissa to bits 2-4 of a byte, which as e4m3 reads 2**(e-7) * (1 + m/2) (or
    m * 2**-7): the e2m1 value / 64. About 1.4 instructions per value instead of ~3 (SASS,
    notes/kernels.md); callers fold the 64 into the group scale."""
    return tl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 lo, hi, t;
        .reg .b16 l0, l1, h0, h1;
        shl.b32 t, $4, 4;
        and.b32 t, t, 0x80808080;
        shl.b32 lo, $4, 2;
        and.b32 lo, lo, 0x1C1C1C1C;
        or.b32 lo, lo, t;
        shr.b32 hi, $4, 2;
        and.b32 hi, hi, 0x1C1C1C1C;
        and.b32 t, $4, 0x80808080;
        or.b32 hi, hi, t;
        mov.b32 {l0, l1}, lo;
        mov.b32 {h0, h1}, hi;
        cvt.rn.f16x2.e4m3x2 $0, l0;
        cvt.rn.f16x2.e4m3x2 $1, l1;
        cvt.rn.f16x2.e4m3x2 $2, h0;
        cvt.rn.f16x2.e4m3x2 $3, h1;
        }
        """,
        constraints="=r,=r,=r,=r,r",
        args=[packed],
        dtype=(tl.float16, tl.float16),
        is_pure=True,
        pack=4,
    )


@triton.jit
def _dequant_tile_mma(packed, scales, R: tl.constexpr, C: tl.constexpr, G: tl.constexpr,
                      FMT: tl.constexpr, ASM: tl.constexpr):
    """Packed [R, C/2] + scale bytes [R, C/G] -> values [R, C] ready for tl.dot: fp16 for NVFP4
    (e2m1 x e4m3 is exact in fp16), bf16 for MXFP4 (e8m0 needs bf16's range). ASM uses the PTX
    nibble conversion; otherwise the portable route (interpreter)."""
    if ASM:
        if FMT == "nvfp4":
            lo, hi = _e2m1x2_f16_div64(packed)
            vals = tl.reshape(tl.interleave(lo, hi), [R, C // G, G])
            # e4m3 scale x 64 <= 28672: exact in fp16, and so is the product (<= 6 bits).
            sc = scales.to(tl.float8e4nv, bitcast=True).to(tl.float16) * 64.0
            return tl.reshape(vals * sc[:, :, None], [R, C])
        else:
            lo, hi = _e2m1x2_f16(packed)
            vals = tl.reshape(tl.interleave(lo, hi), [R, C // G, G])
            sc = _scale_value(scales, FMT).to(tl.bfloat16)
            return tl.reshape(vals.to(tl.bfloat16) * sc[:, :, None], [R, C])
    else:
        x = _dequant_tile(packed, scales, R, C, G, FMT)
        if FMT == "nvfp4":
            return x.to(tl.float16)
        else:
            return x.to(tl.bfloat16)


@triton.jit
def _dequant_tile(
    packed, scales, R: tl.constexpr, C: tl.constexpr, G: tl.constexpr, FMT: tl.constexpr
):
    """Packed [R, C/2] + scales [R, C/G] -> fp32 values [R, C]."""
    vals = tl.reshape(_e2m1_value(_unpack(packed)), [R, C // G, G])
    sc = _scale_value(scales, FMT)
    return tl.reshape(vals * sc[:, :, None], [R, C])


@triton.jit
def _load_fp4(p_base, s_base, rows, cols, stride_p, stride_s, G: tl.constexpr,
              FMT: tl.constexpr, mask):
    """Load-and-decode FP4 values [R, C] (fp32) addressed per element: each byte and scale is
    fetched once per element that uses it (the repeats hit L1), which avoids the layout
    shuffles of unpack/reshape in the inner loops."""
    byte = tl.load(p_base + rows[:, None] * stride_p + (cols[None, :] // 2), mask=mask, other=0)
    code = (byte.to(tl.int32) >> ((cols[None, :] & 1) * 4)) & 0xF
    sc = tl.load(s_base + rows[:, None] * stride_s + (cols[None, :] // G), mask=mask, other=0)
    return _e2m1_value(code) * _scale_value(sc, FMT)


# Batch-dependent ints/strides unspecialised: one compiled variant per engine, not per batch.
@triton.jit(do_not_specialize=["R", "C", "stride_dp", "stride_sp", "stride_fp", "stride_op"])
def _dequantize_kernel(
    data_ptr, scale_ptr, fac_ptr, out_ptr,
    R, C,
    stride_dp, stride_dr, stride_sp, stride_sr, stride_fp, stride_op, stride_or,
    G: tl.constexpr, FMT: tl.constexpr, TO_FP8: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Decode packed FP4 [P, R, C/2] + scales to out [P, R, C]: bf16 (exact), or e4m3 divided
    by a per-row power-of-two factor fac [P, R] (TO_FP8). Grid (cdiv(R, BLOCK_R), P,
    cdiv(C, BLOCK_C))."""
    pid_p = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    x = _load_fp4(data_ptr + pid_p * stride_dp, scale_ptr + pid_p * stride_sp, rows, cols,
                  stride_dr, stride_sr, G, FMT, mask)
    if TO_FP8:
        fac = tl.load(fac_ptr + pid_p * stride_fp + rows, mask=rows < R, other=1.0)
        y = (x / fac[:, None]).to(tl.float8e4nv)
    else:
        y = x.to(tl.bfloat16)
    tl.store(out_ptr + pid_p * stride_op + rows[:, None] * stride_or + cols[None, :], y,
             mask=mask)


# Batch-dependent ints/strides unspecialised: one compiled variant per engine, not per batch.
@triton.jit(do_not_specialize=["R", "C", "stride_xp", "stride_xr", "stride_dp", "stride_sp"])
def _quantize_kernel(
    x_ptr,
    data_ptr,
    scale_ptr,
    R,
    C,
    stride_xp,
    stride_xr,
    stride_xc,
    stride_dp,
    stride_dr,
    stride_sp,
    stride_sr,
    G: tl.constexpr,
    FMT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Quantise x[p, r, c] along c. Grid: (cdiv(R, BLOCK_R), P, cdiv(C_padded, BLOCK_C)).
    Columns past C (up to the padded length the output holds) are zeros."""
    pid_r = tl.program_id(0)
    pid_p = tl.program_id(1).to(tl.int64)
    pid_c = tl.program_id(2)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    x = tl.load(
        x_ptr + pid_p * stride_xp + rows[:, None] * stride_xr + cols[None, :] * stride_xc,
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    xg = tl.reshape(x, [BLOCK_R, BLOCK_C // G, G])
    amax = tl.max(tl.abs(xg), axis=2)
    if FMT == "nvfp4":
        scale = _round_e4m3(amax / 6.0)
        stored = scale.to(tl.float8e4nv)
    else:
        e = _e8m0_ceil(amax / 6.0)
        scale = _e8m0_value(e)
        stored = e.to(tl.uint8)
    safe = tl.where(scale > 0, scale, 1.0)
    y = tl.where(scale[:, :, None] > 0, tl.div_rn(xg, safe[:, :, None]), 0.0)
    packed = _pack(tl.reshape(_e2m1_code(y), [BLOCK_R, BLOCK_C]), BLOCK_R, BLOCK_C)
    pcols = pid_c * (BLOCK_C // 2) + tl.arange(0, BLOCK_C // 2)
    prow = rows[:, None] < R
    tl.store(
        data_ptr + pid_p * stride_dp + rows[:, None] * stride_dr + pcols[None, :], packed, mask=prow
    )
    scols = pid_c * (BLOCK_C // G) + tl.arange(0, BLOCK_C // G)
    tl.store(
        scale_ptr + pid_p * stride_sp + rows[:, None] * stride_sr + scols[None, :],
        stored,
        mask=prow,
    )
