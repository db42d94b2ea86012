"""Paged Triton kernels (KV write, paged selection, paged decode, prefill path) against the
PyTorch paged reference ``thrift_vllm.paged`` (TRITON_INTERPRET=1 on CPU, set by conftest).

Every case builds a fresh cache with a shuffled block table (spare pages in between), awkward
sequence lengths (partial pages and units) and per-sequence budgets in one batch.

Tolerances.
* Write: bit-exact for every region (model-dtype copies, FP4 bytes and scales, min/max), except
  ``k_mean``: an fp32 sum whose order differs between ``tl.sum`` and torch's reduction, so it is
  held to 4 fp32 ulps of the sum of magnitudes (it is bit-exact whenever the sum is exact, e.g.
  the dequantised FP4 keys of the nvfp4 layout).
* Selection: the unit lists equal ``select_blocks_reference`` on the sequence's stored keys
  exactly (the scores differ only in fp32 summation order; random data has no near-ties).
* Attention: the reference is fp32 throughout; the kernels round P to the model dtype in the FP16
  units (as FlashAttention does), round the output to the model dtype, sum in another order (fp32)
  and may flip the rare e2m1 rounding tie of the P quantisation that fp32 noise moves. The output
  rounding alone is ~2**-12 (fp16) / 2**-9 (bf16) relative: as tests/test_attention_kernels.py,
  we allow a relative error (Frobenius, per sequence) of 2e-3 (fp16) and 1e-2 (bf16).
"""

from __future__ import annotations

import pytest
import torch

from thrift_vllm.kv_layout import KVLayout
from thrift_vllm.ops.kv_write import write_kv_triton
from thrift_vllm.ops.paged_attention import (
    paged_attention_triton,
    paged_decode_triton,
    paged_select_triton,
)
from thrift_vllm.paged import gather_sequence, paged_attention, write_kv
from thrift_vllm.selection import BlockGrid, budget_to_k, select_blocks_reference

TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _dev(t):
    """Kernel inputs on the GPU when there is one (compiled kernels); the reference stays on
    the CPU."""
    return t.to(DEVICE)


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


