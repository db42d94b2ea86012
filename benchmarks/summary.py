"""Regenerate ``benchmarks/results/summary.json``: the headline figures, latest per name.

    python benchmarks/summary.py benchmarks/results/h200_fifth_pass.json [...]

Each input is a session file as the device passes write them (``{"meta": {"commit", "device",
"date", "summary_skip": [calls that are comparisons, not the defaults]}, "<call>": <a
benchmark's JSON>, ...}``); every figure is taken from rows of one
session, ours next to the peer's (measured side by side, as BENCHMARKS.md requires), and
replaces an older figure of the same name. Entries: ``{"name", "value", "unit", "peer",
"peer_value", "ratio", "commit", "device", "date", "command"}``, ``ratio`` = ours / peer for
rates and peer / ours for times (higher = better). Prints a table last.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

HERE = Path(__file__).resolve().parent
SUMMARY = HERE / "results" / "summary.json"
OURS, OUR_BUDGET = "thrift-nvfp4", 0.05

# name -> (case, our backend, peer backend, row field, unit)
ENGINE = {
    "engine.decode.1x32k": ("decode1x32k", OURS, "FLASH_ATTN", "steady_decode_tok_s", "tok/s"),
    "engine.decode.16x32k": ("decode32k", OURS, "FLASH_ATTN", "steady_decode_tok_s", "tok/s"),
    "engine.decode.4x128k": ("decode128k", OURS, "FLASH_ATTN", "steady_decode_tok_s", "tok/s"),
    "engine.decode.16x32k.fp8kv": ("decode32k", OURS, "FLASH_ATTN-fp8", "steady_decode_tok_s",
                                   "tok/s"),
    "engine.prefill.4x32k": ("prefill32k", OURS, "FLASH_ATTN", "prefill_tok_s", "tok/s"),
    "engine.prefill.4x32k.auto": ("prefill32k", "thrift-auto", "FLASH_ATTN", "prefill_tok_s",
                                  "tok/s"),
    "engine.prefill.1x128k": ("prefill128k", OURS, "FLASH_ATTN", "prefill_tok_s", "tok/s"),
    "engine.kv_tokens": (None, OURS, "FLASH_ATTN", "capacity_tokens", "tokens"),
}
# name -> (concurrency, sweep field, unit, lower is better)
SERVER = {
    "server.ttft_p50.c1": (1, "ttft_p50", "s", True),
    "server.ttft_p50.c4": (4, "ttft_p50", "s", True),
    "server.requests_per_s.c16": (16, "req_s", "req/s", False),
}
# name -> (batch, context) of bench_paged_math's rows: ours = layout nvfp4, the Hopper default
# (math fp16, the default launch), selection + decode + reduce; peer = its "fa3" rows
KERNEL_MATH, KERNEL_LAUNCH = "fp16", {"swap": True}
KERNEL = {"kernel.decode.1x32k": (1, 32768), "kernel.decode.16x32k": (16, 32768),
          "kernel.decode.4x128k": (4, 131072)}


def _command(run: dict, script: str) -> str:
    argv = (run.get("meta") or {}).get("argv")
    return f"python benchmarks/{script} " + " ".join(argv) if argv else f"benchmarks/{script}"


def _ours(row: dict, backend: str) -> bool:
    return row.get("backend") == backend and (
        not backend.startswith("thrift") or row.get("budget", row.get("engine_budget"))
        in (OUR_BUDGET, None))


def figures(session: dict, defaults: dict | None = None) -> list[dict]:
    """The headline figures one session file holds (ours and the peer from its rows);
    ``defaults``: commit / device / date where the session's meta lacks them."""
    meta = {**(defaults or {}), **{k: v for k, v in session.get("meta", {}).items() if v}}
    stamp = {k: meta.get(k) for k in ("commit", "device", "date")}
    skip = set(meta.get("summary_skip", []))  # comparison runs (e.g. a non-default route)
    runs = [v for k, v in session.items() if k != "meta" and k not in skip
            and isinstance(v, dict)]
    out = []

    def add(name, value, unit, peer, peer_value, lower_better, command):
        if not all(isinstance(x, (int, float)) and math.isfinite(x) and x
                   for x in (value, peer_value)):
            return  # missing, zero or NaN (e.g. no steady state: requests never all decoded)
        ratio = peer_value / value if lower_better else value / peer_value
        out.append({"name": name, "value": value, "unit": unit, "peer": peer,
                     "peer_value": peer_value, "ratio": round(ratio, 3), **stamp,
                     "command": command})

    rows = [(r, run) for run in runs for r in run.get("rows", []) if "backend" in r]
    for name, (case, ours, peer, field, unit) in ENGINE.items():
        def pick(backend, case=case, field=field):
            hits = [(r, run) for r, run in rows if _ours(r, backend)
                    and (case is None or r.get("case") == case) and r.get(field)]
            return hits[-1] if hits else (None, None)

        (mine, run_m), (theirs, run_p) = pick(ours), pick(peer)
        if mine and theirs:
            add(name, mine[field], unit, peer, theirs[field], False,
                _command(run_m, "vllm_serving.py") + " ; " + _command(run_p, "vllm_serving.py"))
    sweep = [(r, run) for run in runs for r in run.get("sweep", [])]
    for name, (conc, field, unit, lower) in SERVER.items():
        def pick_s(backend, conc=conc):
            hits = [(r, run) for r, run in sweep if r.get("concurrency") == conc
                    and _ours(r, backend)]
            return hits[-1] if hits else (None, None)

        (mine, run_m), (theirs, run_p) = pick_s(OURS), pick_s("FLASH_ATTN")
        if mine and theirs:
            add(name, mine[field], unit, "FLASH_ATTN", theirs[field], lower,
                _command(run_m, "vllm_serving.py") + " ; " + _command(run_p, "vllm_serving.py"))
    krows = [(r, run) for run in runs for r in run.get("rows", []) if "total_ms" in r]
    for name, (batch, ctx) in KERNEL.items():
        def pick_k(match, batch=batch, ctx=ctx):
            hits = [(r, run) for r, run in krows if r.get("batch") == batch
                    and r.get("context") == ctx and match(r)]
            return hits[-1] if hits else (None, None)

        mine, run_m = pick_k(lambda r: r.get("section") == "decode" and r.get("layout") == "nvfp4"
                             and r.get("math") == KERNEL_MATH and r.get("launch") == KERNEL_LAUNCH)
        theirs, _ = pick_k(lambda r: r.get("section") == "fa3")
        if mine and theirs:
            add(name, mine["total_ms"], "ms", "FA3 paged decode (bf16)", theirs["total_ms"], True,
                _command(run_m, "bench_paged_math.py"))
    for run in [session, *runs]:  # quality figures carry their own names (list or by name)
        quality = run.get("figures") or []
        if isinstance(quality, dict):
            quality = [{"name": k, **v} for k, v in quality.items()]
        for f in quality:
            if f.get("name", "").startswith("quality."):
                out.append({"unit": "fraction", "peer": None, "peer_value": None, "ratio": None,
                            **stamp, **{k: f[k] for k in ("name", "value", "commit", "device",
                                                          "date", "command") if k in f}})
    return out


