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

KV layouts (``MethodConfig.kv_layout``). ``"operator"`` (default): one prefill call per sample
through ``thrift_vllm.attention``, as above. ``"nvfp4"`` (names ``fp16-kv4/F``, ``fp4-kv4/F/bf16``,
``thrift-kv4/F/bf16/SEL/B%`` = budget 1, 0, B) and ``"auto"`` (``*-kvauto/...``): the paged
vLLM backend's semantics, ``thrift_vllm.paged`` (CPU) / ``thrift_vllm.ops`` (Triton, CUDA), in a
**two-step evaluation**. Every layer holds a paged cache of the layout (page = selection unit);
each step writes its K/V (``write_kv``) and then attends over the cache (``paged_attention``),
exactly what the backend does for one sequence. Step 1 = the context, all its K/V fresh (the
layout's prefill semantics); step 2 = the scored queries, which see step-1 tokens only through
the layout's storage. In the nvfp4 layout (FP4 only, V along head_dim) that means: FP16 blocks
read dequantised FP4 K/V for step-1 tokens and the fresh model-dtype K/V for step-2 tokens, the
FP4 blocks read the stored FP4, selection scores the stored (dequantised) keys; budget 1 is exact
attention on those FP16-path tensors, so it is *not* fp16. The split:

* NLL: ``[BOS] + window`` of ``L`` ids, ``q = (L - 1) // 4`` (the ``nll_tail`` positions). Step 1
  = ids ``[0, L - 1 - q)``, step 2 = ids ``[L - 1 - q, L - 1)``: the ``q`` queries whose logits
  predict the last ``q`` bytes. ``nll_tail`` is scored on step 2 only; ``nll`` also pools the step-1
  predictions (prefill semantics of the layout).
* Retrieval: step 1 = ``[BOS] + prompt[:-1]``, step 2 = ``prompt[-1:] + answer[:-1]``: the
  queries whose argmax is scored (every answer byte, the first one included, is predicted from a
  cache holding the context in the layout's storage; the step's own tokens are fresh, i.e. the
  answer is teacher-forced as one chunk, not one decode step per byte).

Gap recovery of a thrift configuration: ``(m_thrift - m_fp4) / (m_fp16 - m_fp4)`` with ``m``
the mean accuracy, or the negated NLL, against the fp4 run of the same ``quant_format`` and
``bulk_math``; 95 % confidence intervals by a paired bootstrap over samples (1000 resamples).
``recovery_nll_tail``: the same on ``nll_tail``. The paged rows (kv layouts) are compared with the
operator's fp16 and fp4 (``fp4/F/bf16``) rows on the same samples and the same scored positions:
``recovery_nll_tail`` and ``recovery_acc`` (not ``recovery_nll``: their first three quarters are
prefill). fp16 needs no two-step run (exact attention does not depend on the split).

The model is loaded with transformers; a custom attention implementation ``"thrift"`` is
registered in ``AttentionInterface`` (and a mask function returning None in
``AttentionMaskInterface``: single unpadded sequences, causal inside the operator). The model
runs in bf16 on CUDA and fp32 on CPU; on CPU q/k/v are cast to fp16 for the operator (the
operator takes fp16/bf16 only) and the result back to fp32 (a paged layout's model dtype is then
fp16; bf16 on CUDA).
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


KV_LAYOUTS = ("operator", "nvfp4", "auto")
_KV_TAG = {"nvfp4": "kv4", "auto": "kvauto"}


@dataclass(frozen=True)
class MethodConfig:
    method: str  # fp16 | fp4 | thrift
    quant_format: str = "nvfp4"
    fp16_budget: float = 0.0
    selection: str = "block_mean"
    force_sink_recent: bool = False
    bulk_math: str = "bf16"
    block_size: int = 64
    kv_layout: str = "operator"  # operator (one prefill) | nvfp4 / auto (paged, two steps)

    def __post_init__(self):
        if self.kv_layout not in KV_LAYOUTS:
            raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}, got {self.kv_layout!r}")
        if self.paged and self.bulk_math != "bf16":
            raise ValueError("the paged path computes FP4 exactly: bulk_math must be bf16")

    @property
    def paged(self) -> bool:
        return self.kv_layout != "operator"

    @property
    def budget(self) -> float:
        """The FP16 budget the method amounts to (fp16 -> 1, fp4 -> 0)."""
        return {"fp16": 1.0, "fp4": 0.0}.get(self.method, self.fp16_budget)

    @property
    def name(self) -> str:
        pre = self.method + (f"-{_KV_TAG[self.kv_layout]}" if self.paged else "")
        if self.method == "fp16":
            return f"{pre}/{self.quant_format}" if self.paged else pre
        if self.method == "fp4":
            return f"{pre}/{self.quant_format}/{self.bulk_math}"
        sel = self.selection + ("+sr" if self.force_sink_recent else "")
        return (f"{pre}/{self.quant_format}/{self.bulk_math}/{sel}/"
                f"{100 * self.fp16_budget:g}%")

    @property
    def selection_label(self) -> str:
        return self.selection + ("+sr" if self.force_sink_recent else "")

    def operator_kwargs(self) -> dict:
        return dict(method=self.method, quant_format=self.quant_format,
                    fp16_budget=self.budget, selection=self.selection,
                    force_sink_recent=self.force_sink_recent,
                    bulk_math=self.bulk_math, block_size=self.block_size)

    def kv_layout_obj(self, head_size: int, dtype: torch.dtype):
        """The paged layout of a kv-layout config (page = one selection unit)."""
        from thrift_vllm.kv_layout import KVLayout

        return KVLayout(self.kv_layout, head_size, self.block_size, self.block_size,
                        self.quant_format, self.selection, dtype)