class Batch:
    """A cache with a shuffled block table for ``seq_lens``; the history (all but the last
    ``q_lens`` tokens) written by the reference, the step's K/V and queries drawn."""

    def __init__(self, layout, seq_lens, q_lens, Hkv, group, seed):
        g = torch.Generator().manual_seed(seed)
        P, D, dt = layout.page_size, layout.head_size, layout.dtype
        self.layout, self.seq_lens, self.q_lens = layout, list(seq_lens), list(q_lens)
        n_pages = [-(-s // P) for s in seq_lens]
        nb = sum(n_pages) + 5
        perm = torch.randperm(nb, generator=g)
        self.block_table = torch.zeros(len(seq_lens), max(n_pages) + 1, dtype=torch.int32)
        c = 0
        for i, n in enumerate(n_pages):
            self.block_table[i, :n] = perm[c:c + n]
            c += n
        self.cache = layout.allocate(nb, Hkv)
        self.cache.view(torch.uint8).random_(0, 256, generator=g)  # stale garbage everywhere
        # stale garbage is finite FP4 data; keep NaN/inf bytes out of model-dtype/fp32 regions
        views = layout.views(self.cache)
        for t in (views.k_hi, views.v_hi, views.k_mean, views.k_min, views.k_max):
            if t is not None:
                t.copy_(torch.randn(t.shape, generator=g).to(t.dtype))
        hist = self.slots(lambda s, q: range(0, s - q))
        self.hist_k = torch.randn(hist.numel(), Hkv, D, generator=g).to(dt)
        self.hist_v = torch.randn(hist.numel(), Hkv, D, generator=g).to(dt)
        if hist.numel():
            write_kv(layout, views, self.hist_k, self.hist_v, hist)
        self.step_slots = self.slots(lambda s, q: range(s - q, s))
        T = self.step_slots.numel()
        self.key = torch.randn(T, Hkv, D, generator=g).to(dt)
        self.value = torch.randn(T, Hkv, D, generator=g).to(dt)
        self.query = torch.randn(T, Hkv * group, D, generator=g).to(dt)
        self.qsl = [0]
        for q in q_lens:
            self.qsl.append(self.qsl[-1] + q)

    def full_kv(self, i):
        """Sequence i's model-dtype K and V ``[seq_len, Hkv, D]`` (history, then the step)."""
        h0 = sum(s - q for s, q in zip(self.seq_lens[:i], self.q_lens[:i], strict=True))
        h1 = h0 + self.seq_lens[i] - self.q_lens[i]
        q0, q1 = self.qsl[i], self.qsl[i + 1]
        return (torch.cat([self.hist_k[h0:h1], self.key[q0:q1]]),
                torch.cat([self.hist_v[h0:h1], self.value[q0:q1]]))

    def slots(self, positions):
        P = self.layout.page_size
        out = [int(self.block_table[i, p // P]) * P + p % P
               for i, (s, q) in enumerate(zip(self.seq_lens, self.q_lens, strict=True))
               for p in positions(s, q)]
        return torch.tensor(out, dtype=torch.int64)


def _compare_caches(layout, got, ref):
    vg, vr = layout.views(got), layout.views(ref)
    for name in vr._fields:
        a, b = getattr(vg, name), getattr(vr, name)
        if b is None:
            continue
        if name == "k_mean":
            # 4 ulps of the sum of magnitudes; bit-exact where the sum is exact
            bound = 4 * torch.finfo(torch.float32).eps * (b.abs() + 1e-30) * layout.unit
            assert ((a - b).abs() <= bound).all(), name
        else:
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name


# (kv_layout, fmt, selection, dtype, D, page, unit)
WRITE_CASES = [
    ("auto", "nvfp4", "block_mean", torch.float16, 64, 64, 32),
    ("auto", "mxfp4", "quest", torch.bfloat16, 128, 128, 64),
    ("auto", "nvfp4", "local", torch.bfloat16, 64, 64, 64),
    ("nvfp4", "nvfp4", "quest", torch.float16, 128, 64, 32),
    ("nvfp4", "mxfp4", "block_mean", torch.bfloat16, 64, 128, 128),
    ("nvfp4", "nvfp4", "local", torch.float16, 64, 64, 64),
]


@pytest.mark.parametrize("case", WRITE_CASES, ids=lambda c: "-".join(map(str, c[:3])))
def test_write_bit_exact(case):
    kvl, fmt, sel, dt, D, P, U = case
    lay = KVLayout(kvl, D, P, U, fmt, sel, dt)
    seq_lens = (1, 63, 65, 200)
    b = Batch(lay, seq_lens, (1, 20, 3, 70), Hkv=2, group=1, seed=WRITE_CASES.index(case))
    ref = b.cache.clone()
    got = b.cache.clone()
    # the step in one call, with a padding slot and extra key rows past the mapping; every
    # other case with the tokens in reverse order (a page's run stays contiguous)
    st, sk, sv = b.step_slots, b.key, b.value
    if WRITE_CASES.index(case) % 2:
        st, sk, sv = st.flip(0), sk.flip(0), sv.flip(0)
    slots = torch.cat([st[:5], torch.tensor([-1]), st[5:]])
    key = torch.cat([sk[:5], sk[:1], sk[5:], sk[:2]])
    value = torch.cat([sv[:5], sv[:1], sv[5:], sv[:2]])
    write_kv(lay, lay.views(ref), key, value, slots)
    got = _dev(got)
    write_kv_triton(_dev(key), _dev(value), got, _dev(slots), lay)
    got = got.cpu()
    _compare_caches(lay, got, ref)
    # then a decode step on top (one token per sequence, tokens in shuffled order)
    dec = torch.tensor([int(b.block_table[i, s // P]) * P + s % P for i, s in
                        enumerate(seq_lens) if s % P], dtype=torch.int64).flip(0)
    k2 = torch.randn(dec.numel(), 2, D).to(dt)
    v2 = torch.randn(dec.numel(), 2, D).to(dt)
    write_kv(lay, lay.views(ref), k2, v2, dec)
    got = _dev(got)
    write_kv_triton(_dev(k2), _dev(v2), got, _dev(dec), lay)
    _compare_caches(lay, got.cpu(), ref)


# (kv_layout, fmt, selection, dtype, D, Hkv, group, page, unit)
DECODE_CASES = [
    ("auto", "nvfp4", "block_mean", torch.float16, 64, 2, 4, 64, 32),
    ("auto", "mxfp4", "quest", torch.bfloat16, 128, 1, 8, 64, 64),
    ("auto", "nvfp4", "local", torch.bfloat16, 128, 2, 4, 128, 64),
    ("nvfp4", "nvfp4", "block_mean", torch.bfloat16, 64, 1, 8, 64, 64),
    ("nvfp4", "mxfp4", "quest", torch.float16, 64, 2, 4, 64, 32),
    ("nvfp4", "nvfp4", "local", torch.float16, 128, 1, 4, 64, 32),
]
BUDGET_ROTATIONS = [(0.0, 0.05, 0.5, 1.0), (0.5, 1.0, 0.0, 0.05), (0.05, 0.0, 1.0, 0.5)]


@pytest.mark.parametrize("ci", range(len(DECODE_CASES)),
                         ids=lambda i: "-".join(map(str, DECODE_CASES[i][:3])))
def test_decode_matches_reference(ci):
    kvl, fmt, sel, dt, D, Hkv, group, P, U = DECODE_CASES[ci]
    lay = KVLayout(kvl, D, P, U, fmt, sel, dt)
    seq_lens = (1, 63, 65, 200)
    budgets = BUDGET_ROTATIONS[ci % len(BUDGET_ROTATIONS)]
    b = Batch(lay, seq_lens, (1,) * 4, Hkv, group, seed=100 + ci)
    cache = _dev(b.cache)
    write_kv_triton(_dev(b.key), _dev(b.value), cache, _dev(b.step_slots), lay)
    b.cache = cache.cpu()
    views = lay.views(b.cache)
    ref = paged_attention(lay, views, b.query, b.key, b.value, query_start_loc=b.qsl,
                          seq_lens=list(seq_lens), block_table=b.block_table,
                          fp16_budgets=list(budgets), scale=D**-0.5)
    # selection from the stored summaries == the reference on the stored keys
    ks = [budget_to_k(f, BlockGrid(1, s, U, True)) for f, s in zip(budgets, seq_lens,
                                                                    strict=True)]
    seq_t = torch.tensor(seq_lens, dtype=torch.int32)
    k_t = torch.tensor(ks, dtype=torch.int32)
    got_sel = paged_select_triton(lay, cache, _dev(b.query), block_table=_dev(b.block_table),
                                  seq_lens=_dev(seq_t), num_fp16_blocks=_dev(k_t)).cpu()
    for i, s in enumerate(seq_lens):
        kv = gather_sequence(lay, views, b.block_table[i, :-(-s // P)].long(), s)
        k_sel = kv["k_hi"] if kvl == "auto" else kv["k4"]
        want = select_blocks_reference(b.query[i][None, :, None], k_sel[None],
                                       fp16_budget=budgets[i], selection=sel, block_size=U,
                                       causal=True)
        want = want[0, ::group, 0]  # [Hkv, k]: one list per KV head in decode
        row = got_sel[i, :, :want.shape[-1]]
        assert torch.equal(row, want), (i, row, want)
        assert (got_sel[i, :, want.shape[-1]:] == -1).all()
    out = paged_decode_triton(lay, cache, _dev(b.query), _dev(b.key), _dev(b.value),
                              block_table=_dev(b.block_table), seq_lens=_dev(seq_t),
                              num_fp16_blocks=_dev(k_t), scale=D**-0.5, sel=_dev(got_sel)).cpu()
    for i in range(len(seq_lens)):
        assert not torch.isnan(out[i]).any()
        assert _rel(out[i], ref[i]) < TOL[dt], (i, seq_lens[i], budgets[i], _rel(out[i], ref[i]))


def _decode_case(ci, seq_lens, budgets, seed):
    """DECODE_CASES[ci] with one new token per sequence, the step written by the Triton write:
    (dtype, the positional args and keyword args of ``paged_decode_triton``, the reference
    output [B, Hq, D] of ``thrift_vllm.paged``)."""
    kvl, fmt, sel, dt, D, Hkv, group, P, U = DECODE_CASES[ci]
    lay = KVLayout(kvl, D, P, U, fmt, sel, dt)
    b = Batch(lay, seq_lens, (1,) * len(seq_lens), Hkv, group, seed=seed)
    cache = _dev(b.cache)
    write_kv_triton(_dev(b.key), _dev(b.value), cache, _dev(b.step_slots), lay)
    ref = paged_attention(lay, lay.views(cache.cpu()), b.query, b.key, b.value,
                          query_start_loc=b.qsl, seq_lens=list(seq_lens),
                          block_table=b.block_table, fp16_budgets=list(budgets), scale=D**-0.5)
    ks = [budget_to_k(f, BlockGrid(1, s, U, True)) for f, s in zip(budgets, seq_lens,
                                                                    strict=True)]
    kw = dict(block_table=_dev(b.block_table),
              seq_lens=_dev(torch.tensor(seq_lens, dtype=torch.int32)),
              num_fp16_blocks=_dev(torch.tensor(ks, dtype=torch.int32)), scale=D**-0.5)
    return dt, (lay, cache, _dev(b.query), _dev(b.key), _dev(b.value)), kw, ref


@pytest.mark.parametrize("ci", [0, 3], ids=["auto", "nvfp4"])
def test_decode_launch_variants(ci):
    """The tuning knobs change speed, not results: split counts, warps and a register cap
    agree with the reference at the usual tolerance (the split merge reorders the sums)."""
    dt, args, kw, ref = _decode_case(ci, (1, 63, 65, 200), (0.05, 0.5, 0.0, 0.05), 300 + ci)
    one = {"target_programs": 1}  # one split per (sequence, KV head): the loop sees every unit
    many = {"target_programs": 4096, "num_warps": 8, "maxnreg": 128, "min_tiles_per_split": 1}
    for launch in ({}, one, many, {"min_tiles_per_split": 3}):
        out = paged_decode_triton(*args, launch=launch, **kw).cpu()
        for i in range(len(ref)):
            assert _rel(out[i], ref[i]) < TOL[dt], (launch, i, _rel(out[i], ref[i]))


@pytest.mark.parametrize("ci", [0, 1, 3, 4], ids=lambda i: "-".join(map(str, DECODE_CASES[i][:2])))
def test_decode_native_fp4_mma(ci):
    """The sm_120 path (FP4 dots on the block-scaled MMA: q x K in both layouts, P x V in the
    auto layout) gives the reference result and the decoded path's numbers. Under the
    interpreter MXFP4 runs tl.dot_scaled itself, NVFP4 its emulation (the interpreter reads
    every scale as e8m0); the instructions are checked by the sm_120 compile below."""
    from thrift_vllm.ops.paged_attention import native_fp4_decode

    if DEVICE == "cuda" and not native_fp4_decode(torch.device("cuda")):
        pytest.skip("no block-scaled FP4 MMA on this GPU (interpreter and AOT cover it)")
    seq_lens = (1, 63, 65, 200)
    dt, args, kw, ref = _decode_case(ci, seq_lens, BUDGET_ROTATIONS[ci % len(BUDGET_ROTATIONS)],
                                     320 + ci)
    native = paged_decode_triton(*args, native=True, **kw).cpu()
    decoded = paged_decode_triton(*args, native=False, **kw).cpu()
    for i in range(len(seq_lens)):
        assert not torch.isnan(native[i]).any()
        assert _rel(native[i], ref[i]) < TOL[dt], (i, _rel(native[i], ref[i]))
        # same FP4 products, exact in fp32; only the summation order may differ
        assert _rel(native[i], decoded[i]) < 1e-3, (i, _rel(native[i], decoded[i]))


@pytest.mark.parametrize("ci", [0, 3], ids=["auto", "nvfp4"])
def test_decode_reduce_merges_many_splits(ci):
    """More split partials than the reduce merges per loop step (SPLIT_CHUNK), a count that is
    not a multiple of it, next to a sequence with a few: the chunked online merge gives the
    reference result (the first reduce held every split in one tile and spilled on sm90)."""
    from thrift_vllm.ops.attention import SPLIT_CHUNK, decode_split_plan

    Hkv, U = DECODE_CASES[ci][5], DECODE_CASES[ci][8]
    seq_lens = (2 * SPLIT_CHUNK * U + 3 * U - 5, 70)
    n_max = -(-seq_lens[0] // U)
    splits, per = decode_split_plan(len(seq_lens), Hkv, n_max, 4096)
    assert per == 1 and splits > 2 * SPLIT_CHUNK and splits % SPLIT_CHUNK  # three loop steps
    dt, args, kw, ref = _decode_case(ci, seq_lens, (0.05, 0.0), 310 + ci)
    out = paged_decode_triton(*args, launch={"target_programs": 4096, "min_tiles_per_split": 1},
                              **kw).cpu()
    for i in range(len(seq_lens)):
        assert _rel(out[i], ref[i]) < TOL[dt], (i, _rel(out[i], ref[i]))


def _topk_reference(score: torch.Tensor, k: int, force: bool) -> list[int]:
    """The selection rule by a stable sort: finite scores only, larger first, ties to the
    smaller unit; with ``force``, the first and the last unit (when finite) rank first."""
    n = score.shape[0]
    ok = torch.isfinite(score)
    pri = [(0 if force and j in (0, n - 1) else 1, -float(score[j]), j) for j in range(n)
           if ok[j]]
    if force and n > 1 and ok[0] and ok[n - 1]:
        pri = [(p if j != n - 1 else -1, s, j) for p, s, j in pri]  # the recent unit first
    return sorted(j for _, _, j in sorted(pri)[:k])


@pytest.mark.parametrize("force", [False, True])
def test_select_topk_ties_and_non_finite(force):
    """Top-k from stored summaries with many exact ties, +-0, +-inf and NaN scores, k = 0,
    k > the finite units, a one-unit sequence: against a sort-based reference of the rule."""
    D, U, P, Hkv, group = 64, 32, 64, 2, 2
    lay = KVLayout("nvfp4", D, P, U, "nvfp4", "block_mean", torch.float16)
    seq_lens, ks = (1, 63, 65, 200, 1000, 1000), (1, 2, 0, 5, 17, 100)
    g = torch.Generator().manual_seed(11 + force)
    pages = [-(-s // P) for s in seq_lens]
    perm = torch.randperm(sum(pages) + 2, generator=g).to(torch.int32)
    bt = torch.full((len(seq_lens), max(pages)), 0, dtype=torch.int32)
    at = 0
    for i, n in enumerate(pages):
        bt[i, :n] = perm[at:at + n]
        at += n
    cache = lay.allocate(sum(pages) + 2, Hkv)
    mean = lay.views(cache).k_mean  # [nb, Hkv, n_u, D]
    pool = torch.tensor([-1.0, -0.0, 0.0, 1.0, 2.0, float("inf"), float("-inf"), float("nan")])
    mean.zero_()
    mean[..., 0] = pool[torch.randint(0, len(pool), mean.shape[:3], generator=g)]
    q = torch.zeros(len(seq_lens), Hkv * group, D, dtype=torch.float16)
    q[..., 0] = 1.0  # score = mean[..., 0] exactly, for every query head of the group
    got = paged_select_triton(lay, _dev(cache), _dev(q), block_table=_dev(bt),
                              seq_lens=_dev(torch.tensor(seq_lens, dtype=torch.int32)),
                              num_fp16_blocks=_dev(torch.tensor(ks, dtype=torch.int32)),
                              force_sink_recent=force).cpu()
    nu = P // U
    for i, (s, k) in enumerate(zip(seq_lens, ks, strict=True)):
        n = -(-s // U)
        units = torch.arange(n)
        for h in range(Hkv):
            score = mean[bt[i, units // nu].long(), h, units % nu, 0]
            want = _topk_reference(score, k, force)
            row = got[i, h]
            assert row[:len(want)].tolist() == want, (i, h, score, row, want)
            assert (row[len(want):] == -1).all(), (i, h, row)


def test_decode_idle_rows_and_graph_style_launch():
    """seq_len 0 rows (CUDA-graph padding) give zeros and leave the others unchanged; the
    default list width (the table's capacity) gives the same result as a tight one."""
    lay = KVLayout("nvfp4", 64, 64, 32, "nvfp4", "block_mean", torch.float16)
    b = Batch(lay, (65, 130), (1, 1), Hkv=1, group=4, seed=7)
    cache = _dev(b.cache)
    write_kv_triton(_dev(b.key), _dev(b.value), cache, _dev(b.step_slots), lay)
    b.cache = cache.cpu()
    q = _dev(torch.cat([b.query, b.query[:1]]))
    kn, vn = _dev(torch.cat([b.key, b.key[:1]])), _dev(torch.cat([b.value, b.value[:1]]))
    bt = _dev(torch.cat([b.block_table, b.block_table[:1]]))
    seq = _dev(torch.tensor([65, 130, 0], dtype=torch.int32))
    ks = _dev(torch.tensor([1, 2, 3], dtype=torch.int32))
    wide = paged_decode_triton(lay, cache, q, kn, vn, block_table=bt, seq_lens=seq,
                               num_fp16_blocks=ks, scale=0.125).cpu()
    tight = paged_decode_triton(lay, cache, q, kn, vn, block_table=bt, seq_lens=seq,
                                num_fp16_blocks=ks, scale=0.125, max_num_fp16_blocks=3).cpu()
    assert torch.equal(wide, tight)
    assert (wide[2] == 0).all()
    ref = paged_attention(lay, lay.views(b.cache), b.query, b.key, b.value,
                          query_start_loc=b.qsl, seq_lens=[65, 130], block_table=b.block_table,
                          fp16_budgets=[0.5, 0.5], scale=0.125)
    assert _rel(wide[:2], ref) < TOL[torch.float16]


MIXED_CASES = [
    ("auto", "nvfp4", "block_mean", torch.float16, 64, 2, 4),
    ("nvfp4", "mxfp4", "quest", torch.bfloat16, 128, 1, 8),
]


@pytest.mark.parametrize("case", MIXED_CASES, ids=lambda c: "-".join(map(str, c[:3])))
def test_mixed_batch_prefill_path(case):
    """Chunked prefill, prefill and decode rows in one batch (paged_attention_triton)."""
    kvl, fmt, sel, dt, D, Hkv, group = case
    lay = KVLayout(kvl, D, 64, 32, fmt, sel, dt)
    seq_lens, q_lens, budgets = (63, 200, 65, 70), (1, 5, 65, 70), (0.5, 0.05, 1.0, 0.0)
    b = Batch(lay, seq_lens, q_lens, Hkv, group, seed=11)
    cache = _dev(b.cache)
    write_kv_triton(_dev(b.key), _dev(b.value), cache, _dev(b.step_slots), lay)
    kw = dict(query_start_loc=b.qsl, seq_lens=list(seq_lens), fp16_budgets=list(budgets),
              scale=D**-0.5)
    ref = paged_attention(lay, lay.views(cache.cpu()), b.query, b.key, b.value,
                          block_table=b.block_table, **kw)
    out = paged_attention_triton(lay, cache, _dev(b.query), _dev(b.key), _dev(b.value),
                                 block_table=_dev(b.block_table), **kw).cpu()
    for i in range(len(seq_lens)):
        a, r = out[b.qsl[i]:b.qsl[i + 1]], ref[b.qsl[i]:b.qsl[i + 1]]
        assert _rel(a, r) < TOL[dt], (i, _rel(a, r))


@pytest.mark.parametrize("kvl", ["auto", "nvfp4"])
def test_prefill_fp8_bulk_error_bounded(kvl):
    """bulk_math "fp8" (e4m3 K/V with per-row power-of-two factors, P in e4m3) is a different
    function from the FP4 reference, so it is held to its error against exact attention over
    the sequence's model-dtype K/V: at most the exact-FP4 (bf16) path's error + 10 % + 1e-3, per
    prefill sequence (chunked, from scratch, budget 0 and > 0); decode rows are unchanged."""
    from thrift_vllm.api import _exact_attention

    lay = KVLayout(kvl, 64, 64, 32, "nvfp4", "block_mean", torch.bfloat16)
    seq_lens, q_lens, budgets = (200, 65, 130, 90), (5, 65, 70, 1), (0.05, 0.0, 0.25, 0.05)
    b = Batch(lay, seq_lens, q_lens, Hkv=2, group=4, seed=21)
    cache = _dev(b.cache)
    write_kv_triton(_dev(b.key), _dev(b.value), cache, _dev(b.step_slots), lay)
    kw = dict(query_start_loc=b.qsl, seq_lens=list(seq_lens), fp16_budgets=list(budgets),
              scale=64**-0.5, block_table=_dev(b.block_table))
    args = (lay, cache, _dev(b.query), _dev(b.key), _dev(b.value))
    exact_fp4 = paged_attention_triton(*args, bulk_math="bf16", **kw).cpu()
    fp8 = paged_attention_triton(*args, bulk_math="fp8", **kw).cpu()
    for i in range(3):
        sl = slice(b.qsl[i], b.qsl[i + 1])
        k, v = b.full_kv(i)
        exact = _exact_attention(b.query[sl].transpose(0, 1)[None], k.transpose(0, 1)[None],
                                 v.transpose(0, 1)[None], True, None)[0].transpose(0, 1)
        e8, e4 = _rel(fp8[sl], exact), _rel(exact_fp4[sl], exact)
        assert e8 <= 1.1 * e4 + 1e-3, (i, e8, e4)
        assert not torch.equal(fp8[sl], exact_fp4[sl]), i  # the fp8 path really ran
    last = slice(b.qsl[3], b.qsl[4])
    assert torch.equal(fp8[last], exact_fp4[last])  # decode row: same kernel either way
    with pytest.raises(ValueError, match="bulk_math"):
        paged_attention_triton(*args, bulk_math="fp16", **kw)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_prefill_native_bulk_matches_bf16(fmt):
    """bulk_math "native" (Blackwell: packed pages straight into the block-scaled MMA, auto
    layout) computes the exact FP4 semantics like "bf16": chunked and from-scratch prefill,
    odd context lengths (a V byte shared by the last position and a stale one), stale garbage
    (NaN scale bytes included) in the pages past the context. Under the interpreter MXFP4 runs
    tl.dot_scaled, NVFP4 its emulation; the nvfp4 layout is refused."""
    from thrift_vllm.ops.paged_attention import native_fp4_decode

    if DEVICE == "cuda" and not native_fp4_decode(torch.device("cuda")):
        pytest.skip("no block-scaled FP4 MMA on this GPU (interpreter and AOT cover it)")
    lay = KVLayout("auto", 64, 64, 64, fmt, "block_mean", torch.bfloat16)
    seq_lens, q_lens, budgets = (201, 65, 131, 90), (5, 65, 70, 1), (0.05, 0.0, 0.25, 0.05)
    b = Batch(lay, seq_lens, q_lens, Hkv=2, group=4, seed=23)
    cache = _dev(b.cache)
    write_kv_triton(_dev(b.key), _dev(b.value), cache, _dev(b.step_slots), lay)
    # Poison the V groups past each context in its last unit: NaN scale bytes (0xFF in e4m3
    # and e8m0) and codes of 6. They must never enter (the kernel's P is 0 there, 0 x NaN not).
    views, G = lay.views(cache), lay.group
    for i, skv in enumerate(seq_lens):
        page, first = int(b.block_table[i, (skv - 1) // 64]), -(-(skv % 64) // G) * G
        if skv % 64:
            views.v4_scales[page, :, :, first // G:].view(torch.uint8).fill_(0xFF)
            views.v4[page, :, :, first // 2:].fill_(0x77)
    kw = dict(query_start_loc=b.qsl, seq_lens=list(seq_lens), fp16_budgets=list(budgets),
              scale=64**-0.5)
    ref = paged_attention(lay, lay.views(cache.cpu()), b.query, b.key, b.value,
                          block_table=b.block_table, **kw)
    args = (lay, cache, _dev(b.query), _dev(b.key), _dev(b.value))
    kw["block_table"] = _dev(b.block_table)
    native = paged_attention_triton(*args, bulk_math="native", **kw).cpu()
    exact = paged_attention_triton(*args, bulk_math="bf16", **kw).cpu()
    assert not native.isnan().any()
    for i in range(len(seq_lens)):
        sl = slice(b.qsl[i], b.qsl[i + 1])
        assert _rel(native[sl], ref[sl]) < TOL[torch.bfloat16], (i, _rel(native[sl], ref[sl]))
        assert _rel(native[sl], exact[sl]) < 1e-3, (i, _rel(native[sl], exact[sl]))
    nv = KVLayout("nvfp4", 64, 64, 32, fmt, "block_mean", torch.bfloat16)
    with pytest.raises(ValueError, match="'native' needs the auto layout"):
        paged_attention_triton(nv, nv.allocate(8, 2), _dev(b.query), _dev(b.key),
                               _dev(b.value), bulk_math="native", **kw)


@pytest.mark.slow
def test_paged_kernels_compile_for_hopper():
    """Every paged launch compiles for sm_90 (AOT, no GPU; a subprocess without the
    interpreter, see thrift_vllm/ops/aot_paged.py) with no register spills in the write and
    select kernels."""
    import json
    import os
    import subprocess
    import sys

    from thrift_vllm.ops import sass

    problem = sass.toolchain_problem()
    if problem:
        pytest.skip(problem)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "thrift_vllm.ops.aot_paged", "--arch", "90"],
                         capture_output=True, text=True, env=env, timeout=600)
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert rows and all(r["ok"] for r in rows), res.stdout[-2000:] + res.stderr[-2000:]
    assert {r["kernel"] for r in rows} >= {"_kv_write_tokens_kernel", "_paged_score_kernel",
                                           "_paged_topk_kernel", "_paged_decode_kernel",
                                           "_paged_reduce_kernel"}
    assert all(r.get("stack", 0) == 0 for r in rows if "decode" not in r["kernel"])


@pytest.mark.slow
def test_paged_decode_native_fp4_on_sm120():
    """On sm_120 the paged decode's FP4 dots compile to the block-scaled MMA (``mma.sync ...
    block_scale``: q x K in both layouts, P x V too in the auto layout), for NVFP4 (ue4m3
    scales) and MXFP4 (ue8m0): ``aot_paged`` applies the device rule of
    ``native_fp4_decode`` per arch, so this is what an RTX / RTX PRO Blackwell GPU runs."""
    import json
    import os
    import subprocess
    import sys

    from thrift_vllm.ops import sass

    problem = sass.toolchain_problem()
    if problem:
        pytest.skip(problem)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "thrift_vllm.ops.aot_paged", "--arch", "120"],
                         capture_output=True, text=True, env=env, timeout=600)
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    dec = [r for r in rows if r["kernel"] == "_paged_decode_kernel"]
    assert len(dec) == 3 and all(r["ok"] for r in dec), res.stdout[-2000:] + res.stderr[-2000:]
    for r in dec:
        scale = "ue4m3" if r["fmt"] == "nvfp4" else "ue8m0"
        assert any("m16n8k64" in m and "block_scale" in m and m.endswith(scale)
                   for m in r["mma"]), r


def test_decode_split_plan_min_tiles():
    """The launch policy in plain numbers: the program target sets the split count for large
    batches; small batches get at least ``min_tiles_per_split`` units per program; every unit
    is covered exactly by splits * per >= units > (splits - 1) * per; bad knobs raise."""
    from thrift_vllm.ops.attention import decode_split_plan
    from thrift_vllm.ops.paged_attention import PAGED_DECODE_LAUNCH

    target, floor = PAGED_DECODE_LAUNCH["target_programs"], PAGED_DECODE_LAUNCH[
        "min_tiles_per_split"]
    n = 532  # 34K max_model_len / 64-token units: the engine's block-table width
    assert decode_split_plan(1, 8, n, target) == (178, 3)  # no floor: ~3 units per program
    splits, per = decode_split_plan(1, 8, n, target, floor)
    assert per == floor and splits == -(-n // floor)
    for batch in (4, 16, 64):  # the floor does not bind once the target spreads thin enough
        assert decode_split_plan(batch, 8, n, target, floor) == decode_split_plan(batch, 8, n,
                                                                                  target)
    for batch, units, mins in ((1, 1, 8), (3, 65, 8), (2, 7, 1), (1, 200, 16)):
        splits, per = decode_split_plan(batch, 8, units, target, mins)
        assert splits * per >= units > (splits - 1) * per
        assert per >= mins
    for bad in ((0, 1), (1, 0)):
        with pytest.raises(ValueError, match="must be >= 1"):
            decode_split_plan(1, 8, n, *bad)


def test_native_fp4_decode_device_rule(monkeypatch):
    """Block-scaled FP4 MMA at the decode's 16 rows only on sm_120; sm_100 (needs >= 128 rows)
    and Hopper keep the decoded path; CPU tensors never."""
    from thrift_vllm.ops.paged_attention import native_fp4_decode

    assert native_fp4_decode(torch.device("cpu")) is False
    for cap, want in (((12, 0), True), ((12, 1), True), ((10, 0), False), ((9, 0), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=cap: c)
        native_fp4_decode.cache_clear()  # one answer per device is cached
        assert native_fp4_decode(torch.device("cuda", 0)) is want, cap
    native_fp4_decode.cache_clear()
