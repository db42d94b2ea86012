"""Statistics and reporting of the quality harness: paired-bootstrap gap recovery, the summary
of ``results.json``, the Markdown table and the Pareto plot.

Gap recovery of a thrift configuration: ``(m_thrift - m_fp4) / (m_fp16 - m_fp4)`` with ``m``
the mean accuracy, or the negated NLL, against the fp4 run of the same ``quant_format`` and
``bulk_math``; 95 % confidence intervals by a paired bootstrap over samples (1000 resamples).
``recovery_nll_tail``: the same on ``nll_tail``. The paged rows (kv layouts) are compared with the
operator's fp16 and fp4 (``fp4/F/bf16``) rows on the same samples and the same scored positions:
``recovery_nll_tail`` and ``recovery_acc`` (not ``recovery_nll``: their first three quarters are
prefill). fp16 needs no two-step run (exact attention does not depend on the split).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from thrift_vllm.quality.methods import MethodConfig, fp16_share


def _mean(x) -> float:
    return float(np.mean(x)) if len(x) else float("nan")


def bootstrap_recovery(m_thr, m_fp4, m_fp16, n_boot: int = 1000, seed: int = 0,
                       higher_better: bool = True) -> dict:
    """Gap recovery and its 95 % paired-bootstrap interval over samples."""
    a, b, c = (np.asarray(x, dtype=np.float64) for x in (m_thr, m_fp4, m_fp16))
    if not higher_better:
        a, b, c = -a, -b, -c

    def rec(i):
        den = c[i].mean() - b[i].mean()
        return (a[i].mean() - b[i].mean()) / den if den != 0 else float("nan")

    n = a.size
    point = rec(np.arange(n))
    rng = np.random.default_rng(seed)
    boots = np.array([rec(rng.integers(0, n, n)) for _ in range(n_boot)])
    boots = boots[np.isfinite(boots)]
    lo, hi = (np.percentile(boots, [2.5, 97.5]) if boots.size else (float("nan"),) * 2)
    return {"recovery": float(point), "ci95": [float(lo), float(hi)],
            "gap": float(c.mean() - b.mean())}


def summarize(results: dict, configs: list[MethodConfig], lengths: list[int],
              n_boot: int = 1000) -> dict:
    """Means per metric and gap recoveries per thrift / paged configuration and length
    (``recovery_nll``, ``recovery_nll_tail``, ``recovery_acc``; paged rows only the last two)."""
    by_name = {c.name: c for c in configs}
    out: dict = {}
    for L in lengths:
        rl = results.get(str(L), {})
        if "fp16" not in rl:
            continue
        summ: dict = {}
        for name, r in rl.items():
            cfg = by_name.get(name)
            entry = {k: _mean(v) for k, v in r.items() if k != "acc_depth"}
            if r.get("acc_depth"):
                by: dict[str, list] = {}
                for d, a in zip(r["acc_depth"], r["acc"], strict=True):
                    by.setdefault(f"{d:g}", []).append(a)
                entry["acc_by_depth"] = {d: _mean(v) for d, v in sorted(by.items())}
            if cfg is not None:
                entry["fp16_share"] = fp16_share(cfg, L)
            if cfg is not None and (cfg.method == "thrift" or cfg.paged):
                # paged rows: against the operator's fp4 (bf16) and fp16 on the same positions
                base = MethodConfig("fp4", cfg.quant_format, bulk_math=cfg.bulk_math).name
                metrics = (("nll_tail", False), ("acc", True)) if cfg.paged else (
                    ("nll", False), ("acc", True), ("nll_tail", False))
                if base in rl:
                    for metric, hb in metrics:
                        if metric in r:
                            entry[f"recovery_{metric}"] = bootstrap_recovery(
                                r[metric], rl[base][metric], rl["fp16"][metric], n_boot,
                                higher_better=hb)
            summ[name] = entry
        fp16 = summ["fp16"]
        checks = {}
        for name, e in summ.items():
            if name.startswith("fp4/"):
                checks[name] = {"acc_drop": fp16["acc"] - e["acc"],
                                "nll_increase": e["nll"] - fp16["nll"],
                                "fp4_hurts": bool(fp16["acc"] - e["acc"] >= 0.10
                                                  or e["nll"] - fp16["nll"] >= 0.05)}
        out[str(L)] = {"methods": summ, "fp4_vs_fp16": checks}
    return out


# ----------------------------------------------------------------------------------- output

def format_table(summary: dict, configs: list[MethodConfig]) -> str:
    lines = []
    for L, s in summary.items():
        lines.append(f"\n### length {L}\n")
        lines.append("| method | FP16 share | NLL/byte | NLL tail | acc kv | acc needle | acc var "
                     "| acc | recovery NLL [95% CI] | recovery NLL tail [95% CI] "
                     "| recovery acc [95% CI] |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for c in configs:
            e = s["methods"].get(c.name)
            if e is None:
                continue

            def rec(key, e=e):
                r = e.get(key)
                if r is None:
                    return ""
                return f"{r['recovery']:.2f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]"

            accs = " | ".join(f"{e[k]:.3f}" if k in e else "" for k in
                              ("acc_kv", "acc_needle", "acc_var", "acc"))
            lines.append(f"| {c.name} | {100 * e['fp16_share']:.1f}% | {e['nll']:.4f} | "
                         f"{e['nll_tail']:.4f} | {accs} | {rec('recovery_nll')} | "
                         f"{rec('recovery_nll_tail')} | {rec('recovery_acc')} |")
        if any(c.paged and c.name in s["methods"] for c in configs):
            lines.append("\n`*-kv4` / `*-kvauto` rows: paged KV layout, two steps (NLL tail and "
                         "accuracy scored on step 2; NLL/byte pools step 1's prefill); their "
                         "recoveries are against the fp16 and fp4/F/bf16 rows above.")
        for name, e in s["methods"].items():
            if not name.startswith("thrift") and e.get("acc_by_depth"):
                by = ", ".join(f"{d}: {a:.2f}" for d, a in e["acc_by_depth"].items())
                lines.append(f"\n{name} accuracy by needle depth: {by}")
        for name, ch in s["fp4_vs_fp16"].items():
            lines.append(f"\n{name} vs fp16: accuracy -{ch['acc_drop']:.3f}, NLL "
                         f"+{ch['nll_increase']:.4f} nats/byte -> FP4 hurts clearly "
                         f"(>= 0.10 acc or >= 0.05 nats/byte): {ch['fp4_hurts']}")
    return "\n".join(lines).lstrip("\n")


def pareto_plot(summary: dict, configs: list[MethodConfig], path: Path) -> str | None:
    """Recovery (points, 95 % CI bars clipped to the axes) vs the actual FP16 share of the
    budget at the longest length; None if matplotlib is missing."""
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not summary:
        return None
    L = max(summary, key=int)
    s = summary[L]["methods"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, metric in zip(axes, ("nll", "acc"), strict=True):
        groups: dict[str, list] = {}
        for c in configs:
            e = s.get(c.name)
            if c.method != "thrift" or c.paged or e is None or f"recovery_{metric}" not in e:
                continue
            r = e[f"recovery_{metric}"]
            label = f"{c.selection_label} {c.quant_format} {c.bulk_math}"
            groups.setdefault(label, []).append((100 * e["fp16_share"], r["recovery"],
                                                 *r["ci95"]))
        drawn = False
        for label, pts in sorted(groups.items()):
            pts = sorted(p for p in pts if all(math.isfinite(v) for v in p))
            if not pts:
                continue
            drawn = True
            x = [p[0] for p in pts]
            y = [p[1] for p in pts]
            err = [[max(0.0, p[1] - p[2]) for p in pts], [max(0.0, p[3] - p[1]) for p in pts]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
        name = "held-out NLL" if metric == "nll" else "retrieval"
        ax.set_title(f"{name}, length {L}")
        if not drawn:
            ax.text(0.5, 0.5, "no FP4 gap to recover", ha="center", va="center",
                    transform=ax.transAxes)
            continue
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.axhline(0.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        lo = min(-0.1, min(p[1] for g in groups.values() for p in g if math.isfinite(p[1])))
        ax.set_ylim(max(lo, -1.0) - 0.05, 1.25)
        ax.set_xlabel("FP16 share of causal candidate blocks (%)")
        ax.set_ylabel(f"gap recovery ({'NLL/byte' if metric == 'nll' else 'retrieval acc'})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
