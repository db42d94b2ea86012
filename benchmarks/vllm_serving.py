"""Serving benchmark of issue 6: thrift (CUSTOM) vs FLASH_ATTN / TRITON_ATTN in CUDA vLLM 0.26.

Llama-3-8B shape (32 layers, Hq 32 / Hkv 8, D 128), ``load_format="dummy"``, bf16, prefix caching
off, ``gpu_memory_utilization`` 0.85, ``max_num_batched_tokens`` 8192 (as
``/work/shared/gpu-vllm/serving_smoke.py``). Per engine it reports the KV capacity vLLM computed
(``cache_config.num_gpu_blocks * block_size``), the bytes per token that capacity implies, how
many concurrent 32K-token requests fit, and the cases below. Decode is measured apart from
prefill: requests go in through ``LLMEngine.add_request`` and ``step()`` is timed from the moment
every request has its first token (all prefills done) to the last token (``--decode-method
step``; ``subtract`` = serving_smoke's "generate 1 token, then 257, subtract").

Backends (``--backends``): ``FLASH_ATTN``, ``TRITON_ATTN``, ``thrift-auto`` (CUSTOM, kv dtype auto:
model-dtype K/V + FP4 copies), ``thrift-nvfp4`` (CUSTOM, kv dtype nvfp4: FP4-only pages); budgets
``--budgets`` (default 0,0.05,0.25). ``--budget-mode request`` (default) runs one thrift engine
per layout and sends each budget as ``SamplingParams(extra_args={"fp16_budget": b})`` through the
budget logits processor; vLLM 0.26 then runs model runner V1, so every engine of the run gets
``VLLM_USE_V2_MODEL_RUNNER=0`` (same runner for all; ``--runner default`` leaves it alone).
``--budget-mode engine`` starts one engine per budget instead (no logits processor).

Cases (``--cases``): ``capacity`` (free: no request), ``prefill32k`` (4 x 32K prompts, 1 token),
``decode8k`` (16 x 8K, 256 new), ``decode32k`` (16 x 32K, 256 new), ``decode128k`` (4 x 128K, 256
new), ``fit32k`` (as many 32K requests as the capacity says fit, capped by ``--fit-max``, 64 new:
decode at full occupancy, preemptions counted). ``--quick``: prefill 2 x 8K, decode 8 x 4K x 64,
``max_model_len`` 16K.

One device call is < 10 minutes and an engine start costs 40-90 s (8B dummy, compile + graphs),
so split the work; ``--time-budget`` (default 560 s) skips engines/cases that would not fit and
the JSON is rewritten after every case. Sets that fit one call (estimates for the H200):

- ``--quick`` (FLASH_ATTN + thrift-auto at budget 0.05): ~3-4 min
- ``--backends FLASH_ATTN,TRITON_ATTN --cases capacity,prefill32k,decode8k``: ~4-5 min
- ``--backends thrift-auto --cases capacity,prefill32k,decode8k``: ~5-6 min (3 budgets, 1 engine)
- ``--backends thrift-nvfp4 --cases capacity,prefill32k,decode8k``: ~5-6 min
- ``--backends FLASH_ATTN,thrift-auto --budgets 0.05 --cases decode32k``: ~5 min
- ``--backends thrift-auto,thrift-nvfp4 --budgets 0.05 --cases capacity,decode32k``: ~5-6 min
- ``--backends FLASH_ATTN --cases decode128k`` then ``--backends thrift-auto --budgets 0.05 --cases
  decode128k`` (one each; TRITON_ATTN's 128K prefill alone is ~4 min)
- ``--backends thrift-nvfp4 --budgets 0.05 --cases capacity,fit32k``: ~6-8 min (fit32k prefill is
  ~2.5M tokens)

``--merge a.json b.json ...`` prints one table over several runs' JSON (no GPU needed).

``--server-sweep``: starts ``python3 -m vllm.entrypoints.cli.main serve`` (or ``--server
thrift-vllm``) per backend/budget as a subprocess and drives ``/v1/completions`` with streaming
httpx clients at ``--concurrency`` levels (prompt ``--sweep-prompt-len`` tokens,
``--sweep-max-tokens`` new): TTFT and inter-token latency p50/p99 and output tok/s. One backend
per call (server start ~60-90 s, each level ~20-60 s).

Importable and ``--help``-able without vLLM or CUDA (imports are inside functions).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LP_QUALNAME = "thrift_vllm.backend.request_budget:FP16BudgetLogitsProcessor"

# Llama-3-8B shape
NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, VOCAB = 32, 8, 128, 128256

BACKENDS = {
    "FLASH_ATTN": {"attention_backend": "FLASH_ATTN", "kv_cache_dtype": "auto", "thrift": False},
    "TRITON_ATTN": {"attention_backend": "TRITON_ATTN", "kv_cache_dtype": "auto",
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
    "decode8k": Case("decode8k", "decode", 16, 8192, 256, 25),
    "decode32k": Case("decode32k", "decode", 16, 32768, 256, 70),
    "decode128k": Case("decode128k", "decode", 4, 131072, 256, 150),
    "fit32k": Case("fit32k", "fit", 0, 32768, 64, 200),
}
QUICK_CASES = {
    "capacity": CASES["capacity"],
    "prefill8k": Case("prefill8k", "prefill", 2, 8192, 1, 5),
    "decode4k": Case("decode4k", "decode", 8, 4096, 64, 8),
}
TABLE_CASES = ("prefill32k", "prefill8k", "decode8k", "decode4k", "decode32k", "decode128k",
               "fit32k")


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


def stream_stats(start: float, chunk_times: list[float]) -> dict:
    """TTFT and inter-token gaps of one streamed request (chunk arrival times)."""
    if not chunk_times:
        return {"ttft": math.nan, "itl": [], "n": 0}
    itl = [b - a for a, b in itertools.pairwise(chunk_times)]
    return {"ttft": chunk_times[0] - start, "itl": itl, "n": len(chunk_times)}


def _fmt(x, nd: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _budget(b) -> str:
    return "-" if b is None else f"{float(b):g}"


def make_table(rows: list[dict]) -> str:
    """Markdown table: one line per (backend, budget), throughput columns per case."""
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
    head = ["backend", "budget", "conc", "reqs", "TTFT p50 s", "TTFT p99 s", "ITL p50 ms",
            "ITL p99 ms", "out tok/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['backend']} | {_budget(r.get('budget'))} | {r.get('concurrency')} "
                         f"| ERROR {str(r['error'])[:60]} |")
            continue
        cells = [r["backend"], _budget(r.get("budget")), r["concurrency"], r["requests"],
                 _fmt(r["ttft_p50"], 2), _fmt(r["ttft_p99"], 2), _fmt(r["itl_p50"] * 1e3, 1),
                 _fmt(r["itl_p99"] * 1e3, 1), _fmt(r["out_tok_s"])]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Shared helpers of vllm_gpu_check.py (plugin entry point, dummy model, engine teardown)
# ---------------------------------------------------------------------------------------------
_CHECK = None


def check_module():
    global _CHECK
    if _CHECK is None:
        spec = importlib.util.spec_from_file_location("_vllm_gpu_check",
                                                      HERE / "vllm_gpu_check.py")
        mod = importlib.util.module_from_spec(spec)
        assert spec.loader is not None
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        _CHECK = mod
    return _CHECK


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


def resolve_model(check, arg: str, work: str) -> tuple[str, dict]:
    """``(model path, shape)``; ``dummy8b`` (default) writes the Llama-3-8B-shaped config."""
    if arg == "dummy8b":
        path = check.make_dummy_llama8b(os.path.join(work, "llama8b_dummy"))
    elif arg == "tiny":
        path = check.make_tiny(os.path.join(work, "tiny_llama"))
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
# Offline benchmark
# ---------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.time()
        self.rows: list[dict] = []
        self.meta: dict = {"argv": sys.argv[1:]}
        self.seed = 0

    def time_left(self) -> float:
        return self.args.time_budget - (time.time() - self.t0)

    def dump(self) -> None:
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps({"meta": self.meta, "rows": self.rows}, indent=1, default=str))
        tmp.replace(out)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        shown = {k: v for k, v in row.items() if k not in ("traceback", "engine_kwargs")}
        print("ROW " + json.dumps(shown, default=str), flush=True)
        self.dump()

    def max_model_len(self, cases: list[Case]) -> int:
        longest = max([c.prompt_len + c.new_tokens for c in cases] + [8192])
        return min(int(blocks_for(longest + 512, 1024) * 1024), self.shape["max_positions"])

    def engine_kwargs(self, plan: dict, cases: list[Case]) -> dict:
        a = self.args
        be = BACKENDS[plan["backend"]]
        kw = dict(model=self.model, load_format="dummy", dtype="bfloat16", seed=0,
                  max_model_len=self.max_model_len(cases),
                  gpu_memory_utilization=a.gpu_memory_utilization,
                  max_num_batched_tokens=a.max_num_batched_tokens,
                  enable_prefix_caching=False, disable_log_stats=False,
                  attention_backend=be["attention_backend"], enforce_eager=a.eager)
        if be["kv_cache_dtype"] != "auto":
            kw["kv_cache_dtype"] = be["kv_cache_dtype"]
        if a.block_size:
            kw["block_size"] = a.block_size
        if be["thrift"]:
            cfg = {"impl": a.impl}
            if plan["budget"] is not None:
                cfg["fp16_budget"] = plan["budget"]
            kw["additional_config"] = {"thrift_vllm": cfg}
            if a.budget_mode == "request":
                kw["logits_processors"] = [LP_QUALNAME]
        return kw

    def sampling(self, new_tokens: int, budget: float | None):
        from vllm import SamplingParams

        extra = None if budget is None else {"fp16_budget": budget}
        return SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True,
                              extra_args=extra)

    def step_run(self, llm, prompts: list[dict], sp) -> dict:
        """Timed run through the engine's step loop: prefill = until every request has a token,
        decode = from then to the last token."""
        eng = llm.llm_engine
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
            if t_all_first is None and len(first) >= len(prompts):
                t_all_first = now
                tok_all_first = sum(counts.values())
        total = sum(counts.values())
        if t_all_first is None:
            t_all_first = now
        dec_s = now - t_all_first
        return {"prefill_s": t_all_first - t0, "total_s": now - t0, "decode_s": dec_s,
                "tokens": total, "decode_tokens": total - tok_all_first,
                "decode_tok_s": (total - tok_all_first) / dec_s if dec_s > 0 else math.nan,
                "ttft_mean_s": sum(first.values()) / max(len(first), 1),
                "ttft_max_s": max(first.values(), default=math.nan)}

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

    def run_case(self, llm, case: Case, budget, base: dict) -> dict:
        cc = self.check.counters(llm)
        row = {**base, "case": case.name, "kind": case.kind, "budget": budget,
               "prompt_len": case.prompt_len, "new_tokens": case.new_tokens}
        n = case.n
        if case.kind == "fit":
            n = min(base.get("fit32k") or 0, self.args.fit_max)
            if n <= 0:
                raise RuntimeError("capacity unknown or < one 32K request")
        row["prompts"] = n
        prompts = random_prompts(n, case.prompt_len, seed=hash((case.name, n)) & 0xFFFF)
        if case.kind == "prefill":
            llm.generate(prompts[:1], self.sampling(1, budget), use_tqdm=False)  # warm-up
            t = time.perf_counter()
            llm.generate(prompts, self.sampling(1, budget), use_tqdm=False)
            dt = time.perf_counter() - t
            row.update(prefill_s=dt, prefill_tok_s=n * case.prompt_len / dt)
        else:
            sp = self.sampling(case.new_tokens, budget)
            res = None
            if self.args.decode_method == "step":
                try:
                    res = self.step_run(llm, prompts, sp)
                    row["decode_method"] = "step"
                except Exception as e:
                    print(f"  step timing failed ({e!r}); falling back to subtract", flush=True)
                    row["step_error"] = repr(e)
            if res is None:
                res = self.subtract_run(llm, prompts, case.new_tokens, budget)
                row["decode_method"] = "subtract"
            row.update(res)
            row["prefill_tok_s"] = n * case.prompt_len / res["prefill_s"]
        after = self.check.counters(llm)
        row["preemptions"] = after.get("vllm:num_preemptions", 0) - cc.get("vllm:num_preemptions",
                                                                            0)
        return row

    def warmup(self, llm, budget) -> None:
        """A small decode run so the first measured case does not pay first-call costs."""
        n = min(1024, self.shape["max_positions"] // 2)
        llm.generate(random_prompts(4, n, seed=99), self.sampling(16, budget), use_tqdm=False)

    def run_engine(self, plan: dict, cases: list[Case]) -> None:
        from vllm import LLM

        a = self.args
        name = plan["backend"]
        base = {"backend": name, "kv_cache_dtype": BACKENDS[name]["kv_cache_dtype"],
                "engine_budget": plan["budget"]}
        if self.time_left() < a.engine_reserve_s:
            self.add({**base, "case": "engine", "error": f"skipped: {self.time_left():.0f}s left"})
            return
        kw = self.engine_kwargs(plan, cases)
        t = time.time()
        try:
            llm = LLM(**kw)
        except Exception as e:
            self.add({**base, "case": "engine", "error": f"start failed: {type(e).__name__}: "
                      f"{str(e)[-500:]}", "traceback": traceback.format_exc()[-3000:],
                      "engine_kwargs": kw})
            self.check.free_gpu(None)
            return
        try:
            cap = self.check.engine_capacity(llm)
            base.update(startup_s=round(time.time() - t, 1), **cap)
            bs = cap["block_size"]
            shape = {k: v for k, v in self.shape.items() if k != "max_positions"}
            bpt = (thrift_bytes_per_token(BACKENDS[name]["kv_cache_dtype"], bs,
                                          unit=a.unit, quant_format=a.quant_format,
                                          selection=a.selection, **shape)
                   if BACKENDS[name]["thrift"] else stock_bytes_per_token(**shape))
            base.update(bytes_per_token=bpt, fit32k=fit_requests(cap["num_gpu_blocks"], bs),
                        kv_gib=(cap["capacity_tokens"] * bpt / 2**30) if bpt else None)
            print(f"[{name} budget={plan['budget']}] up in {base['startup_s']}s: KV "
                  f"{cap['capacity_tokens']:,} tokens, {bpt} B/token, fit "
                  f"{base['fit32k']} x 32K", flush=True)
            for budget in plan["budgets"]:
                warmed = False
                for case in cases:
                    est = case.est_s * (2 if name == "TRITON_ATTN" else 1)
                    if case.kind == "capacity":
                        self.add({**base, "case": "capacity", "kind": "capacity",
                                  "budget": budget})
                        continue
                    if self.time_left() < est:
                        self.add({**base, "case": case.name, "kind": case.kind, "budget": budget,
                                  "error": f"skipped: {self.time_left():.0f}s left, needs ~"
                                           f"{est:.0f}s"})
                        continue
                    try:
                        if not warmed:
                            self.warmup(llm, budget)
                            warmed = True
                        self.add(self.run_case(llm, case, budget, base))
                    except Exception as e:
                        self.add({**base, "case": case.name, "kind": case.kind, "budget": budget,
                                  "error": f"{type(e).__name__}: {str(e)[-500:]}",
                                  "traceback": traceback.format_exc()[-3000:]})
        finally:
            self.check.free_gpu(llm)

    def run(self) -> int:
        a = self.args
        self.check = check_module()
        self.check.set_env_defaults()
        if a.budget_mode == "request" and a.runner == "v1":
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        work = a.workdir or tempfile.mkdtemp(prefix="vllm_serving_")
        self.meta["plugin"] = self.check.ensure_plugin_entry_point(os.path.join(work, "ep"))
        self.model, self.shape = resolve_model(self.check, a.model, work)
        table = QUICK_CASES if a.quick else CASES
        names = list(table) if a.quick else a.cases
        unknown = [c for c in names if c not in table]
        if unknown:
            raise SystemExit(f"unknown case(s) {unknown}; known: {list(table)}")
        cases = [scaled(table[c], a.len_scale) for c in names]
        try:
            import torch
            import vllm

            self.meta.update(vllm=vllm.__version__, torch=torch.__version__,
                             gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available()
                             else None)
        except Exception as e:
            self.meta["import_error"] = repr(e)
        self.meta.update(cases=[asdict(c) for c in cases], budget_mode=a.budget_mode,
                         runner_env=os.environ.get("VLLM_USE_V2_MODEL_RUNNER"))
        for plan in plan_engines(a.backends, a.budgets, a.budget_mode):
            try:
                self.run_engine(plan, cases)
            except Exception as e:  # never lose the other engines
                self.add({"backend": plan["backend"], "case": "engine", "error": repr(e),
                          "traceback": traceback.format_exc()[-3000:]})
        self.meta["total_s"] = round(time.time() - self.t0, 1)
        self.dump()
        print("\n" + make_table(self.rows), flush=True)
        errs = [r for r in self.rows if r.get("error")]
        for r in errs:
            print(f"ERROR {r['backend']} {r.get('budget')} {r.get('case')}: {r['error']}",
                  flush=True)
        print(f"{len(self.rows)} rows, {len(errs)} errors, {self.meta['total_s']}s", flush=True)
        return 1 if errs else 0


# ---------------------------------------------------------------------------------------------
# OpenAI-server concurrency sweep
# ---------------------------------------------------------------------------------------------
class Sweep:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.time()
        self.rows: list[dict] = []
        self.meta: dict = {"argv": sys.argv[1:], "mode": "server-sweep"}

    def dump(self) -> None:
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": self.meta, "sweep": self.rows}, indent=1,
                                  default=str))

    def server_cmd(self, plan: dict, port: int) -> list[str]:
        a = self.args
        be = BACKENDS[plan["backend"]]
        if a.server == "thrift-vllm":
            cmd = [sys.executable, "-c", "from thrift_vllm.server.cli import main; "
                   "import sys; sys.exit(main())", "serve", self.model]
        else:
            cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", self.model]
        cmd += ["--port", str(port), "--load-format", "dummy", "--dtype", "bfloat16",
                "--max-model-len", str(min(a.sweep_prompt_len + a.sweep_max_tokens + 1024,
                                           self.shape["max_positions"])),
                "--gpu-memory-utilization", str(a.gpu_memory_utilization),
                "--max-num-batched-tokens", str(a.max_num_batched_tokens),
                "--no-enable-prefix-caching", "--served-model-name", "bench",
                "--attention-backend", be["attention_backend"]]
        if be["kv_cache_dtype"] != "auto":
            cmd += ["--kv-cache-dtype", be["kv_cache_dtype"]]
        if a.eager:
            cmd += ["--enforce-eager"]
        if be["thrift"]:
            cfg = {"impl": a.impl}
            if plan["budget"] is not None:
                cfg["fp16_budget"] = plan["budget"]
            cmd += ["--additional-config", json.dumps({"thrift_vllm": cfg})]
            if a.budget_mode == "request":
                cmd += ["--logits-processors", LP_QUALNAME]
        return cmd

    def wait_healthy(self, proc: subprocess.Popen, port: int, log: Path) -> None:
        import httpx

        t = time.time()
        while time.time() - t < self.args.server_timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited rc={proc.returncode}: "
                                   f"{log.read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    return
            except Exception:
                pass
            time.sleep(2)
        raise TimeoutError(f"server not healthy after {self.args.server_timeout}s: "
                           f"{log.read_text()[-2000:]}")

    async def level(self, port: int, concurrency: int, n: int, budget) -> dict:
        import httpx

        a = self.args
        prompts = [p["prompt_token_ids"] for p in
                   random_prompts(n, a.sweep_prompt_len, seed=concurrency)]
        sem = asyncio.Semaphore(concurrency)
        url = f"http://127.0.0.1:{port}/v1/completions"

        async def one(client, prompt):
            body = {"model": "bench", "prompt": prompt, "max_tokens": a.sweep_max_tokens,
                    "temperature": 0.0, "stream": True, "ignore_eos": True}
            if budget is not None:
                body["vllm_xargs"] = {"fp16_budget": budget}
            async with sem:
                start = time.perf_counter()
                times = []
                async with client.stream("POST", url, json=body) as r:
                    r.raise_for_status()
                    async for line in r.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            break
                        if json.loads(data).get("choices"):
                            times.append(time.perf_counter())
                return stream_stats(start, times)

        t = time.perf_counter()
        async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
            stats = await asyncio.gather(*[one(client, p) for p in prompts])
        wall = time.perf_counter() - t
        ttft = [s["ttft"] for s in stats]
        itl = [x for s in stats for x in s["itl"]]
        chunks = sum(s["n"] for s in stats)
        return {"concurrency": concurrency, "requests": n, "wall_s": wall,
                "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
                "itl_p50": percentile(itl, 50), "itl_p99": percentile(itl, 99),
                "out_tok_s": chunks / wall, "chunks": chunks}

    def run(self) -> int:
        a = self.args
        check = check_module()
        check.set_env_defaults()
        work = a.workdir or tempfile.mkdtemp(prefix="vllm_sweep_")
        self.meta["plugin"] = check.ensure_plugin_entry_point(os.path.join(work, "ep"))
        self.model, self.shape = resolve_model(check, a.model, work)
        port = a.port
        for plan in plan_engines(a.backends, a.budgets, a.budget_mode):
            log = Path(work) / f"server_{plan['backend']}_{plan['budget']}.log"
            cmd = self.server_cmd(plan, port)
            print("$ " + " ".join(cmd), flush=True)
            with open(log, "w") as f:
                proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            try:
                t = time.time()
                self.wait_healthy(proc, port, log)
                print(f"[{plan['backend']}] server up in {time.time() - t:.0f}s", flush=True)
                for budget in plan["budgets"]:
                    for c in a.concurrency:
                        n = max(a.sweep_requests, c)
                        try:
                            r = asyncio.run(self.level(port, c, n, budget))
                        except Exception as e:
                            r = {"concurrency": c, "error": f"{type(e).__name__}: {e}"}
                        row = {"backend": plan["backend"], "budget": budget, **r}
                        self.rows.append(row)
                        print("ROW " + json.dumps(row, default=str), flush=True)
                        self.dump()
            except Exception as e:
                self.rows.append({"backend": plan["backend"], "budget": plan["budget"],
                                  "concurrency": None, "error": f"{type(e).__name__}: {e}"})
                self.dump()
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                check.free_gpu(None)
            port += 1
        self.meta["total_s"] = round(time.time() - self.t0, 1)
        self.dump()
        print("\n" + make_sweep_table(self.rows), flush=True)
        return 1 if any(r.get("error") for r in self.rows) else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring for the flag sets that fit "
                                       "one device call.")
    p.add_argument("--backends", type=parse_list, default=None,
                   help=f"comma list of {sorted(BACKENDS)} (default: all; --quick: "
                        "FLASH_ATTN,thrift-auto)")
    p.add_argument("--budgets", type=lambda s: parse_list(s, float), default=None,
                   help="thrift fp16 budgets (default 0,0.05,0.25; --quick: 0.05)")
    p.add_argument("--cases", type=parse_list, default=["capacity", "prefill32k", "decode8k"],
                   help=f"comma list of {list(CASES)} (default capacity,prefill32k,decode8k)")
    p.add_argument("--quick", action="store_true", help="small cases (see docstring)")
    p.add_argument("--budget-mode", choices=("request", "engine"), default="request")
    p.add_argument("--runner", choices=("v1", "default"), default="v1",
                   help="request mode: force model runner V1 for every engine (default)")
    p.add_argument("--decode-method", choices=("step", "subtract"), default="step")
    p.add_argument("--model", default="dummy8b",
                   help="dummy8b (Llama-3-8B shape, the benchmark), or tiny / a directory for "
                        "plumbing dry runs (weights still loaded as dummy)")
    p.add_argument("--len-scale", type=float, default=1.0,
                   help="multiply prompt lengths (dry runs: e.g. 1/64 on CPU)")
    p.add_argument("--out", default="vllm_serving.json")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="print one table over earlier runs' JSON files and exit")
    p.add_argument("--workdir", default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--block-size", type=int, default=0, help="0: the backend's preference")
    p.add_argument("--eager", action="store_true", help="enforce_eager (default: graphs)")
    p.add_argument("--impl", default="triton")
    p.add_argument("--unit", type=int, default=64, help="thrift selection unit (bytes/token)")
    p.add_argument("--quant-format", default="nvfp4")
    p.add_argument("--selection", default="block_mean")
    p.add_argument("--fit-max", type=int, default=128)
    p.add_argument("--time-budget", type=float, default=560.0)
    p.add_argument("--engine-reserve-s", type=float, default=120.0)
    g = p.add_argument_group("server sweep")
    g.add_argument("--server-sweep", action="store_true")
    g.add_argument("--server", choices=("vllm", "thrift-vllm"), default="vllm")
    g.add_argument("--concurrency", type=lambda s: parse_list(s, int), default=[1, 8, 32])
    g.add_argument("--sweep-requests", type=int, default=16)
    g.add_argument("--sweep-prompt-len", type=int, default=8192)
    g.add_argument("--sweep-max-tokens", type=int, default=256)
    g.add_argument("--port", type=int, default=8471)
    g.add_argument("--server-timeout", type=float, default=300.0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.merge:
        rows = []
        for path in args.merge:
            rows += json.loads(Path(path).read_text()).get("rows", [])
        print(make_table(rows))
        return 0
    if args.backends is None:
        args.backends = ["FLASH_ATTN", "thrift-auto"] if args.quick else list(BACKENDS)
    if args.budgets is None:
        args.budgets = [0.05] if args.quick else [0.0, 0.05, 0.25]
    if args.server_sweep:
        return Sweep(args).run()
    return Bench(args).run()


if __name__ == "__main__":
    sys.exit(main())
