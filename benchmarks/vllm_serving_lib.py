"""Constants, cases and pure helpers of benchmarks/vllm_serving.py and
benchmarks/vllm_server_sweep.py: backends, engine planning, capacity arithmetic, percentiles,
tables, prompts and the model (see vllm_serving.py's docstring for the benchmark).

Importable without vLLM or CUDA (imports are inside functions); unit-tested on CPU by
tests/test_vllm_gpu_scripts.py through vllm_serving.py.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from vllm_bench_common import make_dummy_llama8b, make_tiny

# Llama-3-8B shape
NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, VOCAB = 32, 8, 128, 128256

BACKENDS = {
    "FLASH_ATTN": {"attention_backend": "FLASH_ATTN", "kv_cache_dtype": "auto", "thrift": False},
    "TRITON_ATTN": {"attention_backend": "TRITON_ATTN", "kv_cache_dtype": "auto",
                    "thrift": False},
    # FA3 on fp8 (e4m3) pages: 2x the tokens of bf16, the first thing a Hopper user tries
    "FLASH_ATTN-fp8": {"attention_backend": "FLASH_ATTN", "kv_cache_dtype": "fp8",
                       "thrift": False},
    "thrift-auto": {"attention_backend": "CUSTOM", "kv_cache_dtype": "auto", "thrift": True},
    "thrift-nvfp4": {"attention_backend": "CUSTOM", "kv_cache_dtype": "nvfp4", "thrift": True},
}


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "prefill" | "decode" | "capacity" | "fit"
    n: int
    prompt_len: int
    new_tokens: int
    est_s: float  # rough seconds per budget on the H200 (time-budget planning)


CASES = {
    "capacity": Case("capacity", "capacity", 0, 0, 0, 0),
    "prefill32k": Case("prefill32k", "prefill", 4, 32768, 1, 25),
    "prefill128k": Case("prefill128k", "prefill", 1, 131072, 1, 40),
    "decode8k": Case("decode8k", "decode", 16, 8192, 256, 25),
    "decode32k": Case("decode32k", "decode", 16, 32768, 256, 70),
    # One request: the latency side (the server sweep's concurrency 1), where per-step fixed
    # costs (selection, split reduce, host work) weigh most.
    "decode1x32k": Case("decode1x32k", "decode", 1, 32768, 256, 15),
    "decode128k": Case("decode128k", "decode", 4, 131072, 256, 150),
    "fit32k": Case("fit32k", "fit", 0, 32768, 64, 200),
}
QUICK_CASES = {
    "capacity": CASES["capacity"],
    "prefill8k": Case("prefill8k", "prefill", 2, 8192, 1, 5),
    "decode4k": Case("decode4k", "decode", 8, 4096, 64, 8),
}
TABLE_CASES = ("prefill32k", "prefill128k", "prefill8k", "decode8k", "decode4k", "decode1x32k",
               "decode32k", "decode128k", "fit32k")


# ---------------------------------------------------------------------------------------------
# Pure helpers (unit-tested on CPU)
# ---------------------------------------------------------------------------------------------
def parse_list(text: str, kind=str) -> list:
    return [kind(x.strip()) for x in str(text).split(",") if x.strip()]


def percentile(values, q: float) -> float:
    """Linear-interpolated percentile ``q`` in [0, 100] of ``values`` (nan when empty)."""
    xs = sorted(float(v) for v in values)
    if not xs:
        return math.nan
    k = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def fit_requests(num_gpu_blocks: int, block_size: int, prompt_len: int = 32768,
                 new_tokens: int = 256) -> int:
    """How many requests of ``prompt_len + new_tokens`` tokens the KV pool holds at once."""
    if num_gpu_blocks <= 0 or block_size <= 0:
        return 0
    return num_gpu_blocks // blocks_for(prompt_len + new_tokens, block_size)


def stock_bytes_per_token(num_layers: int = NUM_LAYERS, num_kv_heads: int = NUM_KV_HEADS,
                          head_dim: int = HEAD_DIM, elem_bytes: int = 2) -> int:
    """vLLM's dense K+V bytes per token over all layers."""
    return num_layers * num_kv_heads * 2 * head_dim * elem_bytes


def thrift_bytes_per_token(kv_layout: str, block_size: int, unit: int = 64,
                           quant_format: str = "nvfp4", selection: str = "block_mean",
                           num_layers: int = NUM_LAYERS, num_kv_heads: int = NUM_KV_HEADS,
                           head_dim: int = HEAD_DIM) -> int | None:
    """Bytes per token over all layers of the thrift layout (None if thrift_vllm is missing or
    the combination is invalid)."""
    try:
        import torch

        from thrift_vllm.kv_layout import KVLayout

        lay = KVLayout(kv_layout, head_dim, block_size, unit=unit, quant_format=quant_format,
                       selection=selection, dtype=torch.bfloat16)
        return num_layers * lay.bytes_per_token(num_kv_heads)
    except Exception:
        return None


