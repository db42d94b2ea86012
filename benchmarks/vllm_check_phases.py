"""The optional CUSTOM engines of benchmarks/vllm_gpu_check.py (``--with-nvfp4``,
``--with-fp8`` or named in ``--phases``), as a mixin of its Runner: the FP4-only ``nvfp4`` KV
layout and the fp8 bulk prefill. Importable without vLLM or CUDA."""

from __future__ import annotations

import math

from vllm_bench_common import LP_QUALNAME
from vllm_check_lib import agreement, finite_run, greedy, teacher_forced


class OptionalPhases:
    """Needs the Runner's ``prompts``, ``ref``, ``tf_seqs``, ``check``, ``compare_tf``,
    ``llm_kwargs``, ``thrift_config`` and ``with_engine`` (vllm_check_lib.RunnerBase)."""

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

    def phase_fp8(self) -> None:
        """Config bulk_math "fp8" (the prefill's FP4 blocks on e4m3 operands; Triton path):
        teacher-forced (prefill) logprobs at per-request budgets 0.05 and 0 against FLASH_ATTN.
        PASS when both are finite and 5 % sits closer than 0 %, i.e. the FP16 blocks still
        recover quality on top of the fp8 bulk; the distances are reported for the record."""
        def body(llm) -> None:
            def run():
                worst = {}
                texts = []
                for b in (0.05, 0.0):
                    _, text, data = self.compare_tf(teacher_forced(llm, self.tf_seqs, budget=b))
                    worst[b] = max((c["mean"] for c in data["comparisons"]), default=math.nan)
                    texts.append(f"budget {b}: {text}")
                ok = all(math.isfinite(v) for v in worst.values()) and worst[0.05] < worst[0.0]
                return ok, "; ".join(texts), {"worst_mean": worst}

            self.check("fp8_bulk_b005_closer_than_b0", run)

        cfg = self.thrift_config(0.05)
        cfg["thrift_vllm"]["bulk_math"] = "fp8"
        kw = self.llm_kwargs(attention_backend="CUSTOM", enforce_eager=False,
                             additional_config=cfg, logits_processors=[LP_QUALNAME],
                             max_num_batched_tokens=128)
        self.with_engine("fp8", kw, body, ["fp8_bulk_b005_closer_than_b0"])
