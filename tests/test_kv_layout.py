"""thrift_vllm.kv_layout: validation, sizes and offsets (notes/paged_kv.md), and the views."""

from __future__ import annotations

import itertools

import pytest
import torch

from thrift_vllm.kv_layout import REGION_NAMES, KVLayout

COMBOS = list(itertools.product(("auto", "nvfp4"), (64, 128), ("nvfp4", "mxfp4"),
                                ("block_mean", "quest", "local"), (32, 64, 128)))


def expected_c(kv_layout, D, fmt, selection, U, e=2):
    """The doc's formula for C."""
    g = {"nvfp4": 16, "mxfp4": 32}[fmt]
    n_sum = {"block_mean": 1, "quest": 2, "local": 0}[selection]
    c = D // 2 + D // g + D // 2 + D // g + 4 * D * n_sum // U
    return c + (2 * D * e if kv_layout == "auto" else 0)


def test_kv_layout_doc_example():
    auto = KVLayout("auto", 128, 128, 64, "nvfp4", "block_mean")
    nv = KVLayout("nvfp4", 128, 128, 64, "nvfp4", "block_mean")
    assert auto.bytes_per_head_token == 664 and nv.bytes_per_head_token == 152
    assert auto.stock_bytes_per_token(8) == 8 * 512
    assert auto.bytes_per_token(8) == 8 * 664 and nv.page_bytes(8) == 8 * 128 * 152
    assert "152 B/token/layer vs stock 512" in nv.describe(1)