def kv_config(kv_layout: str, quant_format: str, budget: float, selection: str = "block_mean",
              force_sink_recent: bool = False) -> MethodConfig:
    """A paged config: budget 0 -> method fp4, 1 -> fp16 (selection then does not matter)."""
    method = {0.0: "fp4", 1.0: "fp16"}.get(float(budget), "thrift")
    if method != "thrift":
        selection, force_sink_recent, budget = "block_mean", False, 0.0
    return MethodConfig(method, quant_format, float(budget), selection, force_sink_recent,
                        kv_layout=kv_layout)


def nll_split(length: int) -> tuple[int, int]:
    """(step-1 ids, step-2 ids) of an NLL sample of ``length`` ids: the last ``(L - 1) // 4``
    predictions (``nll_tail``) come from step 2."""
    q = max(1, (length - 1) // 4)
    return length - 1 - q, q


def _share(budget: float, sq: int, skv: int, block_size: int) -> float:
    from thrift_vllm.selection import BlockGrid, budget_to_k

    grid = BlockGrid(sq, skv, block_size, True)
    k = budget_to_k(budget, grid)
    first, step, rows = grid.candidate_counts()
    counts = [first + step * r for r in range(rows)]
    return sum(min(k, c) for c in counts) / sum(counts)


def fp16_share(cfg: MethodConfig, length: int) -> float:
    """Actual share of causal candidate blocks computed in FP16 (the operator's budget -> k rule,
    ``thrift_vllm.selection.budget_to_k``): for a full prefill of ``length``, or, for a paged
    config, for the NLL sample's step 2 (``nll_split``)."""
    if cfg.method != "thrift":
        return cfg.budget
    if cfg.paged:
        s1, s2 = nll_split(length)
        return _share(cfg.fp16_budget, s2, s1 + s2, cfg.block_size)
    return _share(cfg.fp16_budget, length, length, cfg.block_size)


def method_grid(formats=("nvfp4", "mxfp4"), thrift_formats=("nvfp4",),
                budgets=(0.01, 0.025, 0.05, 0.10, 0.25),
                selections=("block_mean", "quest", "local", "block_mean+sr", "quest+sr"),
                bulk_maths=("bf16", "fp8"), kv_layouts=("operator",),
                kv_budgets=(0.0, 0.025, 0.05, 0.10, 0.25, 1.0),
                kv_selections=("block_mean", "quest")) -> list[MethodConfig]:
    """fp16, fp4 per format and bulk math, thrift per format x bulk math x selection x budget
    (when ``"operator"`` is in ``kv_layouts``), then per paged layout ("nvfp4", "auto") and
    thrift format the paged rows at ``kv_budgets`` (0 and 1 once, not per selection) x
    ``kv_selections``, bulk math bf16, plus the ``fp4/F/bf16`` baseline their recovery needs.
    A selection ``"X+sr"`` is selection X with ``force_sink_recent``."""
    out = [MethodConfig("fp16")]
    fmts = list(dict.fromkeys([*formats, *thrift_formats]))
    for bm in bulk_maths:
        for f in fmts:
            out.append(MethodConfig("fp4", f, bulk_math=bm))
        if "operator" not in kv_layouts:
            continue
        for f in thrift_formats:
            for sel in selections:
                base, sr = _split_sel(sel)
                for b in budgets:
                    out.append(MethodConfig("thrift", f, b, base, sr, bm))
    for lay in kv_layouts:
        if lay == "operator":
            continue
        for f in thrift_formats:
            out.append(MethodConfig("fp4", f))
            # fp4-kv4, fp16-kv4 once (the selection does not matter), first
            out += [kv_config(lay, f, b) for b in (0.0, 1.0) if b in kv_budgets]
            out += [kv_config(lay, f, b, *_split_sel(sel)) for sel in kv_selections
                    for b in kv_budgets if 0.0 < b < 1.0]
    return list(dict.fromkeys(out))


def _split_sel(sel: str) -> tuple[str, bool]:
    return (sel[:-3], True) if sel.endswith("+sr") else (sel, False)


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
    if "paged" in _CURRENT:
        out = _CURRENT["paged"].step(module.layer_idx, query, key, value, scaling, op_dt)
        return out.to(dt)[None], None
    out = thrift_vllm.attention(query.to(op_dt), key.to(op_dt), value.to(op_dt), causal=True,
                                sm_scale=scaling, impl=_CURRENT.get("impl", "auto"),
                                **_CURRENT["kwargs"])
    return out.to(dt).transpose(1, 2).contiguous(), None


class PagedState:
    """Per-layer paged caches of one sample (a paged config): every attention call is one step
    of one sequence, written then attended exactly like the vLLM backend does
    (``write_kv`` + ``paged_attention``: ``thrift_vllm.paged`` on the PyTorch path,
    ``thrift_vllm.ops`` Triton kernels when ``impl`` is triton or auto on CUDA)."""

    def __init__(self, cfg: MethodConfig, impl: str = "auto"):
        self.cfg, self.impl = cfg, impl
        self.capacity = 0
        self.caches: dict[int, torch.Tensor] = {}
        self.written: dict[int, int] = {}

    def reset(self, capacity: int) -> None:
        """Start a new sequence of at most ``capacity`` tokens (fresh zeroed caches)."""
        self.capacity = capacity
        self.caches.clear()
        self.written.clear()

    def step(self, layer: int, query, key, value, scaling, op_dt) -> torch.Tensor:
        """q ``[1, Hq, T, D]``, k/v ``[1, Hkv, T, D]`` (this step's tokens, after RoPE) ->
        ``[T, Hq, D]``: write the step's K/V behind the layer's earlier steps, then attend."""
        if query.shape[0] != 1:
            raise RuntimeError("paged evaluation takes one sequence at a time")
        q, k, v = (t[0].transpose(0, 1).to(op_dt).contiguous() for t in (query, key, value))
        T, Hkv, D = k.shape
        layout = self.cfg.kv_layout_obj(D, op_dt)
        start = self.written.get(layer, 0)
        skv = start + T
        if skv > self.capacity:
            raise RuntimeError(f"step ends at {skv} > capacity {self.capacity}")
        n_pages = -(-self.capacity // layout.page_size)
        if layer not in self.caches:
            self.caches[layer] = layout.allocate(n_pages, Hkv, q.device)
        cache = self.caches[layer]
        dev = q.device
        slots = torch.arange(start, skv, device=dev)
        table = torch.arange(n_pages, dtype=torch.int32, device=dev)[None]
        kw = dict(query_start_loc=[0, T], seq_lens=[skv], block_table=table,
                  fp16_budgets=[self.cfg.budget],
                  scale=float(scaling) if scaling is not None else D ** -0.5,
                  force_sink_recent=self.cfg.force_sink_recent)
        if self.impl == "triton" or (self.impl == "auto" and q.is_cuda):
            from thrift_vllm.ops.kv_write import write_kv_triton
            from thrift_vllm.ops.paged_attention import paged_attention_triton

            write_kv_triton(k, v, cache, slots, layout)
            out = paged_attention_triton(layout, cache, q, k, v, **kw)
        else:
            from thrift_vllm import paged

            views = layout.views(cache)
            paged.write_kv(layout, views, k, v, slots)
            out = paged.paged_attention(layout, views, q, k, v, **kw)
        self.written[layer] = skv
        return out


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
        if self.cfg.paged:
            _CURRENT["paged"] = PagedState(self.cfg, self.impl)
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


@torch.inference_mode()
def _logits_two_step(model, ids: list[int], split: int,
                     positions: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of ``ids`` run as two steps over the paged caches of the current (paged) method:
    ids ``[0, split)``, then ``[split, len)``, at their absolute positions (see module doc)."""
    state = _CURRENT.get("paged")
    if state is None:
        raise RuntimeError("two-step evaluation needs a paged method (use_method(kv config))")
    if not 0 < split < len(ids):
        raise ValueError(f"split {split} must lie inside the {len(ids)} ids")
    dev = next(model.parameters()).device
    x = torch.tensor([ids], dtype=torch.long, device=dev)
    pos = torch.arange(len(ids), device=dev)[None]
    state.reset(len(ids))
    h = torch.cat([model.model(input_ids=x[:, a:b], position_ids=pos[:, a:b],
                               use_cache=False).last_hidden_state[0]
                   for a, b in ((0, split), (split, len(ids)))])
    if positions is not None:
        h = h[positions.to(dev)]
    return model.lm_head(h).float()


def nll_sample(model, window: bytes, two_step: bool = False) -> tuple[float, float]:
    """(mean NLL per byte, mean over the last quarter) of ``[BOS] + window``; ``two_step``: the
    last quarter's queries run as step 2 (``nll_split``; paged methods)."""
    ids = [qdata.BOS, *window]
    if two_step:
        s1, s2 = nll_split(len(ids))
        logits = _logits_two_step(model, ids[:s1 + s2], s1)
    else:
        logits = _logits(model, ids)[:-1]
    tgt = torch.tensor(ids[1:], device=logits.device)
    nll = torch.nn.functional.cross_entropy(logits, tgt, reduction="none")
    q = max(1, nll.numel() // 4)
    return float(nll.mean()), float(nll[-q:].mean())


def retrieval_sample(model, task: qdata.Task, two_step: bool = False) -> bool:
    """Teacher-forced exact match of the answer bytes (see the module docstring); ``two_step``:
    the scored queries (last prompt byte + answer[:-1]) run as step 2 (paged methods)."""
    ids = [qdata.BOS, *task.prompt, *task.answer]
    n = len(task.answer)
    s1 = len(ids) - n - 1
    if two_step:
        pos = torch.arange(s1, len(ids) - 1)
        pred = _logits_two_step(model, ids[:-1], s1, pos).argmax(-1).tolist()
    else:
        pred = _logits(model, ids, torch.arange(s1, len(ids) - 1)).argmax(-1).tolist()
    return pred == list(task.answer)


def evaluate_config(model, cfg: MethodConfig, length: int, windows: list[bytes],
                    tasks: dict[str, list[qdata.Task]], impl: str = "auto",
                    progress=None) -> dict:
    res: dict = {"nll": [], "nll_tail": []}
    with use_method(cfg, impl):
        for w in windows:
            a, b = nll_sample(model, w, cfg.paged)
            res["nll"].append(a)
            res["nll_tail"].append(b)
            if progress is not None:
                progress.update(1)
        for kind, ts in tasks.items():
            res[f"acc_{kind}"] = []
            for t in ts:
                res[f"acc_{kind}"].append(float(retrieval_sample(model, t, cfg.paged)))
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
                           "recovery = (m_thrift - m_fp4) / (m_fp16 - m_fp4), paired bootstrap; "
                           "*-kv4 / *-kvauto: paged KV layout, two-step evaluation (step 2 = "
                           "the nll_tail queries / the answer queries), recoveries on nll_tail "
                           "and acc against fp16 and fp4/F/bf16",
           "results": results, "summary": summary}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, allow_nan=True) + "\n")
    os.replace(tmp, path)
    return doc

