"""Quality harness: every attention layer of the model runs through ``thrift_vllm.attention``
with the method under evaluation, at full length.

Metrics, per length ``L`` and per sample (the samples are the same for every method, so the
comparisons are paired):

* ``nll``: held-out NLL in nats per byte. A sample is ``[BOS]`` plus ``L - 1`` contiguous bytes of
  the held-out stdlib stream (``data.heldout_windows``: evenly spaced windows); the mean over the
  ``L - 1`` predicted bytes. ``nll_tail``: the same over the last quarter of the positions (the
  part that has the longest context).
* ``acc_kv`` / ``acc_needle`` / ``acc_var``: retrieval accuracy. A sample is ``[BOS] + prompt +
  answer`` of at most ``L`` tokens, the fact at depth 0.1/0.3/0.5/0.7/0.9 (cycled over samples).
  Scoring is teacher-forced: the sample is correct when the argmax at every answer position is
  the answer byte. For exact attention that is the same as greedy decoding matching the answer
  bytes (greedy decoding reproduces the answer iff every teacher-forced argmax is right); for
  FP4/thrift it scores the prefill numerics (one prefill call over prompt + answer, whose
  selection and diagonal-tile V scales see the answer positions too) rather than decode calls.
  ``acc`` pools the three tasks.

Gap recovery of a thrift configuration: ``(m_thrift - m_fp4) / (m_fp16 - m_fp4)`` with ``m``
the mean accuracy, or the negated NLL, against the fp4 run of the same ``quant_format`` and
``bulk_math``; 95 % confidence intervals by a paired bootstrap over samples (1000 resamples).

The model is loaded with transformers; a custom attention implementation ``"thrift"`` is
registered in ``AttentionInterface`` (and a mask function returning None in
``AttentionMaskInterface``: single unpadded sequences, causal inside the operator). The model
runs in bf16 on CUDA and fp32 on CPU; on CPU q/k/v are cast to fp16 for the operator (the
operator takes fp16/bf16 only) and the result back to fp32.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from thrift_vllm.quality import data as qdata

ATTN_NAME = "thrift"
_CURRENT: dict = {}


@dataclass(frozen=True)
class MethodConfig:
    method: str  # fp16 | fp4 | thrift
    quant_format: str = "nvfp4"
    fp16_budget: float = 0.0
    selection: str = "block_mean"
    force_sink_recent: bool = False
    bulk_math: str = "bf16"
    block_size: int = 64

    @property
    def name(self) -> str:
        if self.method == "fp16":
            return "fp16"
        if self.method == "fp4":
            return f"fp4/{self.quant_format}/{self.bulk_math}"
        sel = self.selection + ("+sr" if self.force_sink_recent else "")
        return (f"thrift/{self.quant_format}/{self.bulk_math}/{sel}/"
                f"{100 * self.fp16_budget:g}%")

    @property
    def selection_label(self) -> str:
        return self.selection + ("+sr" if self.force_sink_recent else "")

    def operator_kwargs(self) -> dict:
        return dict(method=self.method, quant_format=self.quant_format,
                    fp16_budget=self.fp16_budget if self.method == "thrift" else
                    (1.0 if self.method == "fp16" else 0.0),
                    selection=self.selection, force_sink_recent=self.force_sink_recent,
                    bulk_math=self.bulk_math, block_size=self.block_size)


def fp16_share(cfg: MethodConfig, length: int) -> float:
    """Actual share of causal candidate blocks computed in FP16 for a full prefill of
    ``length`` (the operator's budget -> k rule, ``thrift_vllm.selection.budget_to_k``)."""
    from thrift_vllm.selection import BlockGrid, budget_to_k

    if cfg.method != "thrift":
        return 1.0 if cfg.method == "fp16" else 0.0
    grid = BlockGrid(length, length, cfg.block_size, True)
    k = budget_to_k(cfg.fp16_budget, grid)
    n = grid.num_q_blocks
    return sum(min(k, r + 1) for r in range(n)) / (n * (n + 1) // 2)


def method_grid(formats=("nvfp4", "mxfp4"), thrift_formats=("nvfp4",),
                budgets=(0.01, 0.025, 0.05, 0.10, 0.25),
                selections=("block_mean", "quest", "local", "block_mean+sr", "quest+sr"),
                bulk_maths=("bf16", "fp8")) -> list[MethodConfig]:
    """fp16, fp4 per format and bulk math, thrift per format x bulk math x selection x budget.
    A selection ``"X+sr"`` is selection X with ``force_sink_recent``."""
    out = [MethodConfig("fp16")]
    fmts = list(dict.fromkeys([*formats, *thrift_formats]))
    for bm in bulk_maths:
        for f in fmts:
            out.append(MethodConfig("fp4", f, bulk_math=bm))
        for f in thrift_formats:
            for sel in selections:
                base, sr = (sel[:-3], True) if sel.endswith("+sr") else (sel, False)
                for b in budgets:
                    out.append(MethodConfig("thrift", f, b, base, sr, bm))
    return out


# ----------------------------------------------------------------------- attention routing

def thrift_attention_forward(module, query, key, value, attention_mask, scaling=None,
                             dropout=0.0, **kwargs):
    """transformers attention interface: q ``[B, Hq, S, D]``, k/v ``[B, Hkv, S, D]`` ->
    ``([B, S, Hq, D], None)`` through ``thrift_vllm.attention`` with ``_CURRENT`` settings."""
    import thrift_vllm

    if not _CURRENT:
        raise RuntimeError("thrift attention used outside harness.use_method(...)")
    if query.shape[2] != key.shape[2]:
        raise RuntimeError("the harness evaluates single prefills (no KV cache)")
    dt = query.dtype
    op_dt = dt if dt in (torch.float16, torch.bfloat16) else torch.float16
    out = thrift_vllm.attention(query.to(op_dt), key.to(op_dt), value.to(op_dt), causal=True,
                                sm_scale=scaling, impl=_CURRENT.get("impl", "auto"),
                                **_CURRENT["kwargs"])
    return out.to(dt).transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    return None


def register() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, thrift_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, _no_mask)
    return ATTN_NAME


class use_method:  # noqa: N801 - context manager used like a function
    """Route the registered ``"thrift"`` attention through ``cfg`` inside the block."""

    def __init__(self, cfg: MethodConfig, impl: str = "auto"):
        self.cfg, self.impl = cfg, impl

    def __enter__(self):
        _CURRENT.clear()
        _CURRENT.update(kwargs=self.cfg.operator_kwargs(), impl=self.impl)
        return self

    def __exit__(self, *exc):
        _CURRENT.clear()


def load_model(model_dir: str, device: str | torch.device, dtype: torch.dtype | None = None):
    from transformers import AutoModelForCausalLM

    register()
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype,
                                                 attn_implementation=ATTN_NAME)
    model.config.use_cache = False
    return model.to(device).eval()


