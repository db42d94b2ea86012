"""The shipped embedded model (models/thrift-embedded, issue 5): it loads, has the documented
shape, and on CPU at 1K context the quality ordering holds on fixed held-out samples:
NLL fp16 < thrift (quest, 25 %) < fp4, and retrieval fp16 >= thrift >= fp4.

The H200 figures at 4K-32K are in BENCHMARKS.md; this is the small CI version the issue asks for
(ordering, not exact numbers). Deterministic: the samples are seeded and the CPU path is the
PyTorch reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from thrift_vllm.quality import data as qdata
from thrift_vllm.quality import harness

MODEL = Path(__file__).resolve().parents[1] / "models" / "thrift-embedded"
L, N = 1024, 4


def test_embedded_model_files_and_shape():
    cfg = json.loads((MODEL / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["head_dim"]) == (6, 384, 6, 2, 64)
    assert cfg["max_position_embeddings"] >= 32768
    prov = json.loads((MODEL / "thrift_model.json").read_text())
    assert prov["finished"] and prov["config"]["total_steps"] == prov["step"]
    assert (MODEL / "model.safetensors").stat().st_size <= 20 * 2**20


@pytest.fixture(scope="module")
def scores():
    model = harness.load_model(str(MODEL), "cpu")
    corpus = qdata.load_corpus()
    windows = qdata.heldout_windows(corpus.heldout, L - 1, N)
    tasks = {"kv": qdata.eval_tasks("kv", L, N, corpus.heldout)}
    out = {}
    for cfg in (harness.MethodConfig("fp16"), harness.MethodConfig("fp4"),
                harness.MethodConfig("thrift", "nvfp4", 0.25, "quest")):
        r = harness.evaluate_config(model, cfg, L, windows, tasks, impl="torch")
        out[cfg.method] = (sum(r["nll"]) / N, sum(r["acc_kv"]) / N)
    return out


def test_embedded_model_quality_ordering_cpu(scores):
    (n16, a16), (n4, a4), (nt, at) = scores["fp16"], scores["fp4"], scores["thrift"]
    assert n16 < 2.5, "the trained model should predict held-out stdlib bytes well"
    assert n4 - n16 > 0.05, scores  # FP4 hurts even at 1K (0.13 nats/byte when written)
    assert n16 < nt < n4, scores
    assert a16 >= at >= a4, scores
