"""Decode math "fp16" (Hopper, FP4 as storage): ``kernels/paged_decode_fp16.py`` through
``paged_decode_triton(math="fp16")`` against ``thrift_vllm.paged``'s reference, and that
reference against an independent float64 computation (table-decoded bytes, plain softmax).

Tolerances (relative Frobenius error per sequence).
* Kernel vs reference: both round P to the model dtype (the kernel against its running maximum,
  the reference against the global one) and the output to the model dtype; fp16 2e-3. bf16
  1e-2: besides bf16's 2**-9 rounding, the Triton *interpreter* converts fp32 -> bf16 by
  truncation (half of all values differ from torch's round-to-nearest by an ulp), a bias the
  GPU does not have. Measured: fp16 ~1e-4, bf16 ~6e-3 (interpreter).
* Reference vs float64 (no P rounding there): the P rounding, 2**-11 (fp16) / 2**-8 (bf16)
  relative per weight: 2e-3 / 1e-2, and the reference's fp32 output is compared unrounded.
"""

from __future__ import annotations

import pytest
import torch
from test_paged_kernels import Batch, _rel

from thrift_vllm.kv_layout import KVLayout
from thrift_vllm.ops import paged_attention as ops_pa
from thrift_vllm.ops.kv_write import write_kv_triton
from thrift_vllm.ops.paged_attention import paged_attention_triton, paged_decode_triton
from thrift_vllm.paged import decode_fp16_reference, gather_sequence, paged_attention
from thrift_vllm.selection import BlockGrid, budget_to_k, select_blocks_reference

TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
# (kv_layout, fmt, selection, dtype, D, Hkv, group, page, unit)
CASES = [
    ("auto", "nvfp4", "block_mean", torch.float16, 64, 2, 4, 64, 32),
    ("auto", "mxfp4", "quest", torch.bfloat16, 128, 1, 8, 128, 64),
    ("nvfp4", "nvfp4", "quest", torch.bfloat16, 128, 1, 4, 64, 32),
    ("nvfp4", "mxfp4", "block_mean", torch.float16, 64, 1, 8, 64, 64),
]
SEQ_LENS = (1, 63, 65, 200, 300)  # 300: several pages (and a partial one)
BUDGETS = (0.05, 0.0, 1.0, 0.05, 0.0)
# The default launch swaps A and B; the first two run in the fast test.
VARIANTS = [{"swap": False}, {"units_per_iter": 2},
            {"units_per_iter": 2, "swap": False, "target_programs": 4096,
             "min_tiles_per_split": 1},
            {"block_h": 16, "target_programs": 1}, {},
            {"fp16_operands": True, "units_per_iter": 2}]


def _setup(case, seq_lens, budgets, seed):
    kvl, fmt, sel, dt, D, Hkv, group, P, U = case
    lay = KVLayout(kvl, D, P, U, fmt, sel, dt)
    b = Batch(lay, seq_lens, (1,) * len(seq_lens), Hkv, group, seed=seed)
    write_kv_triton(b.key, b.value, b.cache, b.step_slots, lay)  # the real write path
    ks = [budget_to_k(f, BlockGrid(1, s, U, True)) for f, s in zip(budgets, seq_lens,
                                                                    strict=True)]
    kw = dict(block_table=b.block_table, seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
              num_fp16_blocks=torch.tensor(ks, dtype=torch.int32), scale=D**-0.5)
    return lay, b, kw


def _reference(lay, b, seq_lens, budgets, math="fp16"):
    return paged_attention(lay, lay.views(b.cache), b.query, b.key, b.value,
                           query_start_loc=b.qsl, seq_lens=list(seq_lens),
                           block_table=b.block_table, fp16_budgets=list(budgets),
                           scale=lay.head_size**-0.5, decode_math=math)


def _kernel(lay, b, kw, launch=None, math="fp16"):
    return paged_decode_triton(lay, b.cache, b.query, b.key, b.value, math=math, launch=launch,
                               **kw)


@pytest.mark.parametrize("ci", range(len(CASES)), ids=lambda i: "-".join(map(str, CASES[i][:2])))
def test_fp16_decode_matches_reference(ci):
    lay, b, kw = _setup(CASES[ci], SEQ_LENS, BUDGETS, 500 + ci)
    ref = _reference(lay, b, SEQ_LENS, BUDGETS)
    for launch in VARIANTS[:2]:
        out = _kernel(lay, b, kw, launch)
        for i in range(len(SEQ_LENS)):
            err = _rel(out[i], ref[i])
            assert err < TOL[lay.dtype], (launch, i, SEQ_LENS[i], err)


