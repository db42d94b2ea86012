"""Paged decode math "fp16" (Hopper, FP4 as storage) next to "fp4" and vLLM's FA3 (issue 14).

    python benchmarks/bench_paged_math.py --out bench_paged_math.json \
        [--sections check,decode,fa3] [--cases 1x32768,16x32768,4x131072] \
        [--layouts nvfp4,auto] [--maths fp4,fp16] [--variants '[{}, {"units_per_iter": 2}]']
    python benchmarks/bench_paged_math.py --list       # the rows it would run, no GPU needed

Shape: Hq 32 / Hkv 8 / D 128 bf16, page 64, unit 64, budget 5 % (Llama-3-8B attention).
Sections:
* ``check``: math "fp16" on the GPU against ``thrift_vllm.paged`` (CPU reference, the step
  written by the Triton write) for both layouts and every fp16 launch variant, on a small batch
  with partial units and pages, an idle row and budgets 0 / 0.05 / 1; before any timing.
* ``decode``: the kernel target's step per layer = selection + decode + reduce, one
  ``paged_decode_triton`` call replayed from a CUDA graph (``bench_paged.bench_graph``), per
  (case, layout, math, launch variant); the nvfp4 layout with math "fp16" runs no selection.
* ``fa3``: vLLM's FA3 paged decode on bf16 pages (``vllm.vllm_flash_attn``), same shapes, CUDA
  graph; skipped with a note when the import fails.
Every row is appended to the JSON as measured; the table (ms and x FA3) is printed last.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import bench_paged as bp  # benchmarks/ is sys.path[0]
import torch

from thrift_vllm.kv_layout import KVLayout
from thrift_vllm.ops.kv_write import write_kv_triton
from thrift_vllm.ops.paged_attention import DECODE_MATHS, paged_decode_triton
from thrift_vllm.paged import paged_attention
from thrift_vllm.selection import BlockGrid, budget_to_k

CASES = "1x32768,16x32768,4x131072"
# fp16 math launch variants (notes/kernels.md "Fifth pass": sm90 SASS per variant);
# fp16_operands needs NVFP4 pages and is left out of other formats' rows.
VARIANTS = [{"swap": False}, {"swap": True}, {"swap": True, "units_per_iter": 2},
            {"swap": True, "fp16_operands": True},
            {"swap": True, "fp16_operands": True, "units_per_iter": 2}]
SHAPE = dict(Hq=32, Hkv=8, D=128, P=64, U=64)
TOL = 1e-2  # bf16 (GPU: round-to-nearest; see tests/test_paged_decode_fp16.py)


def variants(a) -> list[dict]:
    """--variants, without fp16_operands unless the pages are NVFP4."""
    return [v for v in json.loads(a.variants)
            if a.fmt == "nvfp4" or not v.get("fp16_operands")]


def plan(a) -> list[dict]:
    """The decode / fa3 rows to time, in order (cheap cases first)."""
    rows = []
    for case in a.cases.split(","):
        B, ctx = (int(x) for x in case.split("x"))
        if "decode" in a.sections:
            for kvl in a.layouts.split(","):
                for math in a.maths.split(","):
                    for launch in (variants(a) if math == "fp16" else [{}]):
                        rows.append(dict(section="decode", batch=B, context=ctx, layout=kvl,
                                         math=math, launch=launch))
        if "fa3" in a.sections:
            rows.append(dict(section="fa3", batch=B, context=ctx, layout="bf16", math="fa3"))
    return rows


def check(a) -> bool:
    """Math "fp16" on the device vs the CPU reference, both layouts, every variant."""
    dev, ok = bp.DEV, True
    seq_lens, budgets = [1, 63, 200, 333, 0], [0.05, 1.0, 0.0, 0.05, 0.05]
    g = torch.Generator().manual_seed(3)
    for kvl in ("auto", "nvfp4"):
        lay = KVLayout(kvl, 128, 64, 64, a.fmt, a.selection, torch.bfloat16)
        Hq, Hkv = 8, 2
        n_pages = [max(1, -(-s // 64)) for s in seq_lens]
        nb = sum(n_pages) + 2
        perm = torch.randperm(nb, generator=g)
        bt = torch.zeros(len(seq_lens), max(n_pages), dtype=torch.int32)
        c = 0
        for i, n in enumerate(n_pages):
            bt[i, :n] = perm[c:c + n]
            c += n
        cache = lay.allocate(nb, Hkv, device=dev)
        slots = torch.tensor([int(bt[i, p // 64]) * 64 + p % 64 for i, s in enumerate(seq_lens)
                              for p in range(s)], dtype=torch.int64)
        k = torch.randn(len(slots), Hkv, 128, generator=g).to(torch.bfloat16)
        v = torch.randn(len(slots), Hkv, 128, generator=g).to(torch.bfloat16)
        write_kv_triton(k.to(dev), v.to(dev), cache, slots.to(dev), lay)
        last = torch.tensor([sum(seq_lens[:i + 1]) - 1 for i in range(len(seq_lens))])
        last = last.clamp(min=0)
        q = torch.randn(len(seq_lens), Hq, 128, generator=g).to(torch.bfloat16)
        kn, vn = k[last], v[last]
        live = [i for i, s in enumerate(seq_lens) if s > 0]
        ref = paged_attention(lay, lay.views(cache.cpu()), q[live], kn[live], vn[live],
                              query_start_loc=list(range(len(live) + 1)),
                              seq_lens=[seq_lens[i] for i in live], block_table=bt[live],
                              fp16_budgets=[budgets[i] for i in live], scale=128**-0.5,
                              decode_math="fp16")
        ks = [budget_to_k(f, BlockGrid(1, max(s, 1), 64, True))
              for f, s in zip(budgets, seq_lens, strict=True)]
        kw = dict(block_table=bt.to(dev), seq_lens=torch.tensor(seq_lens, dtype=torch.int32,
                                                                device=dev),
                  num_fp16_blocks=torch.tensor(ks, dtype=torch.int32, device=dev),
                  scale=128**-0.5)
        for launch in variants(a):
            row = dict(section="check", layout=kvl, launch=launch)
            try:
                out = paged_decode_triton(lay, cache, q.to(dev), kn.to(dev), vn.to(dev),
                                          math="fp16", launch=launch, **kw).cpu()
                errs = [bp_rel(out[i], ref[j]) for j, i in enumerate(live)]
                row.update(max_rel_err=max(errs), idle_zero=bool((out[-1] == 0).all()))
                row["ok"] = row["max_rel_err"] < TOL and row["idle_zero"]
            except Exception as e:
                traceback.print_exc()
                row.update(ok=False, error=f"{type(e).__name__}: {e}"[:300])
            ok &= row["ok"]
            bp.emit(a.out, row)
    return ok


def bp_rel(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return ((x - y).norm() / y.norm().clamp(min=1e-30)).item()


def decode_row(a, row: dict) -> None:
    B, ctx = row["batch"], row["context"]
    lay, cache, q, kn, vn, k, kw = bp.decode_inputs(row["layout"], B, ctx, a)
    row["total_ms"] = bp.bench_graph(lambda: paged_decode_triton(
        lay, cache, q, kn, vn, max_num_fp16_blocks=k, math=row["math"], launch=row["launch"],
        **kw))
    kv_bytes = B * ctx * lay.bytes_per_token(cache.shape[1])
    row["page_gb_per_s"] = round(kv_bytes / 1e9 / (row["total_ms"] / 1e3), 1)


def fa3_row(a, row: dict) -> None:
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except Exception as e:  # CPU build, no FA3 extension
        row.update(skipped=True, reason=f"vllm.vllm_flash_attn unavailable: {e}"[:200])
        print(f"note: FA3 peer skipped ({row['reason']})", flush=True)
        return
    B, ctx = row["batch"], row["context"]
    s = SHAPE
    page = a.fa_page
    n = -(-ctx // page)
    g = torch.Generator(device=bp.DEV).manual_seed(B + ctx)
    bt, nb = bp.shuffled_table(B, n, g)
    kc = torch.randn(nb, page, s["Hkv"], s["D"], device=bp.DEV, dtype=torch.bfloat16,
                     generator=g)
    vc = torch.randn_like(kc)
    q = torch.randn(B, s["Hq"], s["D"], device=bp.DEV, dtype=torch.bfloat16, generator=g)
    out = torch.empty_like(q)
    cu = torch.arange(B + 1, dtype=torch.int32, device=bp.DEV)
    used = torch.full((B,), ctx, dtype=torch.int32, device=bp.DEV)
    kw = dict(q=q, k=kc, v=vc, out=out, cu_seqlens_q=cu, max_seqlen_q=1, seqused_k=used,
              max_seqlen_k=ctx, softmax_scale=s["D"]**-0.5, causal=True, block_table=bt,
              fa_version=3)
    try:
        flash_attn_varlen_func(**kw)
    except TypeError:  # an older signature without fa_version
        kw.pop("fa_version")
    row["total_ms"] = bp.bench_graph(lambda: flash_attn_varlen_func(**kw))
    row["fa_page"] = page
    row["page_gb_per_s"] = round(B * ctx * s["Hkv"] * 2 * s["D"] * 2 / 1e9
                                 / (row["total_ms"] / 1e3), 1)


def table(rows: list[dict]) -> str:
    done = [r for r in rows if "total_ms" in r]
    lines = ["", "paged decode step per layer (ms, CUDA graph; select + decode + reduce), "
             "Hq 32 / Hkv 8 / D 128 bf16, budget as given; x FA3 = FA3 ms / ours"]
    lines.append(f"{'B x ctx':>10} {'layout':>6} {'math':>5} {'launch':<36} {'ms':>8} "
                 f"{'GB/s':>7} {'x FA3':>6}")
    for r in done:
        fa = next((f["total_ms"] for f in done if f["section"] == "fa3"
                   and (f["batch"], f["context"]) == (r["batch"], r["context"])), None)
        ratio = f"{fa / r['total_ms']:6.2f}" if fa else " " * 6
        launch = json.dumps(r.get("launch", {})) if r["section"] == "decode" else "-"
        lines.append(f"{r['batch']:>4}x{r['context']:<6}{r['layout']:>6} {r['math']:>5} "
                     f"{launch:<36} {r['total_ms']:8.4f} {r.get('page_gb_per_s', 0):7.1f} "
                     f"{ratio}")
    chk = [r for r in bp.ROWS if r.get("section") == "check"]
    if chk:
        lines.append(f"check (math fp16 vs reference): {sum(r['ok'] for r in chk)}/{len(chk)} "
                     f"ok, max rel err {max(r.get('max_rel_err', 1) for r in chk):.2e}")
    skipped = [r for r in rows if r.get("skipped")]
    if skipped:
        lines.append(f"skipped: {len(skipped)} ({skipped[0].get('reason', '')[:100]})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_paged_math.json")
    ap.add_argument("--sections", default="check,decode,fa3")
    ap.add_argument("--cases", default=CASES, help="comma list of BATCHxCONTEXT")
    ap.add_argument("--layouts", default="nvfp4,auto")
    ap.add_argument("--maths", default="fp4,fp16")
    ap.add_argument("--variants", default=json.dumps(VARIANTS),
                    help="JSON list of launch overrides for math fp16 (fp4 runs its default)")
    ap.add_argument("--fmt", default="nvfp4")
    ap.add_argument("--selection", default="block_mean")
    ap.add_argument("--budget", type=float, default=0.05)
    ap.add_argument("--fa-page", type=int, default=16, help="FA3 page (vLLM's default block)")
    ap.add_argument("--budget-s", type=float, default=280.0, help="stop starting rows after this")
    ap.add_argument("--list", action="store_true", help="print the planned rows and exit")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU + TRITON_INTERPRET=1: the check section on tiny shapes only")
    a = ap.parse_args(argv)
    for m in a.maths.split(","):
        if m not in DECODE_MATHS:
            ap.error(f"--maths: {m!r} is not one of {DECODE_MATHS}")
    variants = json.loads(a.variants)
    if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
        ap.error("--variants must be a JSON list of objects")
    rows = plan(a)
    if a.list:
        for r in rows:
            print(json.dumps(r))
        return 0
    if a.dry_run:
        bp.DEV = "cpu"
    elif not torch.cuda.is_available():
        print("needs a GPU (or --list / --dry-run)", file=sys.stderr)
        return 2
    ok = check(a) if "check" in a.sections else True
    if not ok:
        print("check failed: not timing the fp16 math", file=sys.stderr)
        rows = [r for r in rows if r["math"] != "fp16"]
    for row in rows if bp.DEV == "cuda" else []:
        if time.time() - bp.T0 > a.budget_s:
            row.update(skipped=True, reason="wall-clock budget")
        else:
            try:
                (fa3_row if row["section"] == "fa3" else decode_row)(a, row)
            except Exception as e:  # OOM included: the row is skipped, the rest goes on
                traceback.print_exc()
                row.update(skipped=True, reason=f"{type(e).__name__}: {e}"[:300])
            torch.cuda.empty_cache()
        bp.emit(a.out, row)
    print(table(rows))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
