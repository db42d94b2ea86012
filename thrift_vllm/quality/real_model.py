"""Quality harness for a pretrained HF model with its own tokenizer (issue 17: SmolLM2-135M).

``python -m thrift_vllm.quality.real_model --model DIR --lengths 2048 --samples 16 \\
    --methods fp16,store/nvfp4,... --out OUT [--max-minutes M]`` (resumable: ``OUT/results.json``
accumulates per (length, method); rerun the same command to continue).

One sample = one forward of exactly ``L`` tokens: ``<|endoftext|>`` + a window of real text with
a pass-key sentence inserted at depth 0.1 / 0.2 / 0.3 / 0.4 of the text (cycled) + the question
+ the answer. Text: the Python reference manual of the running interpreter's standard library
(``pydoc_data/topics.py``, every topic in key order), never used for tuning anything here;
windows evenly spaced over it. Per sample:

* ``nll``: mean NLL per token of the text tokens of the second half of the sequence (the needle
  lies in the first half, the question and answer are excluded);
* ``acc``: teacher-forced exact match of the answer tokens (" " and five digits): the argmax at
  every answer position is the answer token (= greedy decoding reproduces it, for exact
  attention).

Methods (names):
* ``fp16``, ``fp4/F``, ``thrift/F/SEL/B%``: ``thrift_vllm.attention`` (the operator) in every
  layer, one prefill (``harness.use_method``).
* ``fp4-kv4/F``, ``fp16-kv4/F``, ``thrift-kv4/F/SEL/B%``: the ``nvfp4`` paged layout in two steps
  (``paged_eval``): step 1 = the first ``L // 2 - 1`` tokens, step 2 = the rest (every scored
  query; the needle is in step 1, so it is seen only through FP4 storage).
* ``store/F[/LEVERS]``: FP4 storage with full-precision math (``kv_levers``): every K/V, the
  query's own included, read back from FP4 (decode semantics: written, then read); LEVERS =
  ``smooth-first``, ``smooth-head``, ``smooth-unit``, ``hadamard``, ``vtok`` (V quantised along
  tokens, the auto layout's ``v4``; default along head_dim, the nvfp4 layout's) joined by ``+``.
* ``store-auto/F/SEL/B%[/LEVERS]``: the ``auto`` layout with that math: the selected blocks (from
  the model-dtype keys, the auto layout's summaries) read model-dtype K/V, the rest FP4 storage.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from thrift_vllm import kv_levers
from thrift_vllm.quality import harness
from thrift_vllm.quality.methods import MethodConfig, kv_config
from thrift_vllm.quality.paged_eval import logits_two_step

ATTN_NAME = "thrift_real"
NEEDLE = "\nThe secret pass key is {key}. Remember it: {key}.\n"
QUESTION = "\nWhat is the secret pass key? The secret pass key is"
DEPTHS = (0.1, 0.2, 0.3, 0.4)
_STORE: dict = {}


# ------------------------------------------------------------------------------- methods

def parse_method(name: str):
    """Method name -> ("operator" | "paged", MethodConfig) or ("store", dict). ValueError
    naming the value when it is not one of the module docstring's forms."""
    parts = name.split("/")
    try:
        if name == "fp16":
            return "operator", MethodConfig("fp16")
        head, fmt = parts[0], parts[1]
        if head == "fp4" and len(parts) == 2:
            return "operator", MethodConfig("fp4", fmt)
        if head == "thrift" and len(parts) == 4:
            return "operator", MethodConfig("thrift", fmt, _pct(parts[3]), parts[2])
        if head in ("fp4-kv4", "fp16-kv4") and len(parts) == 2:
            return "paged", kv_config("nvfp4", fmt, 0.0 if head == "fp4-kv4" else 1.0)
        if head == "thrift-kv4" and len(parts) == 4:
            return "paged", kv_config("nvfp4", fmt, _pct(parts[3]), parts[2])
        if head == "store" and len(parts) in (2, 3):
            return "store", dict(fmt=fmt, budget=0.0, **_levers(parts[2:]))
        if head == "store-auto" and len(parts) in (4, 5):
            return "store", dict(fmt=fmt, selection=parts[2], budget=_pct(parts[3]),
                                 **_levers(parts[4:]))
    except (IndexError, KeyError):
        pass
    raise ValueError(f"unknown method {name!r} (see thrift_vllm.quality.real_model)")


def _pct(s: str) -> float:
    if not s.endswith("%"):
        raise KeyError(s)
    return float(s[:-1]) / 100


def _levers(parts: list[str]) -> dict:
    out = {"smooth": "none", "rotate": False}
    for lev in (parts[0].split("+") if parts else []):
        if lev.startswith("smooth-") and lev[7:] in kv_levers.SMOOTHS[1:]:
            out["smooth"] = lev[7:]
        elif lev == "hadamard":
            out["rotate"] = True
        elif lev == "vtok":  # V quantised along tokens, as the auto layout stores it
            out["v_axis"] = "tokens"
        else:
            raise KeyError(lev)
    return out


