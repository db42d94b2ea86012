"""Per-device arithmetic policy of the vLLM backend (thrift_vllm.backend.config, plain Python):
the prefill route, the decode math, what the budget changes and what the engine says at start."""

from __future__ import annotations

import pytest

from thrift_vllm.backend.config import (
    ThriftBackendConfig,
    _env_values,
    budget_effect,
    fp16_units,
    startup_lines,
)
from thrift_vllm.selection import BlockGrid, budget_to_k


def test_route_fields_validated():
    c = ThriftBackendConfig()
    assert (c.prefill, c.decode_math) == ("auto", "auto")
    for field, bad in (("prefill", "fa3"), ("decode_math", "bf16"), ("prefill", None)):
        with pytest.raises(ValueError, match=field):
            ThriftBackendConfig(**{field: bad})
    with pytest.raises(ValueError, match="bulk_math 'fp8' has no effect with prefill 'flash'"):
        ThriftBackendConfig(prefill="flash", bulk_math="fp8")
    assert _env_values({"THRIFT_VLLM_PREFILL": "thrift", "THRIFT_VLLM_DECODE_MATH": "fp4"}) == {
        "prefill": "thrift", "decode_math": "fp4"}


def test_resolve_prefill():
    auto = ThriftBackendConfig()
    assert auto.resolve_prefill(None) == "flash"
    assert auto.resolve_prefill("no CUDA") == "thrift"
    # an explicit FP4 bulk math asks for the FP4 prefill semantics
    assert ThriftBackendConfig(bulk_math="fp8").resolve_prefill(None) == "thrift"
    assert ThriftBackendConfig(prefill="thrift").resolve_prefill(None) == "thrift"
    assert ThriftBackendConfig(prefill="flash").resolve_prefill(None) == "flash"
    with pytest.raises(ValueError, match="prefill 'flash' cannot run: sm_120"):
        ThriftBackendConfig(prefill="flash").resolve_prefill("sm_120")


def test_resolve_decode_math():
    assert ThriftBackendConfig().resolve_decode_math(fp4_mma=True) == "fp4"
    assert ThriftBackendConfig().resolve_decode_math(fp4_mma=False) == "fp16"
    for explicit in ("fp4", "fp16"):
        for mma in (True, False):
            assert ThriftBackendConfig(decode_math=explicit).resolve_decode_math(mma) == explicit


@pytest.mark.parametrize("kv_layout,decode_math,prefill,effect", [
    ("auto", "fp16", "flash", True),
    ("auto", "fp4", "thrift", True),
    ("nvfp4", "fp4", "flash", True),
    ("nvfp4", "fp16", "thrift", True),  # the FP4 prefill semantics still use it
    ("nvfp4", "fp16", "flash", False),  # Hopper's default with the nvfp4 layout
])
def test_budget_effect_and_startup_lines(kv_layout, decode_math, prefill, effect):
    has, text = budget_effect(kv_layout, decode_math, prefill)
    assert has is effect
    assert ("no effect" in text) is (not effect)
    lines = startup_lines(kv_layout, decode_math, prefill, "why not flash")
    assert lines[0] == ("info", f"ThriftAttention: decode_math {decode_math}, prefill {prefill}"
                        + (" (FlashAttention prefill not used: why not flash)."
                           if prefill == "thrift" else "."))
    assert lines[1][0] == ("info" if effect else "warning")


def test_fp16_units_follow_the_routes():
    dec = BlockGrid(1, 8192, 64, True)
    pre = BlockGrid(2048, 8192, 64, True)
    for grid in (dec, pre):
        assert fp16_units(0.05, grid, "auto", "fp4", "thrift") == budget_to_k(0.05, grid)
    assert fp16_units(0.05, dec, "auto", "fp16", "flash") == budget_to_k(0.05, dec)
    assert fp16_units(0.05, dec, "nvfp4", "fp16", "flash") == 0  # no model-dtype copy
    assert fp16_units(0.05, dec, "nvfp4", "fp4", "flash") == budget_to_k(0.05, dec)
    # flash prefill: exact on model-dtype K/V (auto), FP4-stored context (nvfp4)
    assert fp16_units(0.05, pre, "auto", "fp16", "flash") == budget_to_k(1.0, pre) > \
        budget_to_k(0.05, pre)
    assert fp16_units(0.05, pre, "nvfp4", "fp16", "flash") == 0
    assert fp16_units(0.05, pre, "nvfp4", "fp16", "thrift") == budget_to_k(0.05, pre)
