"""A tiny Llama-architecture model made on the fly, loadable offline by vLLM and transformers.

``make_tiny_llama(path, head_dim=64)`` writes config.json (GQA: 4 query heads, 2 KV heads, 2
layers), model.safetensors (random weights, fixed seed), and a byte-level BPE tokenizer (256 byte
tokens, no merges, so it encodes any text) with tokenizer_config.json. Weights are scaled so the
logits are peaked (a clear top-1), which keeps greedy decoding stable under tiny numeric
differences between attention backends.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = 64
HIDDEN = NUM_HEADS * HEAD_DIM
INTERMEDIATE = 512
VOCAB_SIZE = 320  # >= 256 bytes + 2 specials
MAX_POSITIONS = 1024
BOS, EOS = "<s>", "</s>"


def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS])
    return tok.to_str()


def _weights(seed: int, head_dim: int = HEAD_DIM) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = NUM_HEADS * head_dim

    def rnd(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16).contiguous()

    w = {"model.embed_tokens.weight": rnd(VOCAB_SIZE, hidden, std=1.0),
         "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
         "lm_head.weight": rnd(VOCAB_SIZE, hidden, std=3.0 / math.sqrt(hidden))}
    s = 1.0 / math.sqrt(hidden)
    for i in range(NUM_LAYERS):
        p = f"model.layers.{i}."
        # q/k scaled up so attention weights are far from uniform (attention then matters).
        w[p + "self_attn.q_proj.weight"] = rnd(NUM_HEADS * head_dim, hidden, std=2 * s)
        w[p + "self_attn.k_proj.weight"] = rnd(NUM_KV_HEADS * head_dim, hidden, std=2 * s)
        w[p + "self_attn.v_proj.weight"] = rnd(NUM_KV_HEADS * head_dim, hidden, std=s)
        w[p + "self_attn.o_proj.weight"] = rnd(hidden, NUM_HEADS * head_dim, std=s)
        w[p + "mlp.gate_proj.weight"] = rnd(INTERMEDIATE, hidden, std=s)
        w[p + "mlp.up_proj.weight"] = rnd(INTERMEDIATE, hidden, std=s)
        w[p + "mlp.down_proj.weight"] = rnd(hidden, INTERMEDIATE, std=1 / math.sqrt(INTERMEDIATE))
        w[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        w[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    return w


def make_tiny_llama(path: str | Path, seed: int = 0, head_dim: int = HEAD_DIM) -> Path:
    """Write the tiny model into ``path`` (created) and return it."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok_json = _tokenizer_json()
    vocab = json.loads(tok_json)["model"]["vocab"]
    bos_id, eos_id = len(vocab), len(vocab) + 1  # the two added specials
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": NUM_HEADS * head_dim,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": NUM_HEADS,
        "num_key_value_heads": NUM_KV_HEADS,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": VOCAB_SIZE,
        "tie_word_embeddings": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "bfloat16",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "tokenizer.json").write_text(tok_json)
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "model_max_length": MAX_POSITIONS,
        "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                         "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}",
    }, indent=2))
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": bos_id, "eos_token_id": eos_id}))
    save_file(_weights(seed, head_dim), str(path / "model.safetensors"))
    return path


# --- engine runner: ``python tests/vllm_models.py SPEC_JSON OUT_JSON`` --------------------------
# vLLM on CPU spawns processes, so engines run in a fresh interpreter started by the tests (and
# guarded by ``__main__``). SPEC_JSON: {"model": dir, "prompts": [...], "max_tokens": n,
# "runs": [{"name": str, "llm": {LLM kwargs},
# "requests": [[prompt index, extra_args|null(, cache_salt)], ...] (or "phases": [requests, ...]:
# one generate call each, in order; "logprobs": true: OUT["logprobs"][name], the log-prob of each
# generated token),
# "bad_extra_args": {...} (optional: a request that must be refused),
# "score": [[extra_args|null, cache_salt|null], ...] (optional: teacher-forced log-probs of the
# first run's continuations, one pass per entry), "singles": true (optional: every request again,
# alone, into OUT[name + "/single"])}, ...]}. The engines run one after the other in
# this process. OUT_JSON: {name: [token ids per request], "seconds": {...}, "errors": {name:
# message of the refused request}, "kv": {name: {"blocks", "block_size", "preemptions"}},
# "scores": {name: [[log-prob of each continuation token] per prompt] per score entry]}}.

