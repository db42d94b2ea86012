"""thrift_vllm.paged: writes through slot mappings and attention over FP4 pages, against the
definitions in notes/paged_kv.md (fresh random data, awkward sizes, shuffled block tables)."""

from __future__ import annotations

import itertools

import pytest
import torch

import thrift_vllm
from thrift_vllm.api import _exact_attention
from thrift_vllm.formats import dequantize, fake_quantize, quantize
from thrift_vllm.kv_layout import KVLayout
from thrift_vllm.paged import gather_sequence, paged_attention, write_kv
from thrift_vllm.reference import thrift_attention_reference
from thrift_vllm.selection import _block_reduce, select_blocks_reference

# (query len, seq len): single token, prefill, chunk across a page edge, decode, partial pages
SEQS = [(1, 1), (63, 63), (10, 65), (1, 200), (37, 130)]


class Case:
    """Sequences with random K/V, a shuffled block table over a garbage-filled cache, context
    written in several steps of different sizes, then one mixed step (+ padding slots)."""

    def __init__(self, layout: KVLayout, Hq: int, Hkv: int, seqs=SEQS, seed: int = 0,
                 chunks=(7, 50, 1, 128)):
        g = torch.Generator().manual_seed(seed)
        self.layout, self.Hq, self.Hkv, self.seqs = layout, Hq, Hkv, seqs
        P, D, dt = layout.page_size, layout.head_size, layout.dtype
        n_pages = [-(-skv // P) for _, skv in seqs]
        total = sum(n_pages) + 3
        perm = torch.randperm(total, generator=g)
        self.block_table = torch.full((len(seqs), max(n_pages) + 1), 10**6, dtype=torch.int32)
        used = 0
        for i, n in enumerate(n_pages):
            self.block_table[i, :n] = perm[used:used + n].to(torch.int32)
            used += n
        self.k = [torch.randn(skv, Hkv, D, generator=g).to(dt) for _, skv in seqs]
        self.v = [torch.randn(skv, Hkv, D, generator=g).to(dt) for _, skv in seqs]
        # Stale random bytes everywhere (NaN patterns included): nothing unwritten may leak.
        self.cache = torch.randint(0, 256, (total, Hkv, P, layout.bytes_per_head_token),
                                   generator=g, dtype=torch.uint8)
        self.views = layout.views(self.cache)
        self.chunks = chunks
        self.query = torch.randn(sum(sq for sq, _ in seqs) + 2, Hq, D, generator=g).to(dt)

    def slots(self, i: int, positions: torch.Tensor) -> torch.Tensor:
        P = self.layout.page_size
        return self.block_table[i, positions // P].long() * P + positions % P

    def write_context(self, views=None, chunked: bool = True) -> None:
        views = views or self.views
        for i, (sq, skv) in enumerate(self.seqs):
            ctx = skv - sq
            bounds = [0]
            sizes = itertools.cycle(self.chunks if chunked else (ctx,))
            while bounds[-1] < ctx:
                bounds.append(min(ctx, bounds[-1] + next(sizes)))
            for a, b in itertools.pairwise(bounds):
                pos = torch.arange(a, b)
                write_kv(self.layout, views, self.k[i][a:b], self.v[i][a:b], self.slots(i, pos))

    def step(self):
        """This step's key/value/slots for all sequences (+2 padding rows) and query_start_loc."""
        ks = torch.cat([self.k[i][skv - sq:] for i, (sq, skv) in enumerate(self.seqs)])
        vs = torch.cat([self.v[i][skv - sq:] for i, (sq, skv) in enumerate(self.seqs)])
        sl = torch.cat([self.slots(i, torch.arange(skv - sq, skv))
                        for i, (sq, skv) in enumerate(self.seqs)])
        pad = torch.full((2, self.Hkv, self.layout.head_size), 7.0, dtype=ks.dtype)
        qsl = [0]
        for sq, _ in self.seqs:
            qsl.append(qsl[-1] + sq)
        return torch.cat([ks, pad]), torch.cat([vs, pad]), torch.cat(
            [sl, torch.full((2,), -1)]), qsl

    def run(self, budget: float, force_sink_recent: bool = False):
        self.write_context()
        key, value, slots, qsl = self.step()
        write_kv(self.layout, self.views, key, value, slots)
        out = torch.full_like(self.query, float("nan"))
        paged_attention(self.layout, self.views, self.query, key, value, query_start_loc=qsl,
                        seq_lens=[s for _, s in self.seqs], block_table=self.block_table,
                        fp16_budgets=[budget] * len(self.seqs), scale=self.scale,
                        force_sink_recent=force_sink_recent, output=out)
        return out, qsl

    @property
    def scale(self) -> float:
        return self.layout.head_size ** -0.5

    def q(self, i, qsl):
        return self.query[qsl[i]:qsl[i + 1]].transpose(0, 1)[None].contiguous()


AUTO_CASES = [  # (D, dtype, Hq, Hkv, page, unit, fmt, selection)
    (64, torch.float16, 8, 2, 64, 64, "nvfp4", "block_mean"),
    (128, torch.bfloat16, 8, 1, 128, 64, "nvfp4", "quest"),
    (64, torch.bfloat16, 4, 1, 128, 32, "mxfp4", "block_mean"),
    (128, torch.float16, 4, 1, 256, 128, "mxfp4", "local"),
]


@pytest.mark.parametrize("D,dtype,Hq,Hkv,page,unit,fmt,selection", AUTO_CASES)
@pytest.mark.parametrize("budget", [0.0, 0.3, 1.0])
def test_paged_auto_equals_operator(D, dtype, Hq, Hkv, page, unit, fmt, selection, budget):
    """Auto layout: paged attention (reading k4/v4 from the pages) == thrift_vllm.attention
    (impl torch, which quantises the contiguous K/V itself), exactly."""
    lay = KVLayout("auto", D, page, unit, fmt, selection, dtype)
    case = Case(lay, Hq, Hkv, seed=D + page + unit)
    out, qsl = case.run(budget)
    for i, _ in enumerate(case.seqs):
        ref = thrift_vllm.attention(
            case.q(i, qsl), case.k[i].transpose(0, 1)[None].contiguous(),
            case.v[i].transpose(0, 1)[None].contiguous(), causal=True, fp16_budget=budget,
            selection=selection, quant_format=fmt, block_size=unit, sm_scale=case.scale,
            impl="torch")
        assert torch.equal(out[qsl[i]:qsl[i + 1]], ref[0].transpose(0, 1)), f"sequence {i}"
    assert torch.isnan(out[qsl[-1]:]).all()  # padding rows untouched


@pytest.mark.parametrize("fmt,selection,D,Hq,Hkv", [("nvfp4", "block_mean", 64, 8, 2),
                                                     ("mxfp4", "quest", 128, 8, 1)])
@pytest.mark.parametrize("budget", [0.0, 0.5, 1.0])
def test_paged_nvfp4_layout_equals_definition(fmt, selection, D, Hq, Hkv, budget):
    """nvfp4 layout: K_sel = deq(k4); FP16 path deq(k4)/deq(v4) but this step's tokens fresh;
    FP4 path k4 and v4 along head_dim. Built here from the contiguous tensors."""
    lay = KVLayout("nvfp4", D, 64, 64, fmt, selection, torch.bfloat16)
    case = Case(lay, Hq, Hkv, seed=3)
    out, qsl = case.run(budget, force_sink_recent=True)
    for i, (sq, skv) in enumerate(case.seqs):
        k = case.k[i].transpose(0, 1)[None]
        v = case.v[i].transpose(0, 1)[None]
        k4, v4 = fake_quantize(k, fmt, -1), fake_quantize(v, fmt, -1)
        k16 = torch.cat([k4[:, :, :skv - sq], k[:, :, skv - sq:].float()], 2)
        v16 = torch.cat([v4[:, :, :skv - sq], v[:, :, skv - sq:].float()], 2)
        q = case.q(i, qsl)
        if budget == 1.0:
            ref = _exact_attention(q, k16, v16, True, case.scale)
        else:
            sel = select_blocks_reference(q, k4, fp16_budget=budget, selection=selection,
                                          block_size=64, causal=True, force_sink_recent=True)
            ref = thrift_attention_reference(q, k16, v16, sel, quant_format=fmt, block_size=64,
                                             sm_scale=case.scale, fp4_kv=(k4, v4))
        assert torch.equal(out[qsl[i]:qsl[i + 1]], ref[0].transpose(0, 1)), f"sequence {i}"


@pytest.mark.parametrize("kv_layout", ["auto", "nvfp4"])
@pytest.mark.parametrize("fmt,selection,page,unit", [("nvfp4", "block_mean", 128, 64),
                                                     ("mxfp4", "quest", 64, 32)])
def test_paged_chunked_writes_equal_one_write(kv_layout, fmt, selection, page, unit):
    """Writing the context in steps of 7, 50, 1, 128 tokens gives byte-identical pages to one
    write (V groups and unit summaries re-derived as they grow; stale bytes never enter)."""
    lay = KVLayout(kv_layout, 64, page, unit, fmt, selection, torch.float16)
    case = Case(lay, 4, 2, seed=11)
    one = case.cache.clone()
    case.write_context(chunked=True)
    case.write_context(views=lay.views(one), chunked=False)
    assert torch.equal(case.cache, one)


@pytest.mark.parametrize("kv_layout", ["auto", "nvfp4"])
@pytest.mark.parametrize("selection", ["block_mean", "quest"])
def test_paged_stored_content_equals_recomputation(kv_layout, selection):
    """Stored FP4 = formats.quantize of the sequence (K per token; V along tokens (auto) or
    head_dim (nvfp4)); stored summaries = thrift_vllm.selection's reduction of the unit keys."""
    fmt, unit, page = "nvfp4", 64, 128
    lay = KVLayout(kv_layout, 64, page, unit, fmt, selection, torch.bfloat16)
    case = Case(lay, 4, 2, seed=5)
    case.run(0.0)
    for i, (_, skv) in enumerate(case.seqs):
        n_pages = -(-skv // page)
        pages = case.block_table[i, :n_pages].long()
        got = gather_sequence(lay, case.views, pages, skv)
        k = case.k[i].transpose(0, 1)[None]  # [1, H, S, D]
        v = case.v[i].transpose(0, 1)[None]
        assert torch.equal(got["k4"], fake_quantize(k, fmt, -1)[0])
        assert torch.equal(got["v4"], fake_quantize(v, fmt, -2 if kv_layout == "auto" else -1)[0])
        if kv_layout == "auto":
            assert torch.equal(got["k_hi"], k[0]) and torch.equal(got["v_hi"], v[0])
        k_sel = k if kv_layout == "auto" else fake_quantize(k, fmt, -1)
        n_u = -(-skv // unit)
        for name, op in {"block_mean": [("k_mean", "mean")],
                         "quest": [("k_min", "min"), ("k_max", "max")]}[selection]:
            want = _block_reduce(k_sel, 0, unit, n_u, op)[0]  # [H, n_u, D]
            stored = getattr(case.views, name)[pages].transpose(0, 1).flatten(1, 2)[:, :n_u]
            assert torch.equal(stored, want), name


def test_paged_rejects_bad_input():
    lay = KVLayout("nvfp4", 64, 64, 64)
    views = lay.views(lay.allocate(2, 2))
    k = torch.zeros(3, 2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="key must be"):
        write_kv(lay, views, k[:, :1], k, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv(lay, views, k, k, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="nvfp4 layout needs"):
        paged_attention(lay, views, torch.zeros(1, 2, 64, dtype=torch.float16), None, None,
                        query_start_loc=[0, 1], seq_lens=[1], block_table=torch.zeros(1, 1),
                        fp16_budgets=[0.0], scale=0.125)
    with pytest.raises(ValueError, match="2 budgets"):
        paged_attention(lay, views, torch.zeros(1, 2, 64, dtype=torch.float16), k, k,
                        query_start_loc=[0, 1, 1], seq_lens=[1, 1], block_table=torch.zeros(2, 1),
                        fp16_budgets=[0.0], scale=0.125)


# --- FP4 idempotence: what holds, and where it does not ------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("axis", [-1, -2])
def test_fp4_requantisation_of_own_output(dtype, axis):
    """``quantize(dequantize(quantize(x)))``: values always reproduce for mxfp4 (bytes need not:
    a group whose largest code is 3 re-quantises to half the scale and codes 6); for nvfp4 the
    bytes reproduce when every group scale is an e4m3 *normal* (amax / 6 >= 2**-6), but not in
    general below: a subnormal scale rounded up leaves max code 4, whose re-quantisation picks a
    smaller scale. The paged path therefore hands the stored FP4 values to the reference
    (``fp4_kv``) instead of re-quantising dequantised ones."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g).to(dtype)
    for fmt in ("nvfp4", "mxfp4"):
        q1 = quantize(x, fmt, axis)
        d1 = dequantize(q1)
        q2 = quantize(d1, fmt, axis)
        assert torch.equal(dequantize(q2), d1), fmt
        if fmt == "nvfp4":
            assert (q1.scales.float() >= 2.0 ** -6).all()  # normal scales in this draw
            assert torch.equal(q1.data, q2.data) and torch.equal(q1.scales, q2.scales)
    # nvfp4 counterexample: amax / 6 = 1.6 * 2**-9 -> scale 2**-8, max code 4 -> re-quantised
    # scale 2**-9 with code 6 (4 * 2**-8 = 2**-6 != 6 * 2**-9).
    y = torch.zeros(16, dtype=dtype)
    y[0] = 6 * 1.6 * 2.0 ** -9
    d = dequantize(quantize(y, "nvfp4"))
    assert d[0].item() == 2.0 ** -6
    assert dequantize(quantize(d, "nvfp4"))[0].item() == 6 * 2.0 ** -9


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
def test_paged_exact_path_same_bits_in_decode_and_prefill(dtype, D):
    """Budget 1 in the auto layout: a query's output does not depend on how many queries share
    its step (whole prefill, chunks, one decode token each) — preemption and chunking give the
    same bits, as vLLM's stock backend does."""
    g = torch.Generator().manual_seed(11)
    N, Hq, Hkv, page = 203, 6, 2, 64
    lay = KVLayout("auto", D, page, 64, "nvfp4", "block_mean", dtype)
    k, v = (torch.randn(N, Hkv, D, generator=g).to(dtype) for _ in range(2))
    q = (torch.randn(N, Hq, D, generator=g) * 2).to(dtype)
    n_pages = -(-N // page)
    cache = torch.zeros(n_pages + 2, Hkv, page, lay.bytes_per_head_token, dtype=torch.uint8)
    views = lay.views(cache)
    table = torch.randperm(n_pages + 2, generator=g)[None, :n_pages].to(torch.int32)
    pos = torch.arange(N)
    write_kv(lay, views, k, v, table[0, pos // page].long() * page + pos % page)

    def attend(a: int, b: int) -> torch.Tensor:  # queries a..b-1 over keys 0..b-1
        return paged_attention(lay, views, q[a:b], k[a:b], v[a:b], query_start_loc=[0, b - a],
                               seq_lens=[b], block_table=table, fp16_budgets=[1.0],
                               scale=D ** -0.5)

    whole = attend(0, N)
    decode = torch.cat([attend(t, t + 1) for t in range(N)])
    chunks = torch.cat([attend(a, min(N, a + 37)) for a in range(0, N, 37)])
    assert torch.equal(decode, whole), (decode != whole).sum()
    assert torch.equal(chunks, whole), (chunks != whole).sum()
    # and it is exact attention (float64 softmax by hand)
    kk, vv = (t.double().repeat_interleave(Hq // Hkv, dim=1).transpose(0, 1) for t in (k, v))
    s = (q.double().transpose(0, 1) @ kk.transpose(1, 2)) * D ** -0.5
    s = s.masked_fill(pos[None, None, :] > pos[None, :, None], float("-inf"))
    ref = (s.softmax(-1) @ vv).transpose(0, 1)
    assert (whole.double() - ref).abs().max() <= 2 * torch.finfo(dtype).eps * ref.abs().max()
