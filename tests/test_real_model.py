"""thrift_vllm.quality.real_model (issue 17): method names, the pass-key samples and the scoring
paths, on a tiny random model with the byte tokenizer (CPU, seconds)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from thrift_vllm.quality import model as qmodel
from thrift_vllm.quality import real_model as R  # noqa: N812

TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tiny_real")
    m = qmodel.make_model(qmodel.make_config(initializer_range=0.2, **TINY), seed=3)
    qmodel.export(m, out, dtype="float32")
    tok = AutoTokenizer.from_pretrained(out)
    return R.load_model(str(out), "cpu", torch.float32), tok


def test_parse_method_names():
    kind, cfg = R.parse_method("thrift/nvfp4/quest/2.5%")
    assert kind == "operator" and cfg.fp16_budget == 0.025 and cfg.selection == "quest"
    kind, cfg = R.parse_method("thrift-kv4/nvfp4/block_mean/5%")
    assert kind == "paged" and cfg.kv_layout == "nvfp4" and cfg.fp16_budget == 0.05
    assert R.parse_method("fp16-kv4/nvfp4")[1].budget == 1.0
    assert R.parse_method("store/mxfp4/smooth-first+hadamard") == (
        "store", dict(fmt="mxfp4", budget=0.0, smooth="first", rotate=True))
    assert R.parse_method("store/nvfp4/vtok+hadamard")[1] == dict(
        fmt="nvfp4", budget=0.0, smooth="none", rotate=True, v_axis="tokens")
    assert R.parse_method("store-auto/nvfp4/block_mean/10%/smooth-unit")[1] == dict(
        fmt="nvfp4", selection="block_mean", budget=0.1, smooth="unit", rotate=False)
    for bad in ("fp8", "thrift/nvfp4/block_mean/5", "store/nvfp4/smooth-mode",
                "store/nvfp4/rotate", "fp4-kv4", ""):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            R.parse_method(bad)


def test_samples_layout(tiny):
    _, tok = tiny
    stream, desc = R.text_ids(tok)
    assert desc["tokens"] == stream.size > 100_000
    samples = R.make_samples(tok, stream, 301, 6)
    assert [s["depth"] for s in samples] == [0.1, 0.2, 0.3, 0.4, 0.1, 0.2]
    for s in samples:
        ids = s["ids"]
        assert len(ids) == 301 and ids[0] == 0
        a, b = s["nll_pos"]
        ans = tok(" " + s["key"]).input_ids
        assert ids[s["ans_pos"]:] == ans and b == s["ans_pos"] - len(tok(R.QUESTION).input_ids)
        text = tok.decode(ids[1:a])
        assert f"pass key is {s['key']}" in text  # the needle lies before the scored half
        assert s["key"] not in tok.decode(ids[a:b])
    assert len({s["key"] for s in samples}) == 6
    with pytest.raises(ValueError, match="novels"):
        R.text_ids(tok, "novels")
    assert R.make_samples(tok, stream, 301, 6)[3]["ids"] == samples[3]["ids"]  # deterministic


def test_scoring_paths_agree_where_they_must(tiny):
    model, tok = tiny
    stream, _ = R.text_ids(tok)
    sample = R.make_samples(tok, stream, 256, 2)[1]
    res = {m: R.score(model, *R.parse_method(m), sample) for m in (
        "fp16", "store-auto/nvfp4/block_mean/100%", "store/nvfp4", "store-auto/nvfp4/quest/0%",
        "store/nvfp4/hadamard", "fp16-kv4/nvfp4", "fp4/nvfp4")}
    assert all(math.isfinite(v[0]) for v in res.values())
    # every block selected = the model-dtype K/V = exact attention (the operator's fp16 row casts
    # this fp32 model's q/k/v to fp16, the store path does not: a rounding-sized difference)
    assert abs(res["store-auto/nvfp4/block_mean/100%"][0] - res["fp16"][0]) < 2e-3
    assert abs(res["store/nvfp4"][0] - res["fp16"][0]) > 4e-3  # FP4 storage: 15x the rounding
    assert res["store-auto/nvfp4/quest/0%"] == res["store/nvfp4"]  # budget 0 = all FP4 storage
    assert res["store/nvfp4/hadamard"][0] != res["store/nvfp4"][0]


@pytest.mark.parametrize("method,budget,sel,S", [("fp4", 0.0, "block_mean", 300),
                                                 ("thrift", 0.1, "block_mean", 333),
                                                 ("thrift", 0.3, "quest", 256)])
def test_operator_causal_chunks_equals_the_operator(method, budget, sel, S):
    import thrift_vllm
    from thrift_vllm.quality.methods import MethodConfig

    torch.manual_seed(S)
    q = torch.randn(1, 4, S, 64, dtype=torch.bfloat16)
    k = torch.randn(1, 2, S, 64, dtype=torch.bfloat16) + torch.randn(64).bfloat16()
    v = torch.randn(1, 2, S, 64, dtype=torch.bfloat16)
    cfg = MethodConfig(method, "nvfp4", budget, sel)
    ref = thrift_vllm.attention(q, k, v, causal=True, impl="torch", sm_scale=0.2,
                                **{k_: v_ for k_, v_ in cfg.operator_kwargs().items()
                                   if k_ != "bulk_math"})
    out = R.operator_causal_chunks(q, k, v, cfg, 0.2, chunk=128)
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1e-2)
    assert (out.float() - ref.float()).abs().max() < 1e-2
    with pytest.raises(ValueError, match="100"):
        R.operator_causal_chunks(q, k, v, cfg, 0.2, chunk=100)