def _store_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                   **kwargs):
    """The attention of a ``store`` method: q ``[1, Hq, S, D]``, k/v ``[1, Hkv, S, D]``."""
    if not _STORE:
        return harness.thrift_attention_forward(module, query, key, value, attention_mask,
                                                scaling, dropout, **kwargs)
    st = _STORE
    if "operator" in st:
        out = operator_causal_chunks(query, key, value, st["operator"], scaling)
        return out.transpose(1, 2).contiguous(), None
    k_lo, v_lo = kv_levers.store_kv(key, value, st["fmt"], st["smooth"], st["rotate"],
                                    v_axis=st.get("v_axis", "head_dim"))
    if st["budget"] <= 0:
        out = kv_levers.storage_attention(query, k_lo, v_lo, scaling)
    else:
        from thrift_vllm.selection import select_blocks_reference

        sel = select_blocks_reference(query.float(), key.float(), fp16_budget=st["budget"],
                                      selection=st["selection"], block_size=64, causal=True)
        out = kv_levers.mixed_attention(query, key, value, k_lo, v_lo, sel, 64, scaling)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def operator_causal_chunks(q, k, v, cfg: MethodConfig, scale=None, chunk: int = 256):
    """``thrift_vllm.attention(impl="torch")`` of a square causal prefill, computed per chunk
    of ``chunk`` query rows against only the keys they can see (the reference itself scores
    every key of every row): ~2x less work on CPU, the same numerics (FP4 groups of V along
    tokens and of P inside tiles are aligned to token 0, so truncating at a multiple of the
    block size changes no group). q ``[B, Hq, S, D]``, k/v ``[B, Hkv, S, D]``, fp16/bf16."""
    from thrift_vllm.reference import thrift_attention_reference
    from thrift_vllm.selection import select_blocks_reference

    bs = cfg.block_size
    if chunk % bs:
        raise ValueError(f"chunk {chunk} must be a multiple of the block size {bs}")
    f = cfg.budget
    sel = select_blocks_reference(q, k, fp16_budget=f, selection=cfg.selection, block_size=bs,
                                  causal=True, force_sink_recent=cfg.force_sink_recent)
    S = q.shape[2]
    outs = []
    for r0 in range(0, S, chunk):
        r1 = min(r0 + chunk, S)
        outs.append(thrift_attention_reference(
            q[:, :, r0:r1], k[:, :, :r1], v[:, :, :r1], sel[:, :, r0 // bs:-(-r1 // bs)],
            causal=True, quant_format=cfg.quant_format, block_size=bs, sm_scale=scale))
    return torch.cat(outs, 2)


def load_model(model_dir: str, device: str = "cpu", dtype: torch.dtype = torch.bfloat16):
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.masking_utils import AttentionMaskInterface

    harness.register()
    AttentionInterface.register(ATTN_NAME, _store_forward)
    AttentionMaskInterface.register(ATTN_NAME, harness._no_mask)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype,
                                                 attn_implementation=ATTN_NAME)
    model.config.use_cache = False
    return model.to(device).eval()


# ---------------------------------------------------------------------------------- data

TEXTS = ("pydoc", "pydoc+docstrings")


def _docstrings(max_chars: int) -> str:
    """Docstrings (>= 300 chars) of the standard library's modules, classes and functions, in
    sorted file order (test packages and site-packages skipped), up to ``max_chars``."""
    import ast
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    out, n = [], 0
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root).parts
        if any(p in ("test", "tests", "site-packages", "idle_test", "lib2to3") for p in rel):
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                 ast.AsyncFunctionDef)):
                d = ast.get_docstring(node)
                if d and len(d) >= 300:
                    out.append(d)
                    n += len(d) + 2
                    if n >= max_chars:
                        return "\n\n".join(out)
    return "\n\n".join(out)


def text_ids(tok, text: str = "pydoc") -> tuple[np.ndarray, dict]:
    """Token ids of the evaluation text and its description. ``"pydoc"``: the reference manual
    (``pydoc_data.topics``, every topic in key order, ~113K SmolLM2 tokens: 16 windows of 4K
    do not overlap); ``"pydoc+docstrings"`` appends long docstrings of the standard library
    (``_docstrings``: ~1.1M characters, ~400K tokens in all on 3.11) for 8K windows."""
    import hashlib
    import sys
    from pydoc_data import topics

    if text not in TEXTS:
        raise ValueError(f"text must be one of {TEXTS}, got {text!r}")
    body = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    if text == "pydoc+docstrings":
        body += "\n\n" + _docstrings(3_000_000)
    ids = np.asarray(tok(body).input_ids, dtype=np.int64)
    return ids, {"source": {"pydoc": "pydoc_data/topics.py (Python reference manual)",
                            "pydoc+docstrings": "pydoc_data/topics.py + stdlib docstrings"}[text],
                 "python": sys.version.split()[0], "chars": len(body), "tokens": int(ids.size),
                 "sha256": hashlib.sha256(body.encode()).hexdigest()}


