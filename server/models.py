"""The model ``thrift-vllm serve`` uses when no MODEL is given.

Order: ``$THRIFT_VLLM_MODELS_DIR`` (or ``<repo>/models`` in a source checkout, else
``~/.cache/thrift-vllm/models``) ``/thrift-embedded`` — the trained embedded model, once it is
shipped there — else ``/thrift-placeholder-untrained``: the same architecture
(``thrift_vllm.quality.model.make_config``) with random weights (seed 0), created on first use.
The placeholder produces noise; it exists so the server, the tests and deployments can run before
the trained model exists, and every place that serves it says so.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

TRAINED_NAME = "thrift-embedded"
PLACEHOLDER_NAME = "thrift-placeholder-untrained"
PLACEHOLDER_SEED = 0
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

PLACEHOLDER_README = """# thrift-placeholder-untrained — NOT A TRAINED MODEL

Random weights (seed {seed}), made by `scripts/make_placeholder_model.py` /
`thrift_vllm.server.models.make_placeholder`. It has the architecture of the project's embedded
model (`thrift_vllm.quality.model.make_config()`: Llama, byte-level vocabulary, hidden 384,
6 layers, 6 query / 2 KV heads, head_dim 64), so it loads and runs exactly like the trained model
will, but its output is noise. `thrift-vllm serve` uses it only until a trained model is shipped
as `{trained}/` next to this directory.
"""


def repo_root() -> Path | None:
    """The source checkout this package runs from (editable install), or None."""
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file() and (root / "thrift_vllm").is_dir():
        return root
    return None


def models_dir() -> Path:
    env = os.environ.get("THRIFT_VLLM_MODELS_DIR")
    if env:
        return Path(env)
    root = repo_root()
    if root is not None:
        return root / "models"
    return Path.home() / ".cache" / "thrift-vllm" / "models"


def is_model_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return all((p / f).is_file() for f in _REQUIRED_FILES)


def make_placeholder(out_dir: str | os.PathLike, seed: int = PLACEHOLDER_SEED,
                     overwrite: bool = False) -> Path:
    """Write the untrained placeholder to ``out_dir`` (atomically: a temporary sibling renamed
    into place, so a concurrent server never sees half a model). Returns ``out_dir``."""
    from thrift_vllm.quality.model import export, make_config, make_model, n_params

    out = Path(out_dir)
    if is_model_dir(out) and not overwrite:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    config = make_config()
    config.thrift_note = "UNTRAINED PLACEHOLDER: random weights, output is noise"
    model = make_model(config, seed=seed)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    try:
        export(model, tmp, extra={
            "name": PLACEHOLDER_NAME, "trained": False, "seed": seed,
            "note": "untrained placeholder with the embedded model's architecture; "
                    "random weights, output is noise",
            "n_params": n_params(model)})
        (tmp / "README.md").write_text(PLACEHOLDER_README.format(seed=seed, trained=TRAINED_NAME))
        if out.exists():
            if not overwrite and is_model_dir(out):  # another process won the race
                shutil.rmtree(tmp)
                return out
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def default_model(create: bool = True) -> tuple[Path, str, bool]:
    """``(directory, served name, is_placeholder)`` of the model served when none is given."""
    base = models_dir()
    trained = base / TRAINED_NAME
    if is_model_dir(trained):
        return trained, TRAINED_NAME, False
    placeholder = base / PLACEHOLDER_NAME
    if not is_model_dir(placeholder):
        if not create:
            raise FileNotFoundError(f"no model at {trained} or {placeholder}")
        make_placeholder(placeholder)
    return placeholder, PLACEHOLDER_NAME, True


def describe(path: str | os.PathLike) -> dict:
    """``thrift_model.json`` of a model directory ({} when absent or unreadable)."""
    try:
        return json.loads((Path(path) / "thrift_model.json").read_text())
    except (OSError, ValueError):
        return {}