def plan_engines(backends: list[str], budgets: list[float], mode: str) -> list[dict]:
    """Engines to start: ``{"backend", "budget" (engine default or None), "budgets" (run per
    request)}``; baselines get one engine with no budget."""
    plan = []
    for b in backends:
        if b not in BACKENDS:
            raise ValueError(f"unknown backend {b!r}; known: {sorted(BACKENDS)}")
        if not BACKENDS[b]["thrift"]:
            plan.append({"backend": b, "budget": None, "budgets": [None]})
        elif mode == "request":
            plan.append({"backend": b, "budget": budgets[0], "budgets": list(budgets)})
        elif mode == "engine":
            plan += [{"backend": b, "budget": x, "budgets": [x]} for x in budgets]
        else:
            raise ValueError(f"budget mode must be request or engine, got {mode!r}")
    return plan


def stream_stats(start: float, chunk_times: list[float], tokens: int | None = None) -> dict:
    """One streamed request: TTFT, the gaps between chunks (``itl``), TPOT = (last chunk -
    first chunk) / (tokens - 1) and ``n`` = tokens. A chunk can carry several tokens when the
    client falls behind, so ``tokens`` (the server's usage count) is used where given; chunk
    count otherwise."""
    n = len(chunk_times) if tokens is None else tokens
    if not chunk_times:
        return {"ttft": math.nan, "itl": [], "tpot": math.nan, "n": n, "chunks": 0}
    itl = [b - a for a, b in itertools.pairwise(chunk_times)]
    tpot = (chunk_times[-1] - chunk_times[0]) / (n - 1) if n > 1 else math.nan
    return {"ttft": chunk_times[0] - start, "itl": itl, "tpot": tpot, "n": n,
            "chunks": len(chunk_times)}


