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
through ``thrift_vllm.attention``, as above. ``"nvfp4"`` / ``"auto"``: the paged vLLM backend's
semantics in a **two-step evaluation** (step 1 = the context, step 2 = the scored queries, which
see step-1 tokens only through the layout's storage): see ``paged_eval.py``. Gap recovery
(paired bootstrap), the summary, table and plot: ``report.py``.

The model is loaded with transformers; a custom attention implementation ``"thrift"`` is
registered in ``AttentionInterface`` (and a mask function returning None in
``AttentionMaskInterface``: single unpadded sequences, causal inside the operator). The model
runs in bf16 on CUDA and fp32 on CPU; on CPU q/k/v are cast to fp16 for the operator (the
operator takes fp16/bf16 only) and the result back to fp32 (a paged layout's model dtype is then
fp16; bf16 on CUDA).

Modules (imports flow one way): ``harness`` (attention routing, evaluation, ``run``) imports
``report`` (statistics, output) and ``paged_eval`` (paged caches, two-step logits), which import
only ``methods`` (the configs), which imports none of them. The public names of ``methods``,
``report`` and ``paged_eval.PagedState`` are re-exported here.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from thrift_vllm.quality import data as qdata
from thrift_vllm.quality import paged_eval
from thrift_vllm.quality.methods import (
    KV_LAYOUTS,
    MethodConfig,
    fp16_share,
    kv_config,
    method_grid,
    nll_split,
)
from thrift_vllm.quality.paged_eval import PagedState
from thrift_vllm.quality.report import bootstrap_recovery, format_table, pareto_plot, summarize

__all__ = [
    "ATTN_NAME", "KV_LAYOUTS", "MethodConfig", "PagedState", "bootstrap_recovery",
    "evaluate_config", "format_table", "fp16_share", "kv_config", "load_model", "method_grid",
    "nll_sample", "nll_split", "pareto_plot", "register", "retrieval_sample", "run", "summarize",
    "thrift_attention_forward", "use_method",
]

ATTN_NAME = "thrift"
_CURRENT: dict = {}


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


def nll_sample(model, window: bytes, two_step: bool = False) -> tuple[float, float]:
    """(mean NLL per byte, mean over the last quarter) of ``[BOS] + window``; ``two_step``: the
    last quarter's queries run as step 2 (``nll_split``; paged methods)."""
    ids = [qdata.BOS, *window]
    if two_step:
        logits = paged_eval.nll_logits(model, _CURRENT.get("paged"), ids)
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
        pred = paged_eval.answer_predictions(model, _CURRENT.get("paged"), ids, s1)
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