# ----------------------------------------------------------------------------- evaluation

@torch.inference_mode()
def _logits(model, ids: list[int], positions: torch.Tensor | None = None) -> torch.Tensor:
    dev = next(model.parameters()).device
    x = torch.tensor([ids], dtype=torch.long, device=dev)
    h = model.model(input_ids=x, use_cache=False).last_hidden_state[0]
    if positions is not None:
        h = h[positions.to(dev)]
    return model.lm_head(h).float()


def nll_sample(model, window: bytes) -> tuple[float, float]:
    """(mean NLL per byte, mean over the last quarter) of ``[BOS] + window``."""
    ids = [qdata.BOS, *window]
    logits = _logits(model, ids)[:-1]
    tgt = torch.tensor(ids[1:], device=logits.device)
    nll = torch.nn.functional.cross_entropy(logits, tgt, reduction="none")
    q = max(1, nll.numel() // 4)
    return float(nll.mean()), float(nll[-q:].mean())


def retrieval_sample(model, task: qdata.Task) -> bool:
    """Teacher-forced exact match of the answer bytes (see the module docstring)."""
    ids = [qdata.BOS, *task.prompt, *task.answer]
    n = len(task.answer)
    pos = torch.arange(len(ids) - n - 1, len(ids) - 1)
    pred = _logits(model, ids, pos).argmax(-1).tolist()
    return pred == list(task.answer)


def evaluate_config(model, cfg: MethodConfig, length: int, windows: list[bytes],
                    tasks: dict[str, list[qdata.Task]], impl: str = "auto",
                    progress=None) -> dict:
    res: dict = {"nll": [], "nll_tail": []}
    with use_method(cfg, impl):
        for w in windows:
            a, b = nll_sample(model, w)
            res["nll"].append(a)
            res["nll_tail"].append(b)
            if progress is not None:
                progress.update(1)
        for kind, ts in tasks.items():
            res[f"acc_{kind}"] = []
            for t in ts:
                res[f"acc_{kind}"].append(float(retrieval_sample(model, t)))
                if progress is not None:
                    progress.update(1)
    res["acc"] = [x for kind in tasks for x in res[f"acc_{kind}"]]
    res["acc_depth"] = [t.nominal_depth for ts in tasks.values() for t in ts]
    return res


# ------------------------------------------------------------------------------- statistics

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
    """Means per metric and gap recoveries per thrift configuration and length."""
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
            if cfg is not None and cfg.method == "thrift":
                base = MethodConfig("fp4", cfg.quant_format, bulk_math=cfg.bulk_math).name
                if base in rl:
                    for metric, hb in (("nll", False), ("acc", True)):
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
                     "| acc | recovery NLL [95% CI] | recovery acc [95% CI] |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
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
                         f"{rec('recovery_acc')} |")
        for name, e in s["methods"].items():
            if not name.startswith("thrift/") and e.get("acc_by_depth"):
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
            if c.method != "thrift" or e is None or f"recovery_{metric}" not in e:
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