@pytest.mark.slow
@pytest.mark.parametrize("ci", range(len(CASES)), ids=lambda i: "-".join(map(str, CASES[i][:2])))
def test_fp16_decode_launch_variants(ci):
    """Every compiled variant (units per iteration, swapped operands, block_h, split counts)
    gives the reference's numbers, with an idle row (seq_len 0: zeros) in the batch."""
    seq_lens, budgets = (65, 1, 200, 63), (1.0, 0.05, 0.05, 0.0)
    lay, b, kw = _setup(CASES[ci], seq_lens, budgets, 600 + ci)
    ref = _reference(lay, b, seq_lens, budgets)
    idle = _with_idle_row(b, kw)
    for launch in VARIANTS:
        if launch.get("fp16_operands") and lay.quant_format != "nvfp4":
            with pytest.raises(ValueError, match="fp16_operands"):
                paged_decode_triton(lay, b.cache, *idle[0], math="fp16", launch=launch,
                                    **idle[1])
            continue
        out = paged_decode_triton(lay, b.cache, *idle[0], math="fp16", launch=launch, **idle[1])
        assert torch.equal(out[-1], torch.zeros_like(out[-1])), launch
        for i in range(len(seq_lens)):
            assert _rel(out[i], ref[i]) < TOL[lay.dtype], (launch, i, _rel(out[i], ref[i]))


def _with_idle_row(b, kw):
    """Inputs with one more row of seq_len 0 (an idle CUDA-graph slot, garbage query)."""
    q = torch.cat([b.query, torch.randn_like(b.query[:1])])
    k = torch.cat([b.key, b.key[:1]])
    v = torch.cat([b.value, b.value[:1]])
    kw = dict(kw, block_table=torch.cat([kw["block_table"], kw["block_table"][:1]]),
              seq_lens=torch.cat([kw["seq_lens"], torch.zeros(1, dtype=torch.int32)]),
              num_fp16_blocks=torch.cat([kw["num_fp16_blocks"], torch.ones(1, dtype=torch.int32)]))
    return (q, k, v), kw


@pytest.mark.parametrize("ci", [0, 2], ids=["auto", "nvfp4"])
def test_fp16_decode_idle_rows(ci):
    seq_lens, budgets = (65, 1), (0.05, 1.0)
    lay, b, kw = _setup(CASES[ci], seq_lens, budgets, 650 + ci)
    ref = _reference(lay, b, seq_lens, budgets)
    (q, k, v), kw2 = _with_idle_row(b, kw)
    out = paged_decode_triton(lay, b.cache, q, k, v, math="fp16", **kw2)
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))
    for i in range(len(seq_lens)):
        assert _rel(out[i], ref[i]) < TOL[lay.dtype]


# --- the reference against an independent float64 computation ------------------------------

E2M1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6],
                    dtype=torch.float64)


def _e4m3_table() -> torch.Tensor:
    """The 256 e4m3fn byte values in float64 from the bit fields (0x7f / 0xff: NaN)."""
    out = []
    for byte in range(256):
        s, e, m = byte >> 7, (byte >> 3) & 15, byte & 7
        v = (m / 8) * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0**(e - 7)
        out.append(float("nan") if (e == 15 and m == 7) else (-v if s else v))
    return torch.tensor(out, dtype=torch.float64)


def _decode64(data: torch.Tensor, scales: torch.Tensor, fmt: str) -> torch.Tensor:
    """uint8 [..., m/2] codes (even element in the low nibble) + [..., m/g] scale bytes ->
    float64 [..., m] by table lookup."""
    codes = torch.stack([data & 15, data >> 4], dim=-1).flatten(-2).long()
    vals = E2M1[codes]
    sc = _e4m3_table()[scales.long()] if fmt == "nvfp4" else 2.0 ** (scales.double() - 127)
    g = vals.shape[-1] // sc.shape[-1]
    return (vals.unflatten(-1, (-1, g)) * sc[..., None]).flatten(-2)


