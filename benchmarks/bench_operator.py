"""ThriftAttention operator on one GPU: correctness checks, prefill and decode timings, error.

    python benchmarks/bench_operator.py --out bench_out [--quick]

Sections (all by default): ``check`` (kernels vs the PyTorch reference at 4K-128K on fresh random
inputs, outputs poisoned with NaN first), ``prefill`` (causal, B=1, Hq=32, Hkv=8, D=128 vs cuDNN
and flash SDPA), ``decode`` (batch 1/16/64 x 8K/32K/128K vs the same kernel at budget 1, i.e. an
fp16 split-KV Triton decode over the same layout), ``error`` (operator error vs fp16 on random and
needle inputs). Writes ``operator.json`` and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

from thrift_vllm.ops.attention import (
    decode_split_plan,
    quantize_operands,
    thrift_attention_triton,
)
from thrift_vllm.ops.select import select_blocks_triton
from thrift_vllm.reference import thrift_attention_reference
from thrift_vllm.selection import BlockGrid, budget_to_k, select_blocks_reference

DT = torch.bfloat16
ROWS: list[dict] = []


def bench(fn, reps: int = 20, warmup: int = 1) -> float:
    """Median milliseconds over `reps` calls after `warmup` calls, CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def rand(B, H, S, D, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(B, H, S, D, device="cuda", dtype=DT, generator=g)


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item(), (a - b).abs().max().item()


def kw(f, fmt="nvfp4", math_mode="bf16"):
    return dict(causal=True, fp16_budget=f, selection="block_mean", quant_format=fmt,
                block_size=64, sm_scale=None, bulk_math=math_mode)


def check_native(quick: bool):
    """MXFP4 through tl.dot_scaled compiled for the GPU at hand (on sm90 Triton decomposes it to
    bf16 MMAs): proves the packed operand and scale layouts on real compiled code."""
    for B, Hq, Hkv, Sq, Skv in ((1, 8, 2, 4096, 4096), (2, 8, 1, 1, 32768),
                                (1, 8, 2, 256, 32768)):
        for f in (0.0, 0.05):
            q, k, v = rand(B, Hq, Sq, 128, 21), rand(B, Hkv, Skv, 128, 22), rand(B, Hkv, Skv,
                                                                                128, 23)
            sel = select_blocks_reference(q, k, fp16_budget=f, selection="block_mean",
                                          block_size=64, causal=True)
            out = torch.full_like(q, float("nan"))
            try:
                thrift_attention_triton(q, k, v, **kw(f, "mxfp4", "native"), sel=sel, out=out)
                ref = thrift_attention_reference(q, k, v, sel, causal=True, quant_format="mxfp4",
                                                 chunk_rows=64)
                e, m = rel(out, ref)
                ok = not torch.isnan(out).any().item() and e < 1e-2
                ROWS.append(dict(section="check", B=B, Hq=Hq, Hkv=Hkv, Sq=Sq, Skv=Skv,
                                 fmt="mxfp4-native", budget=f, rel_l2=e, max_abs=m, ok=ok))
            except Exception as exc:
                cause = exc
                while cause.__cause__ is not None:
                    cause = cause.__cause__
                ROWS.append(dict(section="check", B=B, Sq=Sq, Skv=Skv, fmt="mxfp4-native",
                                 budget=f, ok=False, error=str(cause)[-300:]))
            print(ROWS[-1], flush=True)


def check_decode(quick: bool):
    """Decode kernel vs the reference (a short version of `check`, for decode-only changes)."""
    for B, Hq, Hkv, Skv in ((2, 8, 1, 32768), (1, 8, 2, 131072), (3, 32, 8, 5000)):
        for fmt in ("nvfp4", "mxfp4"):
            for f in (0.0, 0.05):
                q, k, v = rand(B, Hq, 1, 128, 31), rand(B, Hkv, Skv, 128, 32), rand(B, Hkv, Skv,
                                                                                   128, 33)
                sel = select_blocks_reference(q, k, fp16_budget=f, selection="block_mean",
                                              block_size=64, causal=True)
                out = torch.full_like(q, float("nan"))
                thrift_attention_triton(q, k, v, **kw(f, fmt), sel=sel, out=out)
                ref = thrift_attention_reference(q, k, v, sel, causal=True, quant_format=fmt)
                e, m = rel(out, ref)
                ok = not torch.isnan(out).any().item() and e < 1e-2
                ROWS.append(dict(section="check", B=B, Hq=Hq, Hkv=Hkv, Sq=1, Skv=Skv, fmt=fmt,
                                 budget=f, rel_l2=e, max_abs=m, ok=ok))
                print(f"decode check B{B} {Hq}/{Hkv} Skv{Skv} {fmt} f={f}: rel {e:.2e} "
                      f"{'OK' if ok else 'FAIL'}", flush=True)


def check(quick: bool):
    cases = [(1, 8, 2, 4096, 4096), (2, 8, 1, 1, 32768), (1, 8, 2, 256, 32768),
             (1, 4, 1, 1000, 16384 + 37)]
    if not quick:
        cases += [(1, 8, 2, 1, 131072), (1, 8, 2, 128, 131072)]
    for B, Hq, Hkv, Sq, Skv in cases:
        for fmt in ("nvfp4", "mxfp4"):
            for f in (0.0, 0.05, 0.25, 1.0):
                q, k, v = rand(B, Hq, Sq, 128, 1), rand(B, Hkv, Skv, 128, 2), rand(B, Hkv, Skv,
                                                                                  128, 3)
                sel_t = select_blocks_triton(q, k, fp16_budget=f, selection="block_mean",
                                             block_size=64, causal=True) if f else None
                sel_r = select_blocks_reference(q, k, fp16_budget=f, selection="block_mean",
                                                block_size=64, causal=True)
                same_sel = bool(sel_t is None or torch.equal(sel_t, sel_r))
                out = torch.full_like(q, float("nan"))
                thrift_attention_triton(q, k, v, **kw(f, fmt), sel=sel_r, out=out)
                ref = thrift_attention_reference(q, k, v, sel_r, causal=True, quant_format=fmt,
                                                 chunk_rows=64)
                e, m = rel(out, ref)
                ok = same_sel and not torch.isnan(out).any().item() and e < 1e-2
                ROWS.append(dict(section="check", B=B, Hq=Hq, Hkv=Hkv, Sq=Sq, Skv=Skv, fmt=fmt,
                                 budget=f, rel_l2=e, max_abs=m, same_selection=same_sel, ok=ok))
                print(f"check B{B} Hq{Hq}/{Hkv} Sq{Sq} Skv{Skv} {fmt} f={f}: rel {e:.2e} "
                      f"max {m:.2e} sel_equal={same_sel} {'OK' if ok else 'FAIL'}", flush=True)
                torch.cuda.empty_cache()


def prefill(quick: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    lengths = (8192, 32768) if quick else (8192, 32768, 131072)
    for S in lengths:
        q, k, v = rand(1, 32, S, 128, 4), rand(1, 8, S, 128, 5), rand(1, 8, S, 128, 6)
        flops = 4 * S * S * 128 * 32 / 2
        reps = 3 if S > 65536 else 15
        ke, ve = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
        for name, be in (("cudnn_sdpa_bf16", SDPBackend.CUDNN_ATTENTION),
                         ("flash_sdpa_bf16", SDPBackend.FLASH_ATTENTION)):
            try:
                with sdpa_kernel(be):
                    fn = lambda: torch.nn.functional.scaled_dot_product_attention(
                        q, ke, ve, is_causal=True)
                    ms = bench(fn, reps)
                ROWS.append(dict(section="prefill", S=S, method=name, ms=ms,
                                 tflops=flops / ms / 1e9))
            except RuntimeError as exc:
                ROWS.append(dict(section="prefill", S=S, method=name, error=str(exc)[:200]))
            print(ROWS[-1], flush=True)
        long = S > 65536  # 128K: whole-call timings at 0 and 5 % only, to fit one lease
        for fmt in ("nvfp4",):
            for f in (0.0, 0.05) if long else (0.0, 0.05, 0.10, 0.25):
                for mm in ("bf16", "fp8"):
                    a = kw(f, fmt, mm)
                    total = bench(lambda: thrift_attention_triton(q, k, v, **a), reps)
                    fp4 = quantize_operands(q, k, v, fmt, 64)
                    t_quant = bench(lambda: quantize_operands(q, k, v, fmt, 64), reps)
                    sel = select_blocks_triton(q, k, fp16_budget=f, selection="block_mean",
                                               block_size=64, causal=True) if f else None
                    t_sel = bench(lambda: select_blocks_triton(
                        q, k, fp16_budget=f, selection="block_mean", block_size=64,
                        causal=True), reps) if f else 0.0
                    if sel is None:
                        sel = torch.empty(1, 32, S // 64, 0, dtype=torch.int32, device="cuda")
                    t_kernel = float("nan") if long else bench(
                        lambda: thrift_attention_triton(q, k, v, **a, sel=sel, fp4=fp4),
                        reps)
                    name = "fp4" if f == 0 else f"thrift_{int(f * 100)}%"
                    ROWS.append(dict(section="prefill", S=S, method=f"{name}_{fmt}_{mm}",
                                     ms=total, tflops=flops / total / 1e9, quant_ms=t_quant,
                                     select_ms=t_sel, kernel_ms=t_kernel,
                                     overhead_share=(t_quant + t_sel) / total))
                    print(ROWS[-1], flush=True)
        torch.cuda.empty_cache()


def tune(quick: bool):
    """Prefill launch configurations at 32K (whole call, thrift 5 %)."""
    S = 32768
    q, k, v = rand(1, 32, S, 128, 4), rand(1, 8, S, 128, 5), rand(1, 8, S, 128, 6)
    flops = 4 * S * S * 128 * 32 / 2
    for mm in ("bf16", "fp8"):
        for nw, ns in ((4, 2), (4, 3)) if quick else ((4, 2), (4, 3), (8, 2), (8, 3)):
            a = kw(0.05, "nvfp4", mm)
            try:
                ms = bench(lambda: thrift_attention_triton(
                    q, k, v, **a, launch={"num_warps": nw, "num_stages": ns}), 5)
                ROWS.append(dict(section="tune", S=S, method=f"thrift_5%_{mm}_w{nw}_s{ns}",
                                 ms=ms, tflops=flops / ms / 1e9))
            except Exception as exc:
                ROWS.append(dict(section="tune", method=f"{mm}_w{nw}_s{ns}",
                                 error=repr(exc)[-300:]))
            print(ROWS[-1], flush=True)


def decode(quick: bool):
    ctxs = (32768,) if quick else (8192, 32768, 131072)
    for S in ctxs:
        for B in (16, 64) if quick else (1, 16, 64):
            if B * S > 64 * 131072 // (4 if quick else 1):
                continue
            q, k, v = rand(B, 32, 1, 128, 7), rand(B, 8, S, 128, 8), rand(B, 8, S, 128, 9)
            fp4 = quantize_operands(q, k, v, "nvfp4", 64)
            grid = BlockGrid(1, S, 64, True)
            for f in (1.0, 0.0, 0.05):
                sel = select_blocks_triton(q, k, fp16_budget=f, selection="block_mean",
                                           block_size=64, causal=True) if f else torch.empty(
                    B, 32, 1, 0, dtype=torch.int32, device="cuda")
                a = kw(f)
                ms = bench(lambda: thrift_attention_triton(
                    q, k, v, **a, sel=sel, fp4=fp4))
                t_sel = bench(lambda: select_blocks_triton(
                    q, k, fp16_budget=f, selection="block_mean", block_size=64,
                    causal=True)) if 0 < f < 1 else 0.0
                kk = budget_to_k(f, grid)
                n_sel_tok = min(kk * 64, S)
                if f == 1.0:
                    bytes_read = B * 8 * S * 128 * 2 * 2
                else:
                    fp4_bytes = B * 8 * S * (64 + 8) * 2  # packed + e4m3 scales, K and V
                    bytes_read = fp4_bytes + B * 8 * n_sel_tok * 128 * 2 * 2
                name = {1.0: "fp16_triton", 0.0: "fp4"}.get(f, f"thrift_{int(f * 100)}%")
                ROWS.append(dict(section="decode", B=B, S=S, method=name, ms=ms,
                                 select_ms=t_sel, gbps=bytes_read / ms / 1e6,
                                 roofline_share=bytes_read / ms / 1e6 / 4300,
                                 splits=decode_split_plan(B, 8, grid.num_kv_blocks)[0]))
                print(ROWS[-1], flush=True)
            torch.cuda.empty_cache()


def error_inputs(S: int, kind: str):
    """q [1, 8, S, 128], k/v [1, 2, S, 128]; "needles" plants 64 keys in the first half that
    copy (x3) later queries of the head group's first head: far-back, high-scoring blocks."""
    q, k, v = rand(1, 8, S, 128, 10), rand(1, 2, S, 128, 11), rand(1, 2, S, 128, 12)
    if kind == "needles":
        g = torch.Generator(device="cuda").manual_seed(13)
        pos = torch.randint(0, S // 2, (64,), device="cuda", generator=g)
        qi = torch.randint(S // 2, S, (64,), device="cuda", generator=g)
        k[:, :, pos] = (q[:, ::4, qi] * 3).to(DT)
    return q, k, v


def error(quick: bool):
    S = 8192 if quick else 32768
    for kind in ("random", "needles"):
        q, k, v = error_inputs(S, kind)
        exact = thrift_attention_triton(q, k, v, **kw(1.0))
        base = None
        for f in (0.0, 0.01, 0.025, 0.05, 0.10, 0.25):
            for sel_name in ("block_mean", "quest", "local"):
                if f == 0.0 and sel_name != "block_mean":
                    continue
                a = kw(f)
                a["selection"] = sel_name
                out = thrift_attention_triton(q, k, v, **a)
                e, m = rel(out, exact)
                if f == 0.0:
                    base = e
                ROWS.append(dict(section="error", inputs=kind, S=S, budget=f, selection=sel_name,
                                 rel_l2=e, max_abs=m, fp4_error_removed=1 - e / base))
                print(ROWS[-1], flush=True)
        # V grouped along tokens (the kernels) vs along head_dim (the alternative), reference.
        if kind == "random":
            Sv = 4096
            qs, ks, vs = q[:, :, -Sv:], k[:, :, :Sv], v[:, :, :Sv]
            ex = thrift_attention_triton(qs.contiguous(), ks.contiguous(), vs.contiguous(),
                                         **kw(1.0))
            empty = torch.empty(1, 8, Sv // 64, 0, dtype=torch.int32, device="cuda")
            for vax in ("tokens", "channels"):
                o = thrift_attention_reference(qs, ks, vs, empty, v_axis=vax, chunk_rows=512)
                ROWS.append(dict(section="v_axis", S=Sv, v_axis=vax, rel_l2=rel(o, ex)[0]))
                print(ROWS[-1], flush=True)


def ablation(quick: bool):
    """force_sink_recent on/off (sink block 0 and the diagonal take the first budget slots)."""
    S = 8192 if quick else 32768
    for kind in ("random", "needles"):
        q, k, v = error_inputs(S, kind)
        exact = thrift_attention_triton(q, k, v, **kw(1.0))
        base = rel(thrift_attention_triton(q, k, v, **kw(0.0)), exact)[0]
        for f in (0.01, 0.05, 0.25):
            for sel_name in ("block_mean", "quest"):
                for force in (False, True):
                    a = kw(f)
                    a.update(selection=sel_name, force_sink_recent=force)
                    e = rel(thrift_attention_triton(q, k, v, **a), exact)[0]
                    ROWS.append(dict(section="ablation", inputs=kind, S=S, budget=f,
                                     selection=sel_name, force_sink_recent=force, rel_l2=e,
                                     fp4_error_removed=1 - e / base))
                    print(ROWS[-1], flush=True)


def table() -> str:
    lines = []
    for r in ROWS:
        if r["section"] == "check" and r.get("fmt") == "mxfp4-native":
            lines.append(f"native  Sq={r['Sq']} Skv={r['Skv']} f={r['budget']} "
                         + (f"rel {r['rel_l2']:.2e} {'OK' if r['ok'] else 'FAIL'}"
                            if "rel_l2" in r else f"ERROR {r.get('error', '')[:200]}"))
        elif r["section"] == "tune" and "ms" in r:
            lines.append(f"tune    S={r['S']} {r['method']:<28} {r['ms']:8.2f} ms "
                         f"{r['tflops']:6.1f} TFLOP/s")
        elif "error" in r:
            lines.append(f"{r['section']}: ERROR {r['error'][:150]}")
        elif r["section"] == "prefill":
            lines.append(f"prefill S={r['S']:>6} {r['method']:<24} {r['ms']:9.2f} ms "
                         f"{r['tflops']:7.1f} TFLOP/s"
                         + (f"  quant+select {100 * r['overhead_share']:.1f}%"
                            if "overhead_share" in r else ""))
        elif r["section"] == "decode":
            lines.append(f"decode  B={r['B']:>2} S={r['S']:>6} {r['method']:<20} "
                         f"{1000 * r['ms']:9.1f} us {r['gbps']:7.0f} GB/s "
                         f"({100 * r['roofline_share']:.0f}% of 4.3 TB/s) select "
                         f"{1000 * r['select_ms']:.0f} us")
        elif r["section"] == "error":
            lines.append(f"error   {r['inputs']:<8} S={r['S']} f={r['budget']:<5} "
                         f"{r['selection']:<10} rel {r['rel_l2']:.4f} "
                         f"removed {100 * r['fp4_error_removed']:.1f}%")
        elif r["section"] == "ablation":
            lines.append(f"ablate  {r['inputs']:<8} f={r['budget']:<5} {r['selection']:<10} "
                         f"force={r['force_sink_recent']!s:<5} rel {r['rel_l2']:.4f} "
                         f"removed {100 * r['fp4_error_removed']:.1f}%")
        elif r["section"] == "v_axis":
            lines.append(f"v_axis  {r['v_axis']:<8} rel {r['rel_l2']:.4f}")
    n_fail = sum(1 for r in ROWS if r["section"] == "check" and not r["ok"])
    n_check = sum(1 for r in ROWS if r["section"] == "check")
    lines.append(f"checks: {n_check - n_fail} passed, {n_fail} failed")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sections", default="check,prefill,decode,error")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
               triton=__import__("triton").__version__)
    for sec in args.sections.split(","):
        try:
            globals()[sec](args.quick)
        except Exception as exc:  # record and continue: one section must not lose the others
            ROWS.append(dict(section=sec, error=repr(exc)[:500]))
            print("SECTION FAILED", sec, repr(exc)[:2000], flush=True)
        with open(os.path.join(args.out, "operator.json"), "w") as fh:
            json.dump(dict(env=env, rows=ROWS, seconds=time.time() - t0), fh, indent=1)
    print(f"\n{env} in {time.time() - t0:.0f}s")
    print(table())
    if not math.isfinite(t0):
        sys.exit(1)


if __name__ == "__main__":
    main()
