"""``--server-sweep`` of benchmarks/vllm_serving.py: an OpenAI-server concurrency sweep.

Starts ``python3 -m vllm.entrypoints.cli.main serve`` (or ``--server thrift-vllm``) per
backend/budget as a subprocess and drives ``/v1/completions`` with streaming httpx clients;
the flags are vllm_serving.py's (see its docstring). Importable without vLLM or CUDA.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vllm_bench_common import (
    LP_QUALNAME,
    ensure_plugin_entry_point,
    free_gpu,
    set_env_defaults,
    thrift_config,
)
from vllm_serving_lib import (
    BACKENDS,
    make_sweep_table,
    percentile,
    plan_engines,
    random_prompts,
    resolve_model,
    stream_stats,
)


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
            cfg = thrift_config(a, plan["budget"])
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
            # usage in every chunk: a chunk may carry several tokens once the client lags
            body = {"model": "bench", "prompt": prompt, "max_tokens": a.sweep_max_tokens,
                    "temperature": 0.0, "stream": True, "ignore_eos": True,
                    "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
            if budget is not None:
                body["vllm_xargs"] = {"fp16_budget": budget}
            async with sem:
                start = time.perf_counter()
                times, tokens = [], None
                async with client.stream("POST", url, json=body) as r:
                    r.raise_for_status()
                    async for line in r.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            break
                        msg = json.loads(data)
                        if msg.get("choices"):
                            times.append(time.perf_counter())
                        usage = msg.get("usage") or {}
                        if usage.get("completion_tokens") is not None:
                            tokens = int(usage["completion_tokens"])
                return stream_stats(start, times, tokens)

        t = time.perf_counter()
        async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
            stats = await asyncio.gather(*[one(client, p) for p in prompts])
        wall = time.perf_counter() - t
        ttft = [s["ttft"] for s in stats]
        itl = [x for s in stats for x in s["itl"]]
        tpot = [s["tpot"] for s in stats if s["tpot"] == s["tpot"]]  # not NaN
        tokens = sum(s["n"] for s in stats)
        return {"concurrency": concurrency, "requests": n, "wall_s": wall, "req_s": n / wall,
                "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
                "itl_p50": percentile(itl, 50), "itl_p99": percentile(itl, 99),
                "tpot_p50": percentile(tpot, 50), "tpot_p99": percentile(tpot, 99),
                "out_tok_s": tokens / wall, "tokens": tokens,
                "chunks": sum(s["chunks"] for s in stats)}

    def run(self) -> int:
        a = self.args
        set_env_defaults()
        work = a.workdir or tempfile.mkdtemp(prefix="vllm_sweep_")
        self.meta["plugin"] = ensure_plugin_entry_point(os.path.join(work, "ep"))
        self.model, self.shape = resolve_model(a.model, work)
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
                free_gpu(None)
            port += 1
        self.meta["total_s"] = round(time.time() - self.t0, 1)
        self.dump()
        print("\n" + make_sweep_table(self.rows), flush=True)
        return 1 if any(r.get("error") for r in self.rows) else 0