# ------------------------------------------------------------------------------------- main

def run(model_dir: str, lengths: list[int], samples: int, out_dir: str,
        configs: list[MethodConfig], device: str | None = None, impl: str = "auto",
        resume: bool = True, n_boot: int = 1000, task_kinds=qdata.TASK_KINDS,
        stdlib: str | None = None, max_minutes: float | None = None) -> dict:
    """Evaluate ``configs`` at ``lengths``; results accumulate in ``OUT/results.json`` (a rerun
    with ``resume`` skips finished (length, method) pairs, so long grids can be split over
    several commands). Returns the JSON written."""
    t0 = time.time()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "results.json"
    prev = json.loads(res_path.read_text()) if resume and res_path.exists() else {}
    if prev and (prev.get("model") != os.path.abspath(model_dir)
                 or prev.get("samples") != samples):
        print("[quality] results.json is from another model or sample count: starting over")
        prev = {}
    results: dict = prev.get("results", {})
    model = load_model(model_dir, device)
    corpus = qdata.load_corpus(stdlib)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    todo = [(L, c) for L in lengths for c in configs if c.name not in results.get(str(L), {})]
    per = samples * (1 + len(task_kinds))
    bar = tqdm(total=len(todo) * per, desc="quality", unit="fwd") if tqdm else None
    stopped = False
    data_cache: dict = {}
    for L, cfg in todo:
        if max_minutes is not None and time.time() - t0 > max_minutes * 60:
            stopped = True
            break
        if L not in data_cache:
            data_cache[L] = (qdata.heldout_windows(corpus.heldout, L - 1, samples),
                             {k: qdata.eval_tasks(k, L, samples, corpus.heldout)
                              for k in task_kinds})
        windows, tasks = data_cache[L]
        if bar is not None:
            bar.set_postfix_str(f"L={L} {cfg.name}")
        ts = time.time()
        r = evaluate_config(model, cfg, L, windows, tasks, impl, bar)
        r["seconds"] = [time.time() - ts]
        results.setdefault(str(L), {})[cfg.name] = r
        _write(res_path, model_dir, samples, lengths, configs, results, None, device)
    if bar is not None:
        bar.close()
    summary = summarize(results, configs, lengths, n_boot)
    doc = _write(res_path, model_dir, samples, lengths, configs, results, summary, device)
    doc["complete"] = not stopped
    table = format_table(summary, configs)
    (out / "table.md").write_text(table + "\n")
    try:
        png = pareto_plot(summary, configs, out / "pareto.png")
        if png is None:
            print("[quality] matplotlib is not installed: skipping pareto.png")
    except Exception as e:  # the plot must never cost the table
        png = None
        print(f"[quality] pareto.png failed: {type(e).__name__}: {e}")
    if stopped:
        print(f"[quality] stopped after --max-minutes; rerun the same command to continue "
              f"({res_path})")
    print(f"[quality] wrote {res_path}, {out / 'table.md'}" + (f", {png}" if png else ""))
    print(table)
    return doc


def _write(path, model_dir, samples, lengths, configs, results, summary, device) -> dict:
    doc = {"model": os.path.abspath(model_dir), "samples": samples, "lengths": lengths,
           "device": str(device), "torch": torch.__version__,
           "configs": [dict(asdict(c), name=c.name) for c in configs],
           "metric_notes": "nll: nats/byte; acc: teacher-forced exact match of answer bytes; "
                           "recovery = (m_thrift - m_fp4) / (m_fp16 - m_fp4), paired bootstrap",
           "results": results, "summary": summary}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, allow_nan=True) + "\n")
    os.replace(tmp, path)
    return doc

