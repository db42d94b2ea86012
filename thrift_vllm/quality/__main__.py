"""``python -m thrift_vllm.quality``: the quality harness (see ``harness.py``)."""

from __future__ import annotations

import argparse

import torch

from thrift_vllm.quality import harness


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(x) / 100 for x in s.split(",") if x)


def _strs(s: str) -> tuple[str, ...]:
    return tuple(x for x in s.split(",") if x)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m thrift_vllm.quality (or thrift-vllm eval)",
                                description="NLL/byte and retrieval accuracy of fp16, fp4 and "
                                            "thrift attention through thrift_vllm.attention, "
                                            "and of the paged KV layouts (two steps)")
    p.add_argument("--model", required=True, help="model directory (config.json, safetensors)")
    p.add_argument("--lengths", default=None, help="default 4096,16384,32768 (--quick: 512)")
    p.add_argument("--samples", type=int, default=None,
                   help="samples per metric and task (default 16; --quick: 2)")
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true",
                   help="small CPU grid: length 512 unless --lengths is given, 2 samples unless "
                        "--samples is given, fp16/fp4/a few thrift points, bf16 bulk math; "
                        "paged rows at 0/5/100 %% block_mean for --kv-layouts")
    p.add_argument("--formats", default="nvfp4,mxfp4", help="fp4 baselines")
    p.add_argument("--thrift-formats", default="nvfp4")
    p.add_argument("--budgets", default="1,2.5,5,10,25", help="FP16 budgets in percent")
    p.add_argument("--selections", default="block_mean,quest,local,block_mean+sr,quest+sr",
                   help="X+sr = selection X with force_sink_recent")
    p.add_argument("--bulk-maths", default=None,
                   help="default bf16,fp8 on CUDA; bf16 on CPU (the reference ignores it)")
    p.add_argument("--kv-layouts", default="operator,nvfp4",
                   help="operator = one prefill through thrift_vllm.attention (the fp4/thrift "
                        "rows); nvfp4 / auto = the paged KV layout of the vLLM backend in a "
                        "two-step evaluation (rows fp4-kv4, thrift-kv4, fp16-kv4 / *-kvauto)")
    p.add_argument("--kv-budgets", default="0,2.5,5,10,25,100",
                   help="FP16 budgets in percent of the paged rows (0 and 100 once each)")
    p.add_argument("--kv-selections", default="block_mean,quest")
    p.add_argument("--tasks", default="kv,needle,var")
    p.add_argument("--device", default=None)
    p.add_argument("--impl", default="auto", choices=("auto", "torch", "triton"))
    p.add_argument("--fresh", action="store_true", help="ignore an existing results.json")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop starting new (length, method) runs after this; rerun to continue")
    return p


def main(argv: list[str] | None = None) -> dict:
    p = build_parser()
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    bulk = _strs(args.bulk_maths) if args.bulk_maths else (
        ("bf16", "fp8") if device.startswith("cuda") else ("bf16",))
    lengths = [int(x) for x in (args.lengths or ("512" if args.quick else
                                                  "4096,16384,32768")).split(",")]
    samples = args.samples or (2 if args.quick else 16)
    kv_layouts = _strs(args.kv_layouts)
    bad = set(kv_layouts) - set(harness.KV_LAYOUTS)
    if bad:
        p.error(f"--kv-layouts: unknown {sorted(bad)}; choose from {harness.KV_LAYOUTS}")
    if args.quick:
        configs = harness.method_grid(formats=("nvfp4",), thrift_formats=("nvfp4",),
                                      budgets=(0.05, 0.5),
                                      selections=("block_mean", "quest+sr"),
                                      bulk_maths=("bf16",), kv_layouts=kv_layouts,
                                      kv_budgets=(0.0, 0.05, 1.0),
                                      kv_selections=("block_mean",))
    else:
        configs = harness.method_grid(formats=_strs(args.formats),
                                      thrift_formats=_strs(args.thrift_formats),
                                      budgets=_floats(args.budgets),
                                      selections=_strs(args.selections), bulk_maths=bulk,
                                      kv_layouts=kv_layouts, kv_budgets=_floats(args.kv_budgets),
                                      kv_selections=_strs(args.kv_selections))
    return harness.run(args.model, lengths, samples, args.out, configs, device=device,
                       impl=args.impl, resume=not args.fresh, n_boot=args.bootstrap,
                       task_kinds=_strs(args.tasks), max_minutes=args.max_minutes)


if __name__ == "__main__":
    main()
