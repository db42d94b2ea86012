"""Serving benchmark of issue 6: thrift (CUSTOM) vs FLASH_ATTN / TRITON_ATTN in CUDA vLLM 0.26.

Llama-3-8B shape (32 layers, Hq 32 / Hkv 8, D 128), ``load_format="dummy"``, bf16, prefix caching
off, ``gpu_memory_utilization`` 0.85, ``max_num_batched_tokens`` 8192 (as
``/work/shared/gpu-vllm/serving_smoke.py``). Per engine it reports the KV capacity vLLM computed
(``cache_config.num_gpu_blocks * block_size``), the bytes per token that capacity implies, how
many concurrent 32K-token requests fit, and the cases below. Decode is measured apart from
prefill: requests go in through ``LLMEngine.add_request`` and ``step()`` is timed from the moment
every request has its first token (all prefills done) to the last token (``--decode-method
step``; ``subtract`` = serving_smoke's "generate 1 token, then 257, subtract").

Backends (``--backends``): ``FLASH_ATTN``, ``FLASH_ATTN-fp8`` (fp8 pages), ``TRITON_ATTN``,
``thrift-auto`` (CUSTOM, kv dtype auto: model-dtype K/V + FP4 copies), ``thrift-nvfp4`` (CUSTOM,
kv dtype nvfp4: FP4-only pages; routes ``--prefill`` / ``--decode-math``); budgets
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

``--profile-steps N`` (benchmarks/vllm_profile.py): where the GPU time goes. The engine runs
in-process; the first N decode steps after every request has its first token (not counted in
the case's throughput) and one extra untimed run of each prefill case are profiled, and each
row gets kernel milliseconds per step by group (thrift selection / decode / prefill / KV
write, FlashAttention, GEMM, ...).

A device call is < 10 minutes and an engine start 40-90 s (8B dummy, compile + graphs): split
the work; ``--time-budget`` (default 560 s) skips what would not fit, the JSON is rewritten after
every case. Sets that fit one call (estimates for the H200):

- ``--quick`` (FLASH_ATTN + thrift-auto at budget 0.05): ~3-4 min
- ``--backends FLASH_ATTN,TRITON_ATTN --cases capacity,prefill32k,decode8k``: ~4-5 min
- ``--backends thrift-auto --cases capacity,prefill32k,decode8k``: ~5-6 min (3 budgets, 1 engine)
- ``--backends FLASH_ATTN,thrift-auto --budgets 0.05 --cases decode32k``: ~5 min
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
Helpers: benchmarks/vllm_bench_common.py (shared with vllm_gpu_check.py),
benchmarks/vllm_serving_lib.py (cases, pure helpers, tables, timed runs) and
benchmarks/vllm_server_sweep.py (``--server-sweep``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # loaded by file path (the tests): find the sibling helpers
    sys.path.insert(0, str(HERE))

from vllm_bench_common import (  # noqa: E402
    LP_QUALNAME,
    counters,
    dump_json,
    engine_capacity,
    ensure_plugin_entry_point,
    free_gpu,
    set_env_defaults,
    thrift_config,
)
from vllm_profile import profile_table, profiled  # noqa: E402
from vllm_server_sweep import Sweep  # noqa: E402
from vllm_serving_lib import (  # noqa: E402
    BACKENDS,
    CASES,
    QUICK_CASES,
    Case,
    EngineTiming,
    blocks_for,
    fit_requests,
    make_sweep_table,  # noqa: F401  (re-exported: tests/test_vllm_gpu_scripts.py)
    make_table,
    parse_list,
    percentile,  # noqa: F401
    plan_engines,
    random_prompts,
    resolve_model,
    scaled,
    stock_bytes_per_token,
    stream_stats,  # noqa: F401
    thrift_bytes_per_token,
)


# ---------------------------------------------------------------------------------------------
# Offline benchmark
# ---------------------------------------------------------------------------------------------
class Bench(EngineTiming):
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.time()
        self.rows: list[dict] = []
        self.meta: dict = {"argv": sys.argv[1:]}
        self.seed = 0

    def time_left(self) -> float:
        return self.args.time_budget - (time.time() - self.t0)

    def dump(self) -> None:
        dump_json(self.args.out, {"meta": self.meta, "rows": self.rows})

    def add(self, row: dict) -> None:
        self.rows.append(row)
        shown = {k: v for k, v in row.items()
                 if k not in ("traceback", "engine_kwargs", "profile")}
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
            kw["additional_config"] = {"thrift_vllm": thrift_config(a, plan["budget"])}
            if a.budget_mode == "request":
                kw["logits_processors"] = [LP_QUALNAME]
        return kw

    def run_case(self, llm, case: Case, budget, base: dict) -> dict:
        cc = counters(llm)
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
            if self.args.profile_steps > 0:  # one more, untimed run under the profiler
                steps = -(-n * case.prompt_len // self.args.max_num_batched_tokens)
                with profiled(steps, row):
                    llm.generate(random_prompts(n, case.prompt_len, seed=7),
                                 self.sampling(1, budget), use_tqdm=False)
        else:
            sp = self.sampling(case.new_tokens, budget)
            res = None
            if self.args.decode_method == "step":
                try:
                    res = self.step_run(llm, prompts, sp, self.args.profile_steps)
                    row["decode_method"] = "step"
                except Exception as e:
                    print(f"  step timing failed ({e!r}); falling back to subtract", flush=True)
                    row["step_error"] = repr(e)
            if res is None:
                res = self.subtract_run(llm, prompts, case.new_tokens, budget)
                row["decode_method"] = "subtract"
            row.update(res)
            row["prefill_tok_s"] = n * case.prompt_len / res["prefill_s"]
        after = counters(llm)
        row["preemptions"] = after.get("vllm:num_preemptions", 0) - cc.get("vllm:num_preemptions",
                                                                            0)
        return row

    def warmup(self, llm, budget, cases: list[Case]) -> None:
        """Untimed: three short requests and one as long as the longest case's prompt, 16 new
        tokens each, so no measured case pays first-call costs. The thrift kernels compile on
        first use, and the prefill selection once per power-of-two bucket of the context (its
        sort width); on the H200 (2026-11-30) a decode32k case that met them cold measured
        4.7K prefill tok/s against 16.9K once warm. The long request walks chunked prefill
        through every bucket up to that length and decodes at it. (The batch-dependent ints
        are no longer specialised, 50a9812, so batch shapes add no variants.)"""
        short = min(1024, self.shape["max_positions"] // 2)
        longest = max((c.prompt_len for c in cases if c.kind != "capacity"), default=short)
        longest = min(longest, self.max_model_len(cases) - 32)
        prompts = random_prompts(3, short, seed=99) + random_prompts(1, longest, seed=98)
        llm.generate(prompts, self.sampling(16, budget), use_tqdm=False)

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
            free_gpu(None)
            return
        try:
            cap = engine_capacity(llm)
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
                    if case.kind == "fit":  # est_s is for ~80 requests; --fit-max caps them
                        est *= min(base.get("fit32k") or 0, a.fit_max) / 80
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
                            self.warmup(llm, budget, cases)
                            warmed = True
                        self.add(self.run_case(llm, case, budget, base))
                    except Exception as e:
                        self.add({**base, "case": case.name, "kind": case.kind, "budget": budget,
                                  "error": f"{type(e).__name__}: {str(e)[-500:]}",
                                  "traceback": traceback.format_exc()[-3000:]})
        finally:
            free_gpu(llm)

    def run(self) -> int:
        a = self.args
        set_env_defaults()
        if a.budget_mode == "request" and a.runner == "v1":
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        if a.profile_steps > 0:  # the engine core in this process: the profiler sees it
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        work = a.workdir or tempfile.mkdtemp(prefix="vllm_serving_")
        self.meta["plugin"] = ensure_plugin_entry_point(os.path.join(work, "ep"))
        self.model, self.shape = resolve_model(a.model, work)
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
        print(profile_table(self.rows), flush=True)
        print("\n" + make_table(self.rows), flush=True)
        errs = [r for r in self.rows if r.get("error")]
        for r in errs:
            print(f"ERROR {r['backend']} {r.get('budget')} {r.get('case')}: {r['error']}",
                  flush=True)
        print(f"{len(self.rows)} rows, {len(errs)} errors, {self.meta['total_s']}s", flush=True)
        return 1 if errs else 0



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
    p.add_argument("--full-decode-graphs", action="store_true",
                   help="thrift config cuda_graphs on (FULL graphs of pure-decode steps; the "
                        "backend's default since 2026-11-30)")
    p.add_argument("--piecewise-decode", action="store_true",
                   help="thrift config cuda_graphs off (piecewise graphs, attention eager)")
    # = thrift_vllm.backend.config.BACKEND_BULK_MATHS (not imported here: it pulls in torch)
    # = thrift_vllm.backend.config.PREFILLS / DECODE_MATHS (not imported: torch)
    p.add_argument("--prefill", choices=("auto", "flash", "thrift"), default="auto",
                   help="thrift backend config prefill (route; auto: the backend's choice)")
    p.add_argument("--decode-math", choices=("auto", "fp4", "fp16"), default="auto",
                   help="thrift backend config decode_math (auto: the backend's choice)")
    p.add_argument("--bulk-math", choices=("bf16", "fp8", "native"), default="bf16",
                   help="thrift backend config bulk_math (prefill arithmetic of FP4 blocks; "
                   "native: Blackwell, thrift-auto only)")
    p.add_argument("--unit", type=int, default=64, help="thrift selection unit (bytes/token)")
    p.add_argument("--quant-format", default="nvfp4")
    p.add_argument("--selection", default="block_mean")
    p.add_argument("--fit-max", type=int, default=128)
    p.add_argument("--profile-steps", type=int, default=0,
                   help="kernel profile of the last N decode steps per decode case (left out "
                        "of its throughput) and of one extra prefill run; engine in-process")
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