# Lengths (byte tokens) 50, 3, 270, 80, 300: with 24 new tokens the first and last cross a
# 64-token page edge while decoding (preemption needs that in a small pool).
PROMPTS = [
    "Hello world, this is a test of paged FP4 KV pages.",
    "abc",
    "The quick brown fox jumps over the lazy dog. " * 6,  # 270 tokens: 3 pages of 128
    "0123456789" * 8,
    # shares its first two 128-token pages with the third prompt (prefix-cache hits)
    "The quick brown fox jumps over the lazy dog. " * 6 + "And then, what happened next?",
]


def _attention_impls(model) -> list[str]:
    return sorted({type(m.impl).__name__ for m in model.modules() if hasattr(m, "impl")})


def run_engines(spec: dict) -> dict:
    import gc
    import time

    from vllm import LLM, SamplingParams

    def params(extra_args, logprobs=None):
        return SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True,
                              extra_args=extra_args, logprobs=logprobs)

    out: dict = {"seconds": {}, "errors": {}, "kv": {}, "scores": {}}
    first: list | None = None  # (prompt token ids, continuation) of the first run
    for run in spec["runs"]:
        t0 = time.time()
        llm = LLM(model=spec["model"], **run["llm"])
        phases = run.get("phases") or [
            run.get("requests") or [[i, None] for i in range(len(spec["prompts"]))]]
        lp = 0 if run.get("logprobs") else None
        res = []
        for reqs in phases:  # one generate call each: a later phase can hit an earlier's blocks
            prompts = [{"prompt": spec["prompts"][r[0]],
                        **({"cache_salt": r[2]} if len(r) > 2 else {})} for r in reqs]
            res += llm.generate(prompts, [params(r[1], lp) for r in reqs], use_tqdm=False)
        out[run["name"]] = [list(r.outputs[0].token_ids) for r in res]
        if lp is not None:  # log-prob of each sampled token
            out.setdefault("logprobs", {})[run["name"]] = [
                [d[t].logprob for d, t in zip(r.outputs[0].logprobs, r.outputs[0].token_ids,
                                              strict=True)] for r in res]
        if first is None:
            first = [(list(r.prompt_token_ids), list(r.outputs[0].token_ids)) for r in res]
        reqs = phases[-1]
        if run.get("singles"):
            out[run["name"] + "/single"] = [
                list(llm.generate([p], params(r[1]), use_tqdm=False)[0].outputs[0].token_ids)
                for p, r in zip(prompts, reqs, strict=True)]
        for extra, salt in run.get("score", []):
            out["scores"].setdefault(run["name"], []).append(_score(llm, first, extra, salt))
        cc = llm.llm_engine.vllm_config.cache_config
        out["kv"][run["name"]] = {"blocks": cc.num_gpu_blocks, "block_size": cc.block_size,
                                  "preemptions": _preemptions(llm)}
        out.setdefault("impls", {})[run["name"]] = llm.apply_model(_attention_impls)
        out.setdefault("procs", {})[run["name"]] = [
            str(p) for p in llm.llm_engine.vllm_config.model_config.logits_processors or []]
        if run.get("bad_extra_args") is not None:
            try:
                llm.generate(spec["prompts"][:1], params(run["bad_extra_args"]), use_tqdm=False)
            except Exception as e:  # the refusal is the expected outcome
                out["errors"][run["name"]] = f"{type(e).__name__}: {e}"
        out["seconds"][run["name"]] = round(time.time() - t0, 1)
        del llm, res
        gc.collect()
    return out


def _score(llm, first, extra_args, cache_salt) -> list[list[float]]:
    """Log-prob of each continuation token given everything before it (prompt_logprobs)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, extra_args=extra_args)
    prompts = [{"prompt_token_ids": p + c, **({"cache_salt": cache_salt} if cache_salt else {})}
               for p, c in first]
    res = llm.generate(prompts, params, use_tqdm=False)
    scores = []
    for (p, c), r in zip(first, res, strict=True):
        lps = r.prompt_logprobs[len(p):]
        scores.append([lp[t].logprob for lp, t in zip(lps, c, strict=True)])
    return scores


def _preemptions(llm) -> int | None:
    """vLLM's preemption counter (None when stats are off)."""
    try:
        return int(sum(getattr(m, "value", 0) for m in llm.get_metrics()
                       if m.name == "vllm:num_preemptions"))
    except Exception:  # stats disabled
        return None


if __name__ == "__main__":
    import sys

    # Run through the importable module, not __main__, so functions sent to the workers
    # (apply_model) pickle by reference.
    import vllm_models

    _spec = json.loads(Path(sys.argv[1]).read_text())
    Path(sys.argv[2]).write_text(json.dumps(vllm_models.run_engines(_spec)))