def _independent(lay, b, i, seq_len, budget):
    """float64 decode attention of sequence i from the raw page bytes (``[Hq, D]``)."""
    views, P, U = lay.views(b.cache), lay.page_size, lay.unit
    pages = b.block_table[i, :-(-seq_len // P)].long()
    k = _decode64(views.k4[pages], views.k4_scales[pages], lay.quant_format)  # [n, H, P, D]
    k = k.transpose(0, 1).flatten(1, 2)[:, :seq_len]
    if lay.kv_layout == "auto":
        v = _decode64(views.v4[pages], views.v4_scales[pages], lay.quant_format)  # [n,H,D,P]
        v = v.permute(1, 0, 3, 2).flatten(1, 2)[:, :seq_len]
    else:
        v = _decode64(views.v4[pages], views.v4_scales[pages], lay.quant_format)
        v = v.transpose(0, 1).flatten(1, 2)[:, :seq_len]
    q = b.query[b.qsl[i]].double()
    Hkv, group = k.shape[0], q.shape[0] // k.shape[0]
    if lay.kv_layout == "nvfp4":
        k[:, -1], v[:, -1] = b.key[b.qsl[i]].double(), b.value[b.qsl[i]].double()
    else:
        kv = gather_sequence(lay, views, pages, seq_len)
        sel = select_blocks_reference(b.query[b.qsl[i]][None, :, None], kv["k_hi"][None],
                                      fp16_budget=budget, selection=lay.selection,
                                      block_size=U, causal=True)
        for h in range(Hkv):
            for j in sel[0, h * group, 0].tolist():
                k[h, j * U:(j + 1) * U] = kv["k_hi"][h, j * U:(j + 1) * U].double()
                v[h, j * U:(j + 1) * U] = kv["v_hi"][h, j * U:(j + 1) * U].double()
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    w = torch.softmax(torch.einsum("hd,hsd->hs", q, k) * lay.head_size**-0.5, dim=-1)
    return torch.einsum("hs,hsd->hd", w, v)


@pytest.mark.parametrize("ci", range(len(CASES)), ids=lambda i: "-".join(map(str, CASES[i][:2])))
def test_fp16_reference_vs_float64(ci):
    lay, b, _ = _setup(CASES[ci], SEQ_LENS, BUDGETS, 700 + ci)
    views = lay.views(b.cache)
    for i, (s, f) in enumerate(zip(SEQ_LENS, BUDGETS, strict=True)):
        kv = gather_sequence(lay, views, b.block_table[i, :-(-s // lay.page_size)].long(), s)
        q0 = b.qsl[i]
        got = decode_fp16_reference(lay, kv, b.query[q0], b.key[q0], b.value[q0], f,
                                    lay.head_size**-0.5)
        want = _independent(lay, b, i, s, f)
        assert _rel(got, want) < TOL[lay.dtype], (i, s, f, _rel(got, want))


@pytest.mark.parametrize("ci", [2, 3], ids=["nvfp4-nvfp4", "nvfp4-mxfp4"])
def test_fp16_nvfp4_layout_ignores_budget(ci):
    """nvfp4 layout: the budget changes nothing (bitwise), and no selection is launched."""
    seq_lens = (200, 65, 1)
    outs = []
    for budgets in ((0.0, 0.0, 0.0), (0.05, 0.5, 1.0), (1.0, 1.0, 1.0)):
        lay, b, kw = _setup(CASES[ci], seq_lens, budgets, 800 + ci)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ops_pa, "paged_select_triton", _no_selection)
            outs.append(_kernel(lay, b, kw))
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    refs = [_reference(lay, b, seq_lens, bu) for bu in ((0.0,) * 3, (1.0,) * 3)]
    assert torch.equal(refs[0], refs[1])


def _no_selection(*a, **k):
    raise AssertionError("the nvfp4 layout's fp16 decode must not run the selection")


@pytest.mark.parametrize("ci", [0, 2], ids=["auto", "nvfp4"])
def test_fp16_math_closer_to_exact_than_fp4(ci):
    """On random data at 5 % the Hopper math is nearer exact attention on the model-dtype K/V
    than the FP4 semantics (no q / P quantisation error), and the two differ."""
    seq_lens, budgets = (200, 300), (0.05, 0.05)
    lay, b, kw = _setup(CASES[ci], seq_lens, budgets, 900 + ci)
    fp16 = _kernel(lay, b, kw)
    fp4 = _kernel(lay, b, kw, math="fp4")
    for i in range(len(seq_lens)):
        k, v = (t.double().transpose(0, 1) for t in b.full_kv(i))
        q = b.query[b.qsl[i]].double()
        group = q.shape[0] // k.shape[0]
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        w = torch.softmax(torch.einsum("hd,hsd->hs", q, k) * lay.head_size**-0.5, dim=-1)
        exact = torch.einsum("hs,hsd->hd", w, v)
        e16, e4 = _rel(fp16[i], exact), _rel(fp4[i], exact)
        assert e16 < 0.8 * e4, (i, e16, e4)


def test_decode_math_validation():
    lay, b, kw = _setup(CASES[2], (65,), (0.05,), 1)
    with pytest.raises(ValueError, match="'fp8'"):
        _kernel(lay, b, kw, math="fp8")
    with pytest.raises(ValueError, match="native"):
        paged_decode_triton(lay, b.cache, b.query, b.key, b.value, math="fp16", native=True,
                            **kw)
    with pytest.raises(ValueError, match="units_per_iter"):
        _kernel(lay, b, kw, launch={"units_per_iter": 3})
    with pytest.raises(ValueError, match="'bogus'"):
        _reference(lay, b, (65,), (0.05,), math="bogus")
    with pytest.raises(ValueError, match="'bogus'"):
        paged_attention_triton(lay, b.cache, b.query, b.key, b.value, query_start_loc=b.qsl,
                               seq_lens=[65], block_table=b.block_table, fp16_budgets=[0.05],
                               scale=0.1, decode_math="bogus")


def test_paged_attention_triton_decode_math():
    """The whole-batch op routes one-query rows through the fp16 decode (= reference)."""
    seq_lens, budgets = (65, 200), (0.05, 0.0)
    lay, b, _ = _setup(CASES[0], seq_lens, budgets, 11)
    ref = _reference(lay, b, seq_lens, budgets)
    out = paged_attention_triton(lay, b.cache, b.query, b.key, b.value, query_start_loc=b.qsl,
                                 seq_lens=list(seq_lens), block_table=b.block_table,
                                 fp16_budgets=list(budgets), scale=lay.head_size**-0.5,
                                 decode_math="fp16")
    for i in range(len(seq_lens)):
        assert _rel(out[i], ref[i]) < TOL[lay.dtype]


@pytest.mark.slow
def test_fp16_decode_compiles_for_hopper():
    """The fp16 decode's most involved variant (2 units per step, swapped operands: wgmma,
    the pair-load selected skip that an earlier version crashed Triton's pipeliner with)
    compiles for sm_90 in both layouts (AOT, no GPU, a subprocess without the interpreter)."""
    import json
    import os
    import subprocess
    import sys

    from thrift_vllm.ops import sass

    problem = sass.toolchain_problem()
    if problem:
        pytest.skip(problem)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "thrift_vllm.ops.aot_paged", "--arch", "90", "--dtype", "bf16",
           "--decode-math", "fp16", "--layouts", "nvfp4", "auto", "--loops",
           "--launch", json.dumps({"units_per_iter": 2, "swap": True})]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    dec = [r for r in rows if r["kernel"] == "_paged_decode_fp16_kernel"]
    assert len(dec) == 2 and all(r["ok"] for r in rows), res.stdout[-2000:] + res.stderr[-2000:]
    assert all(r["loops"] and "HGMMA" in r["loop0_ops"] for r in dec), dec  # wgmma, swapped


@pytest.mark.parametrize("kvl", ["auto", "nvfp4"])
def test_fp16_decode_tiles_across_pages(kvl):
    """page = unit (the benchmark's shape) with 2 units per step: a tile spans two pages, so
    its rows / V columns / scale columns each look up their own page (SAME_PAGE False)."""
    case = (kvl, "nvfp4", "block_mean", torch.float16, 64, 1, 4, 32, 32)
    seq_lens, budgets = (200, 96, 33), (0.05, 0.0, 1.0)
    lay, b, kw = _setup(case, seq_lens, budgets, 950)
    ref = _reference(lay, b, seq_lens, budgets)
    for launch in ({"units_per_iter": 2}, {"units_per_iter": 2, "swap": False,
                                           "min_tiles_per_split": 1, "target_programs": 64}):
        out = _kernel(lay, b, kw, launch)
        for i in range(len(seq_lens)):
            assert _rel(out[i], ref[i]) < TOL[lay.dtype], (launch, i, _rel(out[i], ref[i]))
