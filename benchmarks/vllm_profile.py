"""Where a vLLM step's GPU time goes: kernel-time profiles for benchmarks/vllm_serving.py.

``--profile-steps N`` runs the engine in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so
torch.profiler in this process sees the model runner's kernels) and records CUDA kernel time
over the last N decode steps of each decode case (those steps are left out of the case's
throughput) and over one extra, untimed repetition of each prefill case. Kernels are grouped
by name (:data:`GROUPS`); a row's ``profile`` holds the groups' and the top kernels' device
milliseconds per step and their share of the profiled kernel time.

Pure helpers (no torch import at module level): :func:`group_of`, :func:`summarize`.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

# First match wins; patterns are searched in the kernel's name (Triton kernels keep their
# Python names, e.g. ``_paged_decode_kernel``; cuBLAS GEMMs on Hopper are ``nvjet_*``).
GROUPS: tuple[tuple[str, str], ...] = (
    ("thrift selection", r"_paged_score_kernel|_paged_topk_kernel|_block_summary_kernel|"
                         r"_select_blocks_kernel"),
    ("thrift decode", r"_paged_decode_kernel|_paged_reduce_kernel|_thrift_decode_kernel|"
                      r"_decode_reduce_kernel"),
    ("thrift prefill", r"_thrift_prefill_kernel"),
    ("thrift KV write / quantise", r"_kv_write_\w+_kernel|_quantize_kernel|_dequantize_kernel"),
    ("FlashAttention", r"flash|fmha|FlashAttn"),
    ("Triton attention (vLLM)", r"unified_attention|_fwd_kernel|paged_attention"),
    ("GEMM", r"nvjet|gemm|cutlass|xmma|cublas|sm90_|Gemm"),
    ("vLLM ops (norm, rope, act, cache)", r"rms_norm|rotary|silu|act_and_mul|reshape_and_cache|"
                                          r"fused_add"),
    ("sampling", r"sort|topk|top_k|argmax|softmax|multinomial|exponential"),
)


def group_of(name: str) -> str:
    """The :data:`GROUPS` name a kernel belongs to ("other" when none matches)."""
    for group, pattern in GROUPS:
        if re.search(pattern, name):
            return group
    return "other (torch elementwise, copies, gathers)"


def summarize(kernels: list[tuple[str, float, int]], steps: int, top: int = 12) -> dict:
    """``kernels``: (name, total device microseconds, calls) over ``steps`` engine steps ->
    ``{"steps", "kernel_ms_per_step", "groups": [...], "top": [...]}``, groups and kernels
    sorted by time, each with ms per step, calls per step and share of the profiled time."""
    if steps <= 0:
        raise ValueError(f"steps must be > 0, got {steps}")
    total_us = sum(us for _, us, _ in kernels)
    by_group: dict[str, list[float]] = {}
    for name, us, calls in kernels:
        g = by_group.setdefault(group_of(name), [0.0, 0])
        g[0] += us
        g[1] += calls

    def entry(label: str, key: str, us: float, calls: int) -> dict:
        return {key: label, "ms_per_step": round(us / 1e3 / steps, 4),
                "calls_per_step": round(calls / steps, 2),
                "share": round(us / total_us, 4) if total_us else 0.0}

    groups = [entry(g, "group", us, calls) for g, (us, calls) in
              sorted(by_group.items(), key=lambda kv: -kv[1][0])]
    top_k = [entry(n[:120], "kernel", us, calls) | {"group": group_of(n)} for n, us, calls in
             sorted(kernels, key=lambda k: -k[1])[:top]]
    return {"steps": steps, "kernel_ms_per_step": round(total_us / 1e3 / steps, 4),
            "groups": groups, "top": top_k}


class KernelProfile:
    """torch.profiler over CUDA kernels, started and stopped around engine steps. Errors are
    recorded in the row (``profile_error``), never raised: a profile must not lose the run."""

    def __init__(self) -> None:
        self._prof = None

    def start(self, into: dict) -> bool:
        """Start profiling; False (and ``into["profile_error"]``) if it could not start."""
        try:
            import torch

            act = torch.profiler.ProfilerActivity
            # CPU activity only where there is no GPU (the CPU dry run): CPU ops would otherwise
            # be counted as if they were kernels.
            self._prof = torch.profiler.profile(
                activities=[act.CUDA] if torch.cuda.is_available() else [act.CPU],
                record_shapes=False)
            self._prof.__enter__()
            return True
        except Exception as e:
            into["profile_error"] = f"{type(e).__name__}: {e}"
            self._prof = None
            return False

    def stop(self, steps: int, into: dict) -> None:
        """Stop and put the kernels' summary over ``steps`` steps in ``into["profile"]``."""
        if self._prof is None:
            return
        try:
            import torch

            cuda = torch.cuda.is_available()
            if cuda:
                torch.cuda.synchronize()
            self._prof.__exit__(None, None, None)
            kernels = []
            for e in self._prof.key_averages():
                if cuda:
                    us = getattr(e, "device_time_total", None)
                    if us is None:  # older torch
                        us = getattr(e, "cuda_time_total", 0.0)
                else:
                    us = e.self_cpu_time_total
                if us and us > 0:
                    kernels.append((e.key, float(us), int(e.count)))
            into["profile"] = summarize(kernels, max(steps, 1))
        except Exception as e:
            into["profile_error"] = f"{type(e).__name__}: {e}"
        finally:
            self._prof = None


@contextmanager
def profiled(steps: int, into: dict):
    """``with profiled(n, row): ...`` -> ``row["profile"]`` = the kernels' summary over n
    steps (or ``row["profile_error"]``)."""
    prof = KernelProfile()
    prof.start(into)
    try:
        yield
    finally:
        prof.stop(steps, into)


def profile_table(rows: list[dict]) -> str:
    """Markdown: per profiled row, the groups' ms per step and share."""
    lines = []
    for r in rows:
        p = r.get("profile")
        if not p:
            continue
        lines += ["", f"profile {r.get('backend')} budget={r.get('budget')} {r.get('case')}: "
                      f"{p['kernel_ms_per_step']:.2f} ms of kernels per step over {p['steps']} "
                      "steps", "| group | ms/step | share | calls/step |", "|---|---|---|---|"]
        lines += [f"| {g['group']} | {g['ms_per_step']:.3f} | {100 * g['share']:.1f} % | "
                  f"{g['calls_per_step']:g} |" for g in p["groups"]]
    return "\n".join(lines)
