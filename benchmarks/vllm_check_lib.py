"""Comparison helpers, prompts, generation wrappers and the Runner base of
benchmarks/vllm_gpu_check.py (see that script's docstring for the checks and tolerances).

Importable without vLLM or CUDA (imports are inside functions); the pure helpers are unit-
tested on CPU by tests/test_vllm_gpu_scripts.py through the script.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence

from vllm_bench_common import (
    dump_json,
    engine_capacity,
    free_gpu,
    make_dummy_llama8b,
    make_tiny,
    thrift_config,
)

TIE_TOL = 0.05  # nats: a flipped token is accepted if both engines rank the pair this close
LP_TOL = 0.10  # nats: chosen-token logprob difference allowed on the common prefix
TF_MEAN_TOL = 0.02  # nats: teacher-forced mean |dlogprob|
TF_MAX_TOL = 0.30  # nats: teacher-forced max |dlogprob|
# Each tolerance is at least this many times the reference backend's disagreement with itself
# under another batching (RunnerBase.set_noise_floor): bf16 logits in [8, 16) are 0.0625 apart.
NOISE_FACTOR = 2.0
NEW_TOKENS = 64
TOP_LOGPROBS = 5

SENTENCES = (
    "The quick brown fox jumps over the lazy dog while the cat watches from the window.",
    "In 1905 Einstein published four papers that changed physics: on the photoelectric effect,",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + ",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is",
    "Attention is all you need, they said; but memory bandwidth is what you pay for, and",
)


# ---------------------------------------------------------------------------------------------
# Pure helpers (no vLLM, no CUDA): unit-tested on CPU by tests/test_vllm_gpu_scripts.py
# ---------------------------------------------------------------------------------------------
def compare_greedy(ref_ids: Sequence[int], ref_lps: Sequence[dict[int, float]],
                   ids: Sequence[int], lps: Sequence[dict[int, float]],
                   tie_tol: float = TIE_TOL, lp_tol: float = LP_TOL) -> dict:
    """Compare one greedy continuation with the reference's.

    ``*_lps[i]`` maps token id -> logprob at output position ``i`` (vLLM's top-k plus the chosen
    token). Returns ``{"ok", "status", "n", "first_diff", "max_lp_diff", "tie_gap"}`` where status
    is ``exact`` (same tokens, logprobs within ``lp_tol``), ``near_tie`` (first difference is a
    near tie: the reference ranks the candidate's token within ``tie_tol`` of its own and vice
    versa), ``mismatch``, ``lp_drift`` (same tokens but a logprob differs by more than
    ``lp_tol``) or ``length`` (one continuation is a strict prefix of the other).
    """
    n = min(len(ref_ids), len(ids))
    first = next((i for i in range(n) if ref_ids[i] != ids[i]), None)
    upto = n if first is None else first
    max_lp = 0.0
    for i in range(min(upto, len(ref_lps), len(lps))):
        a, b = ref_lps[i].get(ref_ids[i]), lps[i].get(ids[i])
        if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
            max_lp = math.inf
        else:
            max_lp = max(max_lp, abs(a - b))
    out = {"n": n, "first_diff": first, "max_lp_diff": max_lp, "tie_gap": None}
    if max_lp > lp_tol:
        return {**out, "ok": False, "status": "lp_drift"}
    if first is None:
        if len(ref_ids) != len(ids):
            return {**out, "ok": False, "status": "length"}
        return {**out, "ok": True, "status": "exact"}
    r, c = ref_ids[first], ids[first]
    ref_pos = ref_lps[first] if first < len(ref_lps) else {}
    cand_pos = lps[first] if first < len(lps) else {}
    gap_ref = ref_pos.get(r, math.inf) - ref_pos.get(c, -math.inf)
    gap_cand = cand_pos.get(c, math.inf) - cand_pos.get(r, -math.inf)
    gap = max(gap_ref, gap_cand)
    ok = gap <= tie_tol
    return {**out, "tie_gap": gap, "ok": ok, "status": "near_tie" if ok else "mismatch"}


def compare_prompt_logprobs(ref: Sequence[float | None], cand: Sequence[float | None],
                            mean_tol: float = TF_MEAN_TOL, max_tol: float = TF_MAX_TOL) -> dict:
    """Teacher-forced comparison: per-position logprobs of the actual tokens (``None`` where a
    position has none, e.g. the first prompt token). Returns ``{"ok", "n", "mean", "max"}``."""
    if len(ref) != len(cand):
        return {"ok": False, "n": min(len(ref), len(cand)), "mean": math.inf, "max": math.inf,
                "error": f"lengths differ: {len(ref)} vs {len(cand)}"}
    diffs = []
    for a, b in zip(ref, cand, strict=True):
        if a is None and b is None:
            continue
        if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
            diffs.append(math.inf)
        else:
            diffs.append(abs(a - b))
    mean = sum(diffs) / len(diffs) if diffs else 0.0
    mx = max(diffs, default=0.0)
    return {"ok": mean <= mean_tol and mx <= max_tol, "n": len(diffs), "mean": mean, "max": mx}


def summarize_comparisons(results: Sequence[dict]) -> tuple[bool, str]:
    """All ok? and a one-line count such as ``exact 5, near_tie 1, mismatch 0 (worst lp 0.012)``."""
    counts: dict[str, int] = {}
    worst = 0.0
    for r in results:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
        worst = max(worst, r.get("max_lp_diff", 0.0))
    text = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    return all(r["ok"] for r in results), f"{text} (worst lp diff {worst:.3g})"


def token_prompts(vocab_size: int, max_len: int, long_len: int, seed: int = 0
                  ) -> dict[str, list[list[int]]]:
    """Prompt sets as token ids: ``short`` (6 prompts, 20-200 tokens), ``long`` (one prompt of
    ``long_len``), ``preempt`` (8 prompts of ~``max_len`` tokens). Byte-level vocabularies
    (<= 512) get UTF-8 bytes of English text (token b = byte b, as the project's model);
    larger ones random ids in [300, vocab)."""
    import random

    rng = random.Random(seed)
    if vocab_size <= 512:
        text = " ".join(SENTENCES)

        def make(i: int, n: int) -> list[int]:
            data = (SENTENCES[i % len(SENTENCES)] + " " + text * (1 + n // len(text))).encode()
            return list(data[:n])
    else:
        def make(i: int, n: int) -> list[int]:
            return [rng.randrange(300, vocab_size) for _ in range(n)]

    short_lens = (20, 48, 77, 120, 160, 200)
    return {
        "short": [make(i, n) for i, n in enumerate(short_lens)],
        "long": [make(7, long_len)],
        "preempt": [make(10 + i, max_len - 16 * (i % 4)) for i in range(8)],
    }


def format_table(checks: Sequence[dict]) -> str:
    rows = [("check", "result", "seconds", "detail")]
    rows += [(c["name"], "PASS" if c["ok"] else "FAIL", f"{c.get('seconds', 0):.0f}",
              c.get("detail", "")[:110]) for c in checks]
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"| {a:<{w[0]}} | {b:<{w[1]}} | {s:>{w[2]}} | {d}" for a, b, s, d in rows]
    lines.insert(1, f"|{'-' * (w[0] + 2)}|{'-' * (w[1] + 2)}|{'-' * (w[2] + 2)}|---")
    return "\n".join(lines)


def resolve_model(arg: str, workdir: str) -> tuple[str, bool, dict]:
    """``(path, dummy_weights, config.json)`` for ``--model``."""
    if arg == "dummy8b":
        path, dummy = make_dummy_llama8b(os.path.join(workdir, "llama8b_dummy")), True
    elif arg == "tiny":
        path, dummy = make_tiny(os.path.join(workdir, "tiny_llama")), False
    else:
        path, dummy = arg, False
    with open(os.path.join(path, "config.json")) as f:
        return path, dummy, json.load(f)



# ---------------------------------------------------------------------------------------------
# Generation wrappers and run checks (vLLM imported lazily)
# ---------------------------------------------------------------------------------------------
def greedy(llm, prompts: Sequence[list[int]], budgets: Sequence[float | None] | None = None,
           salt: bool = True, new_tokens: int = NEW_TOKENS) -> list[dict]:
    """Greedy continuations with top-k logprobs; ``budgets[i]`` -> ``extra_args``."""
    from vllm import SamplingParams

    budgets = list(budgets) if budgets is not None else [None] * len(prompts)
    reqs, sps = [], []
    for p, b in zip(prompts, budgets, strict=True):
        req: dict = {"prompt_token_ids": list(p)}
        extra = None
        if b is not None:
            extra = {"fp16_budget": b}
            if salt:
                req["cache_salt"] = f"fp16_budget={b}"
        reqs.append(req)
        sps.append(SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True,
                                  logprobs=TOP_LOGPROBS, seed=0, extra_args=extra))
    outs = llm.generate(reqs, sps, use_tqdm=False)
    res = []
    for o in outs:
        c = o.outputs[0]
        lps = [{int(t): float(lp.logprob) for t, lp in pos.items()} for pos in (c.logprobs or [])]
        res.append({"ids": list(c.token_ids), "lps": lps})
    return res


def teacher_forced(llm, sequences: Sequence[list[int]], budget: float | None = None
                   ) -> list[list[float | None]]:
    """Logprob of every actual token of each sequence (prefill only, ``prompt_logprobs``)."""
    from vllm import SamplingParams

    extra = None if budget is None else {"fp16_budget": budget}
    sp = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1, extra_args=extra)
    # a budget changes every later layer's K/V: never share cached blocks across budgets
    salt = {} if budget is None else {"cache_salt": f"fp16_budget={budget}"}
    outs = llm.generate([{"prompt_token_ids": list(s), **salt} for s in sequences], sp,
                        use_tqdm=False)
    res = []
    for seq, o in zip(sequences, outs, strict=True):
        row: list[float | None] = []
        for tok, pos in zip(seq, o.prompt_logprobs or [], strict=False):
            lp = None if pos is None else pos.get(tok)
            row.append(None if lp is None else float(lp.logprob))
        res.append(row)
    return res


def fp32_teacher_forced(model_path: str, sequences: Sequence[list[int]]
                        ) -> list[list[float | None]]:
    """The same per-token logprobs as :func:`teacher_forced`, from transformers in float32 (the
    truth both bf16 engines are rounded from; real weights only: vLLM's dummy weights exist
    only inside vLLM). Runs on CUDA when present and frees it again before vLLM starts."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device)
    res = []
    try:
        with torch.no_grad():
            for seq in sequences:
                ids = torch.tensor([list(seq)], device=device)
                lp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
                picked = lp[:-1].gather(1, ids[0, 1:, None])[:, 0].tolist()
                res.append([None, *picked])
    finally:
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return res


def finite_run(results: Sequence[dict], new_tokens: int = NEW_TOKENS) -> tuple[bool, str]:
    """Budget-below-1 runs: right length and finite logprobs (agreement is informational)."""
    bad = [i for i, r in enumerate(results)
           if len(r["ids"]) != new_tokens
           or any(not math.isfinite(pos.get(t, math.nan)) for t, pos in zip(r["ids"], r["lps"],
                                                                            strict=False))]
    return not bad, f"{len(results) - len(bad)}/{len(results)} complete and finite"


def agreement(ref: Sequence[dict], cand: Sequence[dict]) -> str:
    lens = []
    for a, b in zip(ref, cand, strict=True):
        n = min(len(a["ids"]), len(b["ids"]))
        lens.append(next((i for i in range(n) if a["ids"][i] != b["ids"][i]), n))
    return f"tokens agreeing with ref before the first difference: {lens}"


# ---------------------------------------------------------------------------------------------
# The run: bookkeeping and engines (the phases are vllm_gpu_check.Runner's)
# ---------------------------------------------------------------------------------------------
class RunnerBase:
    """Bookkeeping (checks, JSON), engine start/teardown and the comparisons of vllm_gpu_check's
    Runner; the phases live in the script."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.time()
        self.checks: list[dict] = []
        self.engines: dict[str, dict] = {}
        self.meta: dict = {"argv": sys.argv[1:]}
        self.ref: dict[str, list[dict]] = {}
        # our backend's own budget-1.0 outputs of the preempt prompts, run without preemption,
        # per mode ("eager" / "graphs"): the preemption check's same-numerics reference
        self.own: dict[str, list[dict]] = {}
        self.ref_tf: list[list[float | None]] = []

    # -- bookkeeping --------------------------------------------------------------------------
    def record(self, name: str, ok: bool, detail: str, seconds: float = 0.0, **data) -> None:
        c = {"name": name, "ok": bool(ok), "detail": detail, "seconds": seconds, **data}
        self.checks.append(c)
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
        self.dump()

    def check(self, name: str, fn: Callable[[], tuple[bool, str] | tuple[bool, str, dict]]
              ) -> None:
        t = time.time()
        try:
            res = fn()
            data = res[2] if len(res) > 2 else {}
            self.record(name, res[0], res[1], time.time() - t, **data)
        except Exception as e:
            self.record(name, False, f"{type(e).__name__}: {e}", time.time() - t,
                        traceback=traceback.format_exc()[-3000:])

    def dump(self) -> None:
        if not self.args.out:
            return
        dump_json(self.args.out, {"meta": self.meta, "engines": self.engines,
                                  "checks": self.checks})

    def time_left(self) -> float:
        return self.args.time_budget - (time.time() - self.t0)

    # -- engines ------------------------------------------------------------------------------
    def llm_kwargs(self, **over) -> dict:
        a = self.args
        kw = dict(model=self.model, dtype=a.dtype, seed=0, max_model_len=self.max_len,
                  gpu_memory_utilization=a.gpu_memory_utilization, disable_log_stats=False,
                  enable_prefix_caching=True, max_num_seqs=32)
        if self.dummy:
            kw["load_format"] = "dummy"
        kw.update(over)
        if a.all_eager:
            kw["enforce_eager"] = True
        return kw

    def thrift_config(self, budget: float) -> dict:
        return {"thrift_vllm": thrift_config(self.args, budget)}

    def with_engine(self, name: str, kwargs: dict, body: Callable[[object], None],
                    checks_if_down: Sequence[str]) -> None:
        from vllm import LLM

        if self.time_left() < self.args.engine_reserve_s:
            for c in checks_if_down:
                self.record(c, False, f"skipped: {self.time_left():.0f}s left of "
                                      f"--time-budget (engine {name} not started)")
            return
        t = time.time()
        llm = None
        try:
            llm = LLM(**kwargs)
        except Exception as e:
            msg = f"engine {name} failed to start: {type(e).__name__}: {str(e)[-400:]}"
            tb = traceback.format_exc()[-3000:]
            for c in checks_if_down:
                self.record(c, False, msg, time.time() - t, traceback=tb)
            free_gpu(None)
            return
        try:
            info = {"startup_s": round(time.time() - t, 1), **engine_capacity(llm),
                    "kwargs": {k: v for k, v in kwargs.items() if k != "model"}}
            self.engines[name] = info
            print(f"[{name}] up in {info['startup_s']}s, KV capacity {info['capacity_tokens']} "
                  f"tokens ({info['num_gpu_blocks']} x {info['block_size']})", flush=True)
            body(llm)
        except Exception as e:  # checks record their own failures; this is anything else
            self.record(f"{name}_engine", False, f"{type(e).__name__}: {e}",
                        traceback=traceback.format_exc()[-3000:])
        finally:
            free_gpu(llm)

    def tolerances(self) -> dict[str, float]:
        """The tolerances in force: the command line's, widened by the noise floor."""
        a = self.args
        tol = {"tie": a.tie_tol, "lp": a.lp_tol, "tf_mean": a.tf_mean_tol, "tf_max": a.tf_max_tol}
        for k, v in getattr(self, "noise_tol", {}).items():
            tol[k] = max(tol[k], v)
        return tol

    def set_noise_floor(self, greedy_alt: Sequence[dict], greedy_ref: Sequence[dict],
                        tf_alt: list[list[float | None]], what: str = "reference vs itself "
                        "one request at a time") -> tuple[bool, str, dict]:
        """Widen the tolerances by how far two runs that are both right disagree: the reference
        with itself in another batch composition (bf16 GEMMs and attention round differently by
        batch size), or another stock backend (``--peer``). A budget-1 thrift engine cannot be
        held closer to the reference than those. Each tolerance becomes max(command line,
        NOISE_FACTOR x the largest disagreement seen so far)."""
        same = [compare_greedy(r["ids"], r["lps"], g["ids"], g["lps"], 0.0, math.inf)
                for r, g in zip(greedy_ref, greedy_alt, strict=True)]
        tf = [compare_prompt_logprobs(r, g, math.inf, math.inf)
              for r, g in zip(self.ref_tf, tf_alt, strict=True)]
        finite = [x for x in [c["max_lp_diff"] for c in same]
                  + [c["tie_gap"] or 0.0 for c in same] if math.isfinite(x)]
        lp = max(finite, default=0.0)
        tf_mean = max((c["mean"] for c in tf if math.isfinite(c["mean"])), default=0.0)
        tf_max = max((c["max"] for c in tf if math.isfinite(c["max"])), default=0.0)
        seen = {"tie": lp, "lp": lp, "tf_mean": tf_mean, "tf_max": tf_max}
        old = getattr(self, "noise_tol", {})
        self.noise_tol = {k: max(old.get(k, 0.0), NOISE_FACTOR * v) for k, v in seen.items()}
        flips = sum(c["first_diff"] is not None for c in same)
        tol = self.tolerances()
        text = (f"{what}: {flips}/{len(same)} continuations differ, worst logprob/tie gap "
                f"{lp:.3g}, teacher-forced worst mean {tf_mean:.3g} max {tf_max:.3g} -> "
                "tolerances " + ", ".join(f"{k} {v:.3g}" for k, v in tol.items()))
        return True, text, {"noise": {"greedy": same, "tf": tf}, "tolerances": tol}

    def compare_set(self, got: Sequence[dict], ref: Sequence[dict]) -> tuple[bool, str, dict]:
        tol = self.tolerances()
        cmp = [compare_greedy(r["ids"], r["lps"], g["ids"], g["lps"], tol["tie"], tol["lp"])
               for r, g in zip(ref, got, strict=True)]
        ok, text = summarize_comparisons(cmp)
        return ok, text, {"comparisons": cmp}

    def compare_tf(self, got: list[list[float | None]]) -> tuple[bool, str, dict]:
        tol = self.tolerances()
        cmp = [compare_prompt_logprobs(r, g, tol["tf_mean"], tol["tf_max"])
               for r, g in zip(self.ref_tf, got, strict=True)]
        ok = all(c["ok"] for c in cmp)
        mean = max((c["mean"] for c in cmp), default=0.0)
        mx = max((c["max"] for c in cmp), default=0.0)
        return ok, (f"{len(cmp)} sequences, {sum(c['n'] for c in cmp)} positions: worst mean "
                    f"{mean:.3g} (tol {tol['tf_mean']:.3g}), max {mx:.3g} (tol "
                    f"{tol['tf_max']:.3g})"), {"comparisons": cmp}
