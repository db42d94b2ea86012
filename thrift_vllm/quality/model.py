"""The embedded model: byte-level tokenizer files, the Llama config and ``export``.

Tokenizer. ``tokenizer.json`` (``tokenizers`` library): a BPE model with no merges over the 256
GPT-2 ``ByteLevel`` characters, so byte ``b`` is token ``b`` and any UTF-8 text (indeed any byte
string) round-trips; ``<bos>`` = 256, ``<eos>`` = 257, ``<pad>`` = 258. The vocabulary is padded
to 320 (a multiple of 64) for the embedding; ids 259..319 are never produced.

Model. Llama, hidden 384, 6 layers, 6 query heads / 2 KV heads (GQA 3:1), head_dim 64, SwiGLU
768, RoPE theta 500000 with 65536 positions, tied embeddings: 7.80 M parameters, 15.6 MB in bf16.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from thrift_vllm.quality.data import BOS, EOS, N_BYTE_TOKENS, PAD

VOCAB_SIZE = 320
SPECIALS = {"<bos>": BOS, "<eos>": EOS, "<pad>": PAD}

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

DEFAULT_CONFIG = dict(
    hidden_size=384, intermediate_size=768, num_hidden_layers=6, num_attention_heads=6,
    num_key_value_heads=2, head_dim=64, rope_theta=500000.0, max_position_embeddings=65536,
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the one ``ByteLevel`` uses)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def build_tokenizer():
    """The byte-level ``tokenizers.Tokenizer`` (byte b -> id b, specials 256..258)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    b2u = _bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(N_BYTE_TOKENS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False)
                            for s in sorted(SPECIALS, key=SPECIALS.get)])
    for s, i in SPECIALS.items():
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok


def write_tokenizer(out_dir: str | os.PathLike) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
        "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": DEFAULT_CONFIG["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}, indent=2) + "\n")


def encode(data: bytes | str) -> list[int]:
    """Token ids of ``data`` (what ``tokenizer.json`` gives, without specials)."""
    return list(data.encode("utf-8") if isinstance(data, str) else data)


def make_config(**overrides):
    """``LlamaConfig`` of the embedded model; ``overrides`` change any field (tests use tiny
    sizes)."""
    from transformers import LlamaConfig

    kw = dict(vocab_size=VOCAB_SIZE, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
              rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=True,
              attention_bias=False, mlp_bias=False, initializer_range=0.02, **DEFAULT_CONFIG)
    kw.update(overrides)
    theta = kw.pop("rope_theta")
    return LlamaConfig(rope_parameters={"rope_type": "default", "rope_theta": theta}, **kw)


def make_model(config=None, seed: int = 0):
    """A freshly initialised ``LlamaForCausalLM`` (fp32) with a fixed seed."""
    import torch
    from transformers import LlamaForCausalLM

    config = config or make_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def export(model, out_dir: str | os.PathLike, dtype: str = "bfloat16", extra: dict | None = None):
    """Write the directory transformers and vLLM load: ``config.json``,
    ``generation_config.json``, ``model.safetensors`` (``dtype``, no pickle), tokenizer files.
    ``extra`` goes to ``thrift_model.json`` (training provenance)."""
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    was = next(model.parameters()).dtype
    model.to(getattr(torch, dtype))
    try:
        model.save_pretrained(str(out), safe_serialization=True)
    finally:
        model.to(was)
    write_tokenizer(out)
    if extra is not None:
        (out / "thrift_model.json").write_text(json.dumps(extra, indent=2) + "\n")
    return out