@pytest.mark.parametrize("kv_layout,D,fmt,selection,U", COMBOS)
def test_kv_layout_sizes_and_offsets(kv_layout, D, fmt, selection, U):
    P = 2 * max(U, 64)
    lay = KVLayout(kv_layout, D, P, U, fmt, selection, torch.bfloat16)
    g = lay.group
    assert lay.bytes_per_head_token == expected_c(kv_layout, D, fmt, selection, U)
    regions = lay.regions
    names = [r.name for r in regions]
    assert names == [n for n in REGION_NAMES if n in names]  # storage order of the doc
    assert ("k_hi" in names) == ("v_hi" in names) == (kv_layout == "auto")
    assert [n for n in names if n.startswith("k_m")] == {
        "block_mean": ["k_mean"], "quest": ["k_min", "k_max"], "local": []}[selection]
    off = 0
    for r in regions:
        assert r.offset == off == lay.region_offset(r.name)
        assert r.nbytes % 4 == 0 and r.offset % 4 == 0  # fp32 views stay aligned
        off += r.nbytes
    assert off == P * lay.bytes_per_head_token
    shapes = {r.name: r.shape for r in regions}
    assert shapes["k4"] == (P, D // 2) and shapes["k4_scales"] == (P, D // g)
    if kv_layout == "auto":
        assert shapes["v4"] == (D, P // 2) and shapes["v4_scales"] == (D, P // g)
        assert shapes["k_hi"] == (P, D)
    else:
        assert shapes["v4"] == (P, D // 2) and shapes["v4_scales"] == (P, D // g)
        assert lay.region("k_hi") is None
        with pytest.raises(ValueError, match="no region 'k_hi'"):
            lay.region_offset("k_hi")


@pytest.mark.parametrize("kw,match", [
    ({"kv_layout": "fp8"}, "'fp8'"),
    ({"head_size": 96}, "96"),
    ({"head_size": True}, "True"),
    ({"page_size": 96}, "page_size 96 must be a multiple"),
    ({"page_size": 0}, "page_size"),
    ({"unit": 16}, "unit"),
    ({"quant_format": "int4"}, "int4"),
    ({"selection": "topk"}, "topk"),
    ({"dtype": torch.float32}, "float32"),
])
def test_kv_layout_validation(kw, match):
    base = dict(kv_layout="auto", head_size=64, page_size=128, unit=64)
    with pytest.raises(ValueError, match=match):
        KVLayout(**{**base, **kw})


@pytest.mark.parametrize("kv_layout", ["auto", "nvfp4"])
@pytest.mark.parametrize("selection", ["block_mean", "quest", "local"])
@pytest.mark.parametrize("cache_dtype", [torch.uint8, torch.float16])
def test_kv_layout_views_tile_the_page(kv_layout, selection, cache_dtype):
    """Every byte of a (block, head) belongs to exactly one view; views have the doc's shapes
    and dtypes; and writes through a view land at the documented byte offsets."""
    D, P, U, H, nb = 64, 128, 64, 3, 5
    lay = KVLayout(kv_layout, D, P, U, "mxfp4", selection, torch.bfloat16)
    cache = lay.allocate(nb, H, dtype=cache_dtype)
    v = lay.views(cache)
    u8 = cache.view(torch.uint8)
    g = 32
    shapes = {"k_hi": (P, D), "v_hi": (P, D), "k4": (P, D // 2), "k4_scales": (P, D // g),
              "v4": (D, P // 2) if kv_layout == "auto" else (P, D // 2),
              "v4_scales": (D, P // g) if kv_layout == "auto" else (P, D // g),
              "k_mean": (P // U, D), "k_min": (P // U, D), "k_max": (P // U, D)}
    present = {r.name for r in lay.regions}
    for name in v._fields:
        t = getattr(v, name)
        assert (t is not None) == (name in present), name
        if t is None:
            continue
        assert tuple(t.shape) == (nb, H, *shapes[name]), name
        want = {"k_hi": torch.bfloat16, "v_hi": torch.bfloat16, "k_mean": torch.float32,
                "k_min": torch.float32, "k_max": torch.float32}.get(name, torch.uint8)
        assert t.dtype == want and t.data_ptr() >= cache.data_ptr()
    # Tiling: fill each view with its own index through byte views; every byte gets exactly one.
    owner = torch.full_like(u8, -1, dtype=torch.int16)
    for i, r in enumerate(lay.regions):
        t = getattr(v, r.name)
        u8.zero_()
        t.view(torch.uint8).fill_(255)
        hit = u8 == 255
        assert int(hit.sum()) == nb * H * r.nbytes, r.name
        assert bool((owner[hit] == -1).all()), f"{r.name} overlaps another region"
        owner[hit] = i
        # The region sits at its documented offset inside each (block, head).
        flat = hit.reshape(nb, H, P * lay.bytes_per_head_token)
        assert bool(flat[:, :, r.offset:r.offset + r.nbytes].all()), r.name
    assert bool((owner >= 0).all()), "some bytes belong to no region"


def test_kv_layout_views_write_positions():
    """Element (b, h, i, j) of a view is byte offset + (i * cols + j) * itemsize of page (b, h)."""
    lay = KVLayout("auto", 64, 64, 32, "nvfp4", "quest", torch.float16)
    cache = lay.allocate(4, 2)
    v = lay.views(cache)
    flat = cache.view(4, 2, -1)
    v.k_hi[2, 1, 5, 7] = 1.5
    r = lay.region("k_hi")
    b = r.offset + (5 * 64 + 7) * 2
    assert flat[2, 1, b:b + 2].view(torch.float16).item() == 1.5
    v.v4[3, 0, 10, 4] = 0xAB  # auto v4 is [D, P/2]: channel 10, tokens 8 and 9
    r = lay.region("v4")
    assert flat[3, 0, r.offset + 10 * 32 + 4].item() == 0xAB
    v.k_max[1, 1, 1, 3] = -2.0
    r = lay.region("k_max")
    b = r.offset + (1 * 64 + 3) * 4
    assert flat[1, 1, b:b + 4].view(torch.float32).item() == -2.0
    assert int((flat != 0).sum()) == 3  # 1.5 = 0x3e00, 0xab, -2.0 = 0xc0000000: one byte each


def test_kv_layout_views_reject_wrong_cache():
    lay = KVLayout("nvfp4", 64, 64, 64)
    with pytest.raises(ValueError, match="needs 64 x"):
        lay.views(torch.zeros(2, 1, 64, 10, dtype=torch.uint8))
    with pytest.raises(ValueError, match="4-d"):
        lay.views(torch.zeros(10, dtype=torch.uint8))
    big = lay.allocate(2, 2)
    with pytest.raises(ValueError, match="contiguous"):
        lay.views(big.transpose(1, 2).contiguous().transpose(1, 2)[:, :, :, :])
