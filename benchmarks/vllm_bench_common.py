"""Helpers shared by benchmarks/vllm_gpu_check.py and benchmarks/vllm_serving.py: the vLLM
process environment, the thrift_vllm plugin entry point, generated models (``tiny``,
``dummy8b``), engine capacity / counters / teardown and the JSON dump.

Importable without vLLM or CUDA (imports are inside functions).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LP_QUALNAME = "thrift_vllm.backend.request_budget:FP16BudgetLogitsProcessor"
PLUGIN_ENTRY = "thrift_vllm = thrift_vllm.backend.plugin:register"


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


def dump_json(path: str | os.PathLike, payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically (a ``.tmp`` file, then a rename)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(out)


def thrift_config(args, budget: float | None) -> dict:
    """The backend's ``additional_config["thrift_vllm"]`` from the scripts' flags: ``impl``,
    ``cuda_graphs`` (:func:`decode_graphs_setting`), ``bulk_math`` when not bf16, ``prefill``
    / ``decode_math`` when not auto, and
    ``fp16_budget`` when ``budget`` is given (otherwise the backend's default)."""
    cfg = {"impl": args.impl}
    graphs = decode_graphs_setting(args)
    if graphs is not None:  # FULL graphs of pure-decode steps, or piecewise
        cfg["cuda_graphs"] = graphs
    bulk_math = getattr(args, "bulk_math", "bf16")
    if bulk_math != "bf16":  # prefill's FP4 blocks on e4m3 operands, or native (Blackwell)
        cfg["bulk_math"] = bulk_math
    for name in ("prefill", "decode_math"):  # routes; "auto" = the backend's per-device choice
        value = getattr(args, name, "auto")
        if value != "auto":
            cfg[name] = value
    if budget is not None:
        cfg["fp16_budget"] = budget
    return cfg


def decode_graphs_setting(args) -> bool | None:
    """Backend config ``cuda_graphs`` from ``--full-decode-graphs`` / ``--piecewise-decode``:
    True / False, or None (leave the backend's default: FULL graphs since 2026-11-30)."""
    full = getattr(args, "full_decode_graphs", False)
    piecewise = getattr(args, "piecewise_decode", False)
    if full and piecewise:
        raise SystemExit("--full-decode-graphs and --piecewise-decode exclude each other")
    return True if full else False if piecewise else None
