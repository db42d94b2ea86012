"""Paged FP4 KV cache on one GPU (H200): correctness check, then paged decode timings.

    python benchmarks/bench_paged.py --out bench_paged.json [--quick] [--skip-check]
        [--sections decode,prefill] [--chunk 2048] [--prefill-contexts 8192,32768,131072]

Sections:
* ``check``: the Triton write (bit-exact but k_mean) and paged attention (decode and mixed
  prefill batches) against ``thrift_vllm.paged`` on small shapes, fresh random data, shuffled
  block tables, both layouts.
* ``decode``: batch 1-64 x context 8K-128K, Hq=32, Hkv=8, D=128, bf16, page 64, unit 64, budget
  5 %: the auto and nvfp4 layouts (selection from stored summaries + FP4 decode + reduce), and an
  fp16 paged baseline = the same paged kernel on the auto layout with every unit selected (reads
  only the model-dtype k_hi/v_hi pages through the block table: a split-KV GQA fp16 decode).
  Also the decode step's KV write (B tokens). Block tables are shuffled; pages hold random
  finite data (timing does not depend on values).
* ``probe``: the paged decode kernel alone (selection precomputed) under launch variants
  (programs per SM via the split target, register cap) at 16 x 32K, 64 x 128K and 1 x 128K for
  both layouts: the data behind ``PAGED_DECODE_LAUNCH``.
* ``prefill``: one 2K-query chunk at the end of an 8K-128K context (chunked prefill): the
  chunk's KV write and the attention over the pages, the same three layouts.

Robustness: every row is appended to the JSON as soon as it is measured; an OOM or error
skips the row (recorded); a wall-clock budget (--budget-s) skips the remaining rows; the table
is printed last.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback

import torch
from bench_operator import bench as cuda_median_ms  # benchmarks/ is sys.path[0]
from bench_paged_check import check

from thrift_vllm.kv_layout import KVLayout
from thrift_vllm.ops.kv_write import write_kv_triton
from thrift_vllm.ops.paged_attention import (
    PAGED_DECODE_LAUNCH,
    paged_attention_triton,
    paged_decode_triton,
    paged_select_triton,
)
from thrift_vllm.selection import BlockGrid, budget_to_k

ROWS: list[dict] = []
T0 = time.time()
DEV = "cuda"  # "cpu" only for a dry run of the script under TRITON_INTERPRET=1 (--dry-run)


def bench(fn, reps: int = 20) -> float:
    """Median milliseconds over ``reps`` calls after two warm-ups (CUDA events; one timed
    call on the CPU dry run)."""
    if DEV != "cuda":
        fn()
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return cuda_median_ms(fn, reps, warmup=2)


def bench_graph(fn, reps: int = 20) -> float:
    """Milliseconds per call of ``fn`` replayed from a CUDA graph (as the engine runs decode):
    Python and Triton launch costs (~20 us a kernel) stay out, which matters for small batches
    where the kernels take tens of microseconds. Falls back to ``bench`` off CUDA."""
    if DEV != "cuda":
        return bench(fn, reps)
    fn()
    fn()  # compiled, autotuned, allocator warmed
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps


def emit(out: str, row: dict) -> None:
    row["t_s"] = round(time.time() - T0, 1)
    ROWS.append(row)
    print(json.dumps(row), flush=True)
    with open(out, "w") as f:
        name = torch.cuda.get_device_name() if DEV == "cuda" else DEV
        json.dump({"device": name, "torch": torch.__version__,
                   "rows": ROWS}, f, indent=1)


def shuffled_table(B: int, pages: int, g: torch.Generator, spare: int = 3):
    nb = B * pages + spare
    perm = torch.randperm(nb, generator=g, device=DEV).to(torch.int32)
    return perm[: B * pages].view(B, pages).contiguous(), nb


# --- decode timings ------------------------------------------------------------------------------

def fill_random(lay: KVLayout, cache: torch.Tensor, g: torch.Generator) -> None:
    """Random finite page contents: FP4 codes, valid scale bytes, normal hi copies/summaries."""
    v = lay.views(cache)
    for t in (v.k4, v.v4):
        t.random_(0, 256, generator=g)
    lo, hi = (0x30, 0x40) if lay.quant_format == "nvfp4" else (120, 128)
    for t in (v.k4_scales, v.v4_scales):
        t.random_(lo, hi, generator=g)
    for t in (v.k_hi, v.v_hi, v.k_mean, v.k_min, v.k_max):
        if t is not None:
            t.normal_(generator=g)
    if v.k_min is not None:  # keep min <= max
        v.k_min.copy_(torch.minimum(v.k_min, v.k_max))


def decode_inputs(kvl: str, B: int, ctx: int, a, full: bool = False):
    """One decode step's inputs at ``B x ctx`` (Hq 32, Hkv 8, D 128, bf16, page = unit = 64;
    smaller heads on the CPU dry run): layout, a shuffled-table cache of random pages, q and
    the step's k/v, and the launch kwargs with k = the budget's units (every unit: ``full``)."""
    Hq, Hkv, D, P, U = (32, 8, 128, 64, 64) if DEV == "cuda" else (8, 2, 128, 64, 64)
    dt = torch.bfloat16
    lay = KVLayout(kvl, D, P, U, a.fmt, a.selection, dt)
    g = torch.Generator(device=DEV).manual_seed(B * 7 + ctx)
    bt, nb = shuffled_table(B, -(-ctx // P), g)
    cache = lay.allocate(nb, Hkv, device=DEV)
    fill_random(lay, cache, g)
    q = torch.randn(B, Hq, D, device=DEV, dtype=dt, generator=g)
    kn = torch.randn(B, Hkv, D, device=DEV, dtype=dt, generator=g)
    vn = torch.randn(B, Hkv, D, device=DEV, dtype=dt, generator=g)
    seq = torch.full((B,), ctx, dtype=torch.int32, device=DEV)
    k = -(-ctx // U) if full else budget_to_k(a.budget, BlockGrid(1, ctx, U, True))
    ks = torch.full((B,), k, dtype=torch.int32, device=DEV)
    kw = dict(block_table=bt, seq_lens=seq, num_fp16_blocks=ks, scale=D**-0.5)
    return lay, cache, q, kn, vn, k, kw


def decode_row(out: str, kvl: str, B: int, ctx: int, a) -> None:
    base = kvl == "fp16"
    lay, cache, q, kn, vn, k, kw = decode_inputs("auto" if base else kvl, B, ctx, a, full=base)
    Hkv, D, P, U = cache.shape[1], lay.head_size, lay.page_size, lay.unit
    bt, seq, ks = kw["block_table"], kw["seq_lens"], kw["num_fp16_blocks"]
    n_units = -(-ctx // U)
    row = dict(section="decode", layout=kvl, batch=B, context=ctx, fmt=a.fmt,
               selection=a.selection, budget=1.0 if base else a.budget,
               bytes_per_token_layer=(Hkv * 2 * D * 2) if base else lay.bytes_per_token(Hkv))
    slots = (bt[:, (ctx - 1) // P].long() * P + (ctx - 1) % P).contiguous()
    if base:  # every unit selected, precomputed: only the fp16 loop runs
        sel = torch.arange(n_units, dtype=torch.int32, device=DEV).expand(B, Hkv, n_units)
        sel = sel.contiguous()
        row["decode_ms"] = bench(lambda: paged_decode_triton(lay, cache, q, kn, vn, sel=sel, **kw))
        row["total_ms"] = row["decode_ms"]
    else:
        row["write_ms"] = bench(lambda: write_kv_triton(kn, vn, cache, slots, lay))
        sel = paged_select_triton(lay, cache, q, block_table=bt, seq_lens=seq,
                                  num_fp16_blocks=ks, max_num_fp16_blocks=k)
        row["select_ms"] = bench(lambda: paged_select_triton(
            lay, cache, q, block_table=bt, seq_lens=seq, num_fp16_blocks=ks,
            max_num_fp16_blocks=k))
        row["decode_ms"] = bench(lambda: paged_decode_triton(lay, cache, q, kn, vn, sel=sel, **kw))
        row["total_ms"] = bench(lambda: paged_decode_triton(lay, cache, q, kn, vn,
                                                            max_num_fp16_blocks=k, **kw))
    kv_bytes = B * ctx * row["bytes_per_token_layer"]
    row["kv_gb"] = round(kv_bytes / 1e9, 3)
    row["gb_per_s"] = round(kv_bytes / 1e9 / (row["decode_ms"] / 1e3), 1)
    emit(out, row)


PROBE_CASES = ((16, 8192), (16, 32768), (64, 131072), (1, 131072), (1, 32768))
# 8 warps and prefetching lost everywhere in the first probe (BENCHMARKS.md); stages do not
# matter (the loop's loads are indirect, through the block table). 2 warps: fewer instructions
# per KV value in the sm90 SASS, but half the warps per SM; measured no better overall
# (BENCHMARKS.md "Third H200 pass", call 8).
PROBE_LAUNCH = [dict(target_programs=t, num_warps=4, num_stages=2, maxnreg=r,
                     min_tiles_per_split=1)
                for r in (None, 128, 168) for t in (264, 528, 1056, 2112)]
PROBE_LAUNCH += [dict(target_programs=t, num_warps=2, num_stages=2, maxnreg=r,
                      min_tiles_per_split=1)
                 for r in (None, 168) for t in (2112, 4224)]
# Small batches: the 2112-program target with a floor on the units per program.
PROBE_LAUNCH += [dict(target_programs=2112, num_warps=4, num_stages=2, maxnreg=128,
                      min_tiles_per_split=m) for m in (4, 8, 16)]


def probe_rows(out: str, kvl: str, B: int, ctx: int, a) -> None:
    """Decode kernel time (selection precomputed once) per launch variant, one row each."""
    lay, cache, q, kn, vn, k, kw = decode_inputs(kvl, B, ctx, a)
    sel = paged_select_triton(lay, cache, q, block_table=kw["block_table"],
                              seq_lens=kw["seq_lens"], num_fp16_blocks=kw["num_fp16_blocks"],
                              max_num_fp16_blocks=k)
    ref = paged_decode_triton(lay, cache, q, kn, vn, sel=sel, **kw)
    for launch in PROBE_LAUNCH if DEV == "cuda" else PROBE_LAUNCH[:2]:
        row = dict(section="probe", layout=kvl, batch=B, context=ctx, **launch)
        try:
            got = paged_decode_triton(lay, cache, q, kn, vn, sel=sel, launch=launch, **kw)
            row["max_abs_diff"] = float((got.float() - ref.float()).abs().max())
            row["decode_ms"] = bench_graph(lambda launch=launch: paged_decode_triton(
                lay, cache, q, kn, vn, sel=sel, launch=launch, **kw))
        except Exception as e:  # e.g. out of shared memory / registers for a variant
            row.update(skipped=True, reason=f"{type(e).__name__}: {e}"[:200])
        emit(out, row)


def prefill_row(out: str, kvl: str, ctx: int, chunk: int, a, bulk_math: str = "bf16") -> None:
    """One sequence's prefill chunk of ``chunk`` queries at the end of a ``ctx``-token context
    (chunked prefill as vLLM schedules it): the chunk's KV write, then attention over the pages
    (``paged_attention_triton``: gathered pages + the prefill kernel). "fp16" = the auto layout
    at budget 1 (every unit in FP16)."""
    Hq, Hkv, D, P, U = (32, 8, 128, 64, 64) if DEV == "cuda" else (8, 2, 128, 64, 64)
    dt = torch.bfloat16
    base = kvl == "fp16"
    lay = KVLayout("auto" if base else kvl, D, P, U, a.fmt, a.selection, dt)
    g = torch.Generator(device=DEV).manual_seed(ctx + chunk)
    bt, nb = shuffled_table(1, -(-ctx // P), g)
    cache = lay.allocate(nb, Hkv, device=DEV)
    fill_random(lay, cache, g)
    q = torch.randn(chunk, Hq, D, device=DEV, dtype=dt, generator=g)
    kn = torch.randn(chunk, Hkv, D, device=DEV, dtype=dt, generator=g)
    vn = torch.randn(chunk, Hkv, D, device=DEV, dtype=dt, generator=g)
    pos = torch.arange(ctx - chunk, ctx, device=DEV)
    slots = (bt[0, pos // P].long() * P + pos % P).contiguous()
    budget = 1.0 if base else a.budget
    row = dict(section="prefill", layout=kvl, context=ctx, chunk=chunk, fmt=a.fmt,
               selection=a.selection, budget=budget, bulk_math=bulk_math)
    row["write_ms"] = bench(lambda: write_kv_triton(kn, vn, cache, slots, lay), reps=5)
    row["attn_ms"] = bench(lambda: paged_attention_triton(
        lay, cache, q, kn, vn, query_start_loc=[0, chunk], seq_lens=[ctx], block_table=bt,
        fp16_budgets=[budget], scale=D**-0.5, bulk_math=bulk_math), reps=5)
    row["total_ms"] = row["write_ms"] + row["attn_ms"]
    # causal FLOPs of the chunk against its context (for TFLOP/s; the same for every layout)
    row["tflops"] = round(4 * Hq * D * chunk * (ctx - chunk / 2) / (row["attn_ms"] / 1e3) / 1e12,
                          1)
    emit(out, row)


def best_launch() -> dict | None:
    """The launch with the smallest geometric-mean decode time over every probed case (only
    launches measured in all of them)."""
    prb = [r for r in ROWS if r.get("section") == "probe" and "decode_ms" in r]
    cases = {(r["layout"], r["batch"], r["context"]) for r in prb}
    scores = {}
    for launch in PROBE_LAUNCH:
        ms = [r["decode_ms"] for r in prb if all(r[x] == v for x, v in launch.items())]
        if cases and len(ms) == len(cases):
            scores[tuple(launch.items())] = sum(math.log(m) for m in ms)
    return dict(min(scores, key=scores.get)) if scores else None


def table() -> str:
    dec = [r for r in ROWS if r.get("section") == "decode" and "total_ms" in r]
    lines = ["", "paged decode (ms; total = select + decode + reduce), Hq=32 Hkv=8 D=128 bf16",
             f"{'B':>4} {'ctx':>7} {'fp16':>8} {'auto':>8} {'nvfp4':>8} {'x fp16':>7} "
             f"{'nvfp4 dec':>9} {'sel':>6} {'write':>6}"] if dec else []
    keys = sorted({(r["batch"], r["context"]) for r in dec})
    for B, ctx in keys:
        get = {r["layout"]: r for r in dec if (r["batch"], r["context"]) == (B, ctx)}

        def ms(name, field="total_ms", get=get):
            return f"{get[name][field]:8.3f}" if name in get and field in get[name] else " " * 8
        speed = ""
        if "fp16" in get and "nvfp4" in get:
            speed = f"{get['fp16']['total_ms'] / get['nvfp4']['total_ms']:7.2f}"
        n = get.get("nvfp4", {})
        lines.append(f"{B:>4} {ctx:>7} {ms('fp16')} {ms('auto')} {ms('nvfp4')} {speed:>7} "
                     f"{n.get('decode_ms', math.nan):9.3f} {n.get('select_ms', math.nan):6.3f} "
                     f"{n.get('write_ms', math.nan):6.3f}")
    pre = [r for r in ROWS if r.get("section") == "prefill" and "total_ms" in r]
    if pre:
        cols = [("fp16", "bf16"), ("auto", "bf16"), ("nvfp4", "bf16"), ("auto", "fp8"),
                ("nvfp4", "fp8")]
        lines += ["", "paged prefill chunk (ms: KV write + attention; TFLOP/s of the attention)",
                  f"{'chunk':>6} {'ctx':>7} " + " ".join(f"{n + ' ' + m:>16}" for n, m in cols)]
        for chunk, ctx in sorted({(r["chunk"], r["context"]) for r in pre}):
            cells = []
            for name, bm in cols:
                r = next((r for r in pre if (r["chunk"], r["context"], r["layout"],
                                             r.get("bulk_math", "bf16")) ==
                          (chunk, ctx, name, bm)), None)
                cells.append(f"{r['total_ms']:8.2f} ({r['tflops']:5.0f})" if r else " " * 16)
            lines.append(f"{chunk:>6} {ctx:>7} " + " ".join(cells))
    prb = [r for r in ROWS if r.get("section") == "probe" and "decode_ms" in r]
    if prb:
        lines += ["", "decode launch probe (ms; default = PAGED_DECODE_LAUNCH)",
                  f"{'layout':>7} {'B':>3} {'ctx':>7} {'default':>8} {'best':>8} best launch"]
        for kvl, B, ctx in sorted({(r["layout"], r["batch"], r["context"]) for r in prb}):
            rs = [r for r in prb if (r["layout"], r["batch"], r["context"]) == (kvl, B, ctx)]
            best = min(rs, key=lambda r: r["decode_ms"])
            d = next((r["decode_ms"] for r in rs if all(
                r[x] == v for x, v in PAGED_DECODE_LAUNCH.items())), math.nan)
            lines.append(f"{kvl:>7} {B:>3} {ctx:>7} {d:8.3f} {best['decode_ms']:8.3f} "
                         f"t={best['target_programs']} w={best['num_warps']} "
                         f"s={best['num_stages']} maxnreg={best['maxnreg']} "
                         f"min_tiles={best['min_tiles_per_split']}")
        overall = best_launch()
        if overall:
            lines.append(f"best over all probe cases (geometric mean of time): {overall}")
    chk = [r for r in ROWS if r.get("section") == "check"]
    if chk:
        lines.append(f"check: {sum(r['ok'] for r in chk)}/{len(chk)} ok")
    skipped = [r for r in ROWS if r.get("skipped")]
    if skipped:
        lines.append(f"skipped rows: {len(skipped)} ({skipped[0].get('reason', '')[:80]})")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_paged.json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--contexts", default="8192,32768,131072")
    ap.add_argument("--layouts", default="fp16,nvfp4,auto")
    ap.add_argument("--fmt", default="nvfp4")
    ap.add_argument("--selection", default="block_mean")
    ap.add_argument("--budget", type=float, default=0.05)
    ap.add_argument("--budget-s", type=float, default=500.0, help="stop starting rows after this")
    ap.add_argument("--sections", default="decode,prefill",
                    help="timing sections after the check: decode, prefill (2K chunk)")
    ap.add_argument("--chunk", type=int, default=2048, help="prefill chunk (queries)")
    ap.add_argument("--prefill-contexts", default="8192,32768,131072")
    ap.add_argument("--probe-cases", default=",".join(f"{b}x{c}" for b, c in PROBE_CASES),
                    help="probe section: comma list of BATCHxCONTEXT")
    ap.add_argument("--prefill-maths", default="bf16,fp8",
                    help="bulk_math of the FP4 layouts' prefill rows (fp16 runs bf16 only)")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU + TRITON_INTERPRET=1 smoke run of the script (tiny shapes only)")
    a = ap.parse_args()
    global DEV
    if a.dry_run:
        DEV = "cpu"
    elif not torch.cuda.is_available():
        print("needs a GPU", file=sys.stderr)
        return 2
    ok = True
    if not a.skip_check:
        try:
            ok = check(a.out, a.quick, DEV, emit)
        except Exception as e:
            traceback.print_exc()
            emit(a.out, dict(section="check", ok=False, error=f"{type(e).__name__}: {e}"[:500]))
            ok = False
    batches = [int(x) for x in a.batches.split(",")]
    contexts = [int(x) for x in a.contexts.split(",")]
    if a.quick:
        batches, contexts = batches[:2], contexts[:2]
    sections = a.sections.split(",")
    # biggest contexts last within a batch size, so a budget stop loses the fewest rows
    for ctx in contexts if "decode" in sections else []:
        for B in batches:
            for kvl in a.layouts.split(","):
                if time.time() - T0 > a.budget_s:
                    emit(a.out, dict(section="decode", layout=kvl, batch=B, context=ctx,
                                     skipped=True, reason="wall-clock budget"))
                    continue
                try:
                    decode_row(a.out, kvl, B, ctx, a)
                except torch.cuda.OutOfMemoryError as e:
                    emit(a.out, dict(section="decode", layout=kvl, batch=B, context=ctx,
                                     skipped=True, reason=f"OOM: {e}"[:200]))
                except Exception as e:
                    traceback.print_exc()
                    emit(a.out, dict(section="decode", layout=kvl, batch=B, context=ctx,
                                     skipped=True, reason=f"{type(e).__name__}: {e}"[:300]))
                torch.cuda.empty_cache()
    probe_cases = [tuple(int(v) for v in x.split("x")) for x in a.probe_cases.split(",")]
    for B, ctx in probe_cases if "probe" in sections else []:
        for kvl in ("nvfp4", "auto"):
            if time.time() - T0 > a.budget_s:
                continue
            try:
                probe_rows(a.out, kvl, *((B, ctx) if DEV == "cuda" else (2, 256)), a)
            except Exception as e:
                traceback.print_exc()
                emit(a.out, dict(section="probe", layout=kvl, batch=B, context=ctx,
                                 skipped=True, reason=f"{type(e).__name__}: {e}"[:300]))
            torch.cuda.empty_cache()
    if best_launch():
        emit(a.out, dict(section="probe_best", best_launch=best_launch()))
    chunk = a.chunk if DEV == "cuda" else 16
    pctx = [int(x) for x in a.prefill_contexts.split(",")] if DEV == "cuda" else [160]
    for ctx in pctx if "prefill" in sections else []:
        for kvl in a.layouts.split(","):
            if time.time() - T0 > a.budget_s:
                emit(a.out, dict(section="prefill", layout=kvl, context=ctx, skipped=True,
                                 reason="wall-clock budget"))
                continue
            for bm in ["bf16"] if kvl == "fp16" else a.prefill_maths.split(","):
                try:
                    prefill_row(a.out, kvl, ctx, chunk, a, bm)
                except Exception as e:  # OOM included: the row is skipped, the rest goes on
                    traceback.print_exc()
                    emit(a.out, dict(section="prefill", layout=kvl, context=ctx, skipped=True,
                                     bulk_math=bm, reason=f"{type(e).__name__}: {e}"[:300]))
                if DEV == "cuda":
                    torch.cuda.empty_cache()
    print(table())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