def merge(existing: list[dict], new: list[dict]) -> list[dict]:
    """Latest per name (by date; a later input wins a tie)."""
    by_name = {f["name"]: f for f in existing}
    for f in new:
        old = by_name.get(f["name"])
        if old is None or str(f.get("date") or "") >= str(old.get("date") or ""):
            by_name[f["name"]] = f
    return [by_name[k] for k in sorted(by_name)]


def table(figs: list[dict]) -> str:
    lines = [f"{'name':34} {'value':>12} {'peer':>24} {'peer value':>12} {'ratio':>6}  date"]
    for f in figs:
        ratio = "-" if f.get("ratio") is None else f"{f['ratio']:.2f}"
        lines.append(f"{f['name']:34} {f['value']:>12.4g} {f.get('peer')!s:>24} "
                     f"{(f.get('peer_value') or 0):>12.4g} {ratio:>6}  {f.get('date')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sessions", nargs="+", help="session result JSON files")
    p.add_argument("--out", default=str(SUMMARY))
    for k in ("commit", "device", "date"):
        p.add_argument(f"--{k}", default=None, help=f"{k} where a session's meta has none")
    a = p.parse_args(argv)
    defaults = {k: getattr(a, k) for k in ("commit", "device", "date") if getattr(a, k)}
    out = Path(a.out)
    existing = json.loads(out.read_text())["figures"] if out.exists() else []
    new = [f for path in a.sessions
           for f in figures(json.loads(Path(path).read_text()), defaults)]
    figs = merge(existing, new)
    out.write_text(json.dumps({"figures": figs}, indent=1) + "\n")
    print(table(figs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