def _fmt(x, nd: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _budget(b) -> str:
    return "-" if b is None else f"{float(b):g}"


def make_table(rows: list[dict]) -> str:
    """Markdown table: one line per (backend, budget), throughput columns per case (decode:
    whole decode, and in parentheses the steady state with every request decoding)."""
    keys: list[tuple[str, object]] = []
    by: dict[tuple[str, object], dict] = {}
    for r in rows:
        k = (r["backend"], r.get("budget"))
        if k not in by:
            keys.append(k)
            by[k] = {}
        by[k].setdefault("cap", r.get("capacity_tokens"))
        by[k].setdefault("bpt", r.get("bytes_per_token"))
        by[k].setdefault("fit", r.get("fit32k"))
        by[k].setdefault("kv_gib", r.get("kv_gib"))
        if r.get("case") in TABLE_CASES:
            v = r.get("prefill_tok_s") if r.get("kind") == "prefill" else r.get("decode_tok_s")
            steady = r.get("steady_decode_tok_s")
            if steady is not None and steady == steady and r.get("kind") != "prefill":
                v = f"{_fmt(v)} ({_fmt(steady)})"
            by[k][r["case"]] = "ERR" if r.get("error") else v
    cases = [c for c in TABLE_CASES if any(c in v for v in by.values())]
    head = ["backend", "budget", "KV tokens", "B/token", "KV GiB", "fit 32K", *[
        f"{c} tok/s" for c in cases]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in keys:
        v = by[k]
        cells = [k[0], _budget(k[1]), _fmt(v["cap"]), _fmt(v["bpt"]),
                 _fmt(v["kv_gib"], 1), _fmt(v["fit"]), *[_fmt(v.get(c)) for c in cases]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def make_sweep_table(rows: list[dict]) -> str:
    head = ["backend", "budget", "conc", "reqs", "req/s", "TTFT p50 s", "TTFT p99 s",
            "ITL p50 ms", "ITL p99 ms", "TPOT p50 ms", "out tok/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['backend']} | {_budget(r.get('budget'))} | {r.get('concurrency')} "
                         f"| ERROR {str(r['error'])[:60]} |")
            continue
        cells = [r["backend"], _budget(r.get("budget")), r["concurrency"], r["requests"],
                 _fmt(r.get("req_s", math.nan), 2), _fmt(r["ttft_p50"], 2),
                 _fmt(r["ttft_p99"], 2), _fmt(r["itl_p50"] * 1e3, 1),
                 _fmt(r["itl_p99"] * 1e3, 1), _fmt(r.get("tpot_p50", math.nan) * 1e3, 1),
                 _fmt(r["out_tok_s"])]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Prompts, scaled cases and the model
# ---------------------------------------------------------------------------------------------
def random_prompts(n: int, length: int, seed: int, vocab: int | None = None) -> list[dict]:
    vocab = vocab or VOCAB
    rng = random.Random(seed)
    lo = 300 if vocab > 600 else 0
    return [{"prompt_token_ids": [rng.randrange(lo, vocab - 2) for _ in range(length)]}
            for _ in range(n)]


def scaled(case: Case, factor: float) -> Case:
    """``case`` with prompt lengths times ``factor`` (dry runs on small models)."""
    if factor == 1.0 or not case.prompt_len:
        return case
    return Case(case.name, case.kind, case.n, max(16, int(case.prompt_len * factor)),
                case.new_tokens, case.est_s * factor)


def resolve_model(arg: str, work: str) -> tuple[str, dict]:
    """``(model path, shape)``; ``dummy8b`` (default) writes the Llama-3-8B-shaped config."""
    if arg == "dummy8b":
        path = make_dummy_llama8b(os.path.join(work, "llama8b_dummy"))
    elif arg == "tiny":
        path = make_tiny(os.path.join(work, "tiny_llama"))
    else:
        path = arg
    cfg = json.loads((Path(path) / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    shape = {"num_layers": cfg["num_hidden_layers"],
             "num_kv_heads": cfg.get("num_key_value_heads", heads),
             "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // heads,
             "max_positions": int(cfg.get("max_position_embeddings", 8192))}
    global VOCAB
    VOCAB = int(cfg["vocab_size"])
    return path, shape



# ---------------------------------------------------------------------------------------------
# Timed engine runs (vLLM imported lazily)
# ---------------------------------------------------------------------------------------------
class EngineTiming:
    """Timed runs of vllm_serving.Bench (``self.seed`` numbers the step-loop requests)."""

    seed: int

    def sampling(self, new_tokens: int, budget: float | None):
        from vllm import SamplingParams

        extra = None if budget is None else {"fp16_budget": budget}
        return SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True,
                              extra_args=extra)

    def step_run(self, llm, prompts: list[dict], sp, profile_steps: int = 0) -> dict:
        """Timed run through the engine's step loop: prefill = until every request has a token,
        decode = from then to the last token; ``steady_decode_tok_s`` stops at the first request
        to finish (the full batch only). ``profile_steps`` > 0: the first that many steps
        after every request has its first token (all requests decoding: requests finish at
        different times, so the last steps run a shrinking batch) run under a kernel profile
        (``row["profile"]``); the decode time starts after them."""
        from vllm_profile import KernelProfile

        eng = llm.llm_engine
        prof, prof_row, steps_left = None, {}, None
        t_prof = tok_prof = t_done = tok_done = None
        t0 = time.perf_counter()
        ids = []
        for i, p in enumerate(prompts):
            rid = f"bench-{self.seed}-{i}"
            got = eng.add_request(rid, p, sp)
            ids.append(got if isinstance(got, str) else rid)
        self.seed += 1
        counts: dict[str, int] = {}
        first: dict[str, float] = {}
        t_all_first = None
        tok_all_first = 0
        now = t0
        while eng.has_unfinished_requests():
            outs = eng.step()
            now = time.perf_counter()
            for o in outs:
                if not hasattr(o, "outputs"):
                    continue
                n = len(o.outputs[0].token_ids)
                counts[o.request_id] = n
                if n > 0 and o.request_id not in first:
                    first[o.request_id] = now - t0
            if t_done is None and any(c >= sp.max_tokens for c in counts.values()):
                t_done, tok_done = now, sum(counts.values())  # the batch starts to shrink
            if t_all_first is None and len(first) >= len(prompts):
                t_all_first = now
                tok_all_first = sum(counts.values())
                if profile_steps > 0:
                    prof, steps_left = KernelProfile(), profile_steps
                    if not prof.start(prof_row):  # error recorded; the window is still skipped
                        prof = None
            elif steps_left is not None and steps_left > 0:
                steps_left -= 1
                if steps_left == 0:  # window done: the decode time starts here
                    t_prof, tok_prof = now, sum(counts.values())
                    prof.stop(profile_steps, prof_row)
                    prof = None
        if prof is not None:  # the run ended inside the window: nothing left to time
            prof.stop(profile_steps - steps_left, prof_row)
            t_prof, tok_prof = now, sum(counts.values())
        total = sum(counts.values())
        if t_all_first is None:
            t_all_first = now
        start, start_tok = ((t_prof, tok_prof) if t_prof is not None
                            else (t_all_first, tok_all_first))
        dec_s = now - start
        # steady state: every request decoding (until the first one finishes); requests that
        # started decoding at different times leave the batch one by one afterwards
        steady_s = t_done - start if t_done is not None else math.nan
        steady = ((tok_done - start_tok) / steady_s if steady_s > 0 else math.nan)
        return {"prefill_s": t_all_first - t0, "total_s": now - t0, "decode_s": dec_s,
                "tokens": total, "decode_tokens": total - start_tok,
                "decode_tok_s": (total - start_tok) / dec_s if dec_s > 0 else math.nan,
                "steady_decode_tok_s": steady,
                "ttft_mean_s": sum(first.values()) / max(len(first), 1),
                "ttft_max_s": max(first.values(), default=math.nan), **prof_row}

    def subtract_run(self, llm, prompts: list[dict], new_tokens: int, budget) -> dict:
        """serving_smoke.py's way: time 1 token (prefill), then the full run, subtract."""
        t = time.perf_counter()
        llm.generate(prompts, self.sampling(1, budget), use_tqdm=False)
        tp = time.perf_counter() - t
        t = time.perf_counter()
        outs = llm.generate(prompts, self.sampling(new_tokens + 1, budget), use_tqdm=False)
        dt = time.perf_counter() - t
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        dec = n - len(prompts)
        return {"prefill_s": tp, "total_s": dt, "decode_s": dt - tp, "tokens": n,
                "decode_tokens": dec, "decode_tok_s": dec / (dt - tp) if dt > tp else math.nan}