def make_samples(tok, stream: np.ndarray, length: int, n: int, seed: int = 17) -> list[dict]:
    """``n`` samples of exactly ``length`` ids (module docstring), evenly spaced windows."""
    q_ids = tok(QUESTION).input_ids
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, length, i])
        key = str(int(rng.integers(10000, 100000)))
        needle, ans = tok(NEEDLE.format(key=key)).input_ids, tok(" " + key).input_ids
        n_text = length - 1 - len(needle) - len(q_ids) - len(ans)
        if n_text < length // 2 or stream.size < n_text:
            raise ValueError(f"length {length} too short / text too small")
        start = (stream.size - n_text) * i // max(1, n - 1)
        w = stream[start:start + n_text].tolist()
        depth = DEPTHS[i % len(DEPTHS)]
        p = int(depth * n_text)
        ids = [0, *w[:p], *needle, *w[p:], *q_ids, *ans]
        q0 = length - len(ans) - len(q_ids)
        out.append({"ids": ids, "nll_pos": (length // 2, q0), "ans_pos": length - len(ans),
                    "depth": depth, "key": key})
    return out


@torch.inference_mode()
def score(model, kind: str, cfg, sample: dict) -> tuple[float, float]:
    """(NLL per token of the scored text, 1.0 / 0.0 retrieval) of one sample under a method."""
    ids = sample["ids"]
    dev = next(model.parameters()).device
    if kind == "paged":
        with harness.use_method(cfg, "auto"):
            logits = logits_two_step(model, harness._CURRENT["paged"], ids,
                                     sample["nll_pos"][0] - 1)
    else:
        x = torch.tensor([ids], device=dev)
        if kind == "store":
            _STORE.update(cfg)
            try:
                h = model.model(input_ids=x, use_cache=False).last_hidden_state[0]
            finally:
                _STORE.clear()
        elif cfg.method != "fp16" and not x.is_cuda:  # CPU: the reference, causal key ranges
            _STORE.update(operator=cfg)
            try:
                h = model.model(input_ids=x, use_cache=False).last_hidden_state[0]
            finally:
                _STORE.clear()
        else:
            with harness.use_method(cfg, "auto"):
                h = model.model(input_ids=x, use_cache=False).last_hidden_state[0]
        logits = model.lm_head(h).float()
    tgt = torch.tensor(ids, device=logits.device)
    a, b = sample["nll_pos"]
    nll = torch.nn.functional.cross_entropy(logits[a - 1:b - 1], tgt[a:b])
    s = sample["ans_pos"]
    acc = bool((logits[s - 1:-1].argmax(-1) == tgt[s:]).all())
    return float(nll), float(acc)


# ---------------------------------------------------------------------------------- main

def run(model_dir: str, lengths: list[int], samples: int, methods: list[str], out_dir: str,
        max_minutes: float | None = None, device: str | None = None,
        text: str = "pydoc") -> dict:
    from transformers import AutoTokenizer

    t0 = time.time()
    parsed = {m: parse_method(m) for m in methods}
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    if doc and (doc.get("samples") != samples or doc.get("model") != os.path.abspath(model_dir)):
        raise ValueError(f"{path} is from another model or sample count: use another --out")
    tok = AutoTokenizer.from_pretrained(model_dir)
    stream, desc = text_ids(tok, text)
    if doc.get("text") and doc["text"]["sha256"] != desc["sha256"]:
        raise ValueError(f"{path} was made on another text: use another --out")
    model = load_model(model_dir, device)
    doc.update(model=os.path.abspath(model_dir), samples=samples, device=device,
               torch=torch.__version__, text=desc, results=doc.get("results", {}))
    for L in lengths:  # sample-major: a run cut short leaves paired samples across methods
        data = make_samples(tok, stream, L, samples)
        for i in range(samples):
            for m in methods:
                res = doc["results"].setdefault(str(L), {}).setdefault(m, {"nll": [], "acc": []})
                kind, cfg = parsed[m]
                if len(res["nll"]) != i:
                    continue
                if max_minutes is not None and time.time() - t0 > max_minutes * 60:
                    print(f"[real_model] stopped after --max-minutes ({path})")
                    return doc
                ts = time.time()
                nll, acc = score(model, kind, cfg, data[len(res["nll"])])
                res["nll"].append(nll)
                res["acc"].append(acc)
                res.setdefault("seconds", []).append(time.time() - ts)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(doc, indent=1) + "\n")
                os.replace(tmp, path)
                print(f"[real_model] L={L} {m} #{len(res['nll'])}: nll {nll:.4f} acc {acc:.0f}"
                      f" ({time.time() - ts:.0f} s)", flush=True)
    return doc


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m thrift_vllm.quality.real_model",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--lengths", default="2048")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--methods", required=True, help="comma-separated method names")
    p.add_argument("--out", required=True)
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--text", choices=TEXTS, default="pydoc")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    run(a.model, [int(x) for x in a.lengths.split(",")], a.samples, a.methods.split(","),
        a.out, a.max_minutes, a.device, a.text)


if __name__ == "__main__":
    main()
