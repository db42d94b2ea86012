"""The FlashAttention prefill route over the paged FP4 cache (``thrift_vllm.ops.flash_prefill``).

FlashAttention itself is vLLM's (CUDA only; benchmarks/vllm_gpu_check.py runs the real one). Here
a float64 PyTorch stand-in with the same keywords (paged through ``block_table`` + ``seqused_k``
or contiguous through ``cu_seqlens_k``) checks what the route hands it: the strided page views,
block tables, sequence bounds and the nvfp4 gather (interpreter). Expected outputs come from the
original K/V (auto layout: exact) or from a table-based FP4 round trip of the context (nvfp4).
"""

from __future__ import annotations

import pytest
import torch
from test_paged import Case

from thrift_vllm.formats import dequantize, quantize
from thrift_vllm.kv_layout import KVLayout
from thrift_vllm.ops.flash_prefill import FlashPrefillBatch, flash_prefill, gather_context
from thrift_vllm.paged import write_kv


def varlen_ref(*, q, k, v, out, cu_seqlens_q, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
               seqused_k=None, block_table=None, cu_seqlens_k=None):
    """flash_attn_varlen_func's contract in float64 (bottom-right causal, GQA)."""
    assert causal
    cu_q = cu_seqlens_q.tolist()
    for s in range(len(cu_q) - 1):
        qs = q[cu_q[s]:cu_q[s + 1]].double()
        assert qs.shape[0] <= max_seqlen_q
        if block_table is not None:
            n = int(seqused_k[s])
            pages = block_table[s, :-(-n // k.shape[1])].long()
            ks = k[pages].flatten(0, 1)[:n].double()
            vs = v[pages].flatten(0, 1)[:n].double()
        else:
            a, b = cu_seqlens_k[s].item(), cu_seqlens_k[s + 1].item()
            ks, vs = k[a:b].double(), v[a:b].double()
        n = ks.shape[0]
        assert n <= max_seqlen_k
        g = qs.shape[1] // ks.shape[1]
        ks, vs = ks.repeat_interleave(g, 1), vs.repeat_interleave(g, 1)
        sc = torch.einsum("qhd,khd->hqk", qs, ks) * softmax_scale
        pos_q = torch.arange(n - qs.shape[0], n)[:, None]
        sc = sc.masked_fill(torch.arange(n)[None, :] > pos_q, float("-inf"))
        out[cu_q[s]:cu_q[s + 1]] = torch.einsum("hqk,khd->qhd", sc.softmax(-1), vs).to(out.dtype)
    return out


def _fp4_round_trip(x: torch.Tensor, fmt: str) -> torch.Tensor:
    return dequantize(quantize(x.float(), fmt, axis=-1)).double()


def _expected(case: Case, qsl, fp4_context: bool) -> list[torch.Tensor]:
    """Per prefill sequence, float64 attention over the original K/V, the context (positions
    before the chunk) FP4-rounded through the formats module when ``fp4_context``."""
    L = case.layout
    res = []
    for i, (sq, skv) in enumerate(case.seqs):
        if sq == 1:
            res.append(None)
            continue
        k, v = case.k[i].double(), case.v[i].double()
        if fp4_context:
            ctx = skv - sq
            k = torch.cat([_fp4_round_trip(case.k[i][:ctx], L.quant_format), k[ctx:]])
            v = torch.cat([_fp4_round_trip(case.v[i][:ctx], L.quant_format), v[ctx:]])
        q = case.query[qsl[i]:qsl[i + 1]].double()
        g = q.shape[1] // k.shape[1]
        kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        sc = torch.einsum("qhd,khd->hqk", q, kk) * case.scale
        sc = sc.masked_fill(torch.arange(skv)[None, :] > torch.arange(skv - sq, skv)[:, None],
                            float("-inf"))
        res.append(torch.einsum("hqk,khd->qhd", sc.softmax(-1), vv))
    return res


# decodes interleaved (rows gathered) and decodes first (a contiguous run, vLLM's order)
INTERLEAVED = [(1, 1), (63, 63), (10, 65), (1, 200), (37, 130)]
DECODES_FIRST = [(1, 200), (1, 1), (65, 65), (200, 330)]
CASES = [  # (kv_layout, fmt, D, dtype, Hq, Hkv, page, seqs)
    ("auto", "nvfp4", 64, torch.float16, 8, 2, 64, INTERLEAVED),
    ("auto", "mxfp4", 128, torch.bfloat16, 8, 1, 128, DECODES_FIRST),
    ("nvfp4", "nvfp4", 128, torch.bfloat16, 4, 1, 128, INTERLEAVED),
    ("nvfp4", "nvfp4", 64, torch.float16, 8, 2, 64, DECODES_FIRST),
    ("nvfp4", "mxfp4", 64, torch.bfloat16, 8, 1, 128, INTERLEAVED),
]


@pytest.mark.parametrize("kv_layout,fmt,D,dtype,Hq,Hkv,page,seqs", CASES)
def test_flash_prefill_route_matches_exact_attention(kv_layout, fmt, D, dtype, Hq, Hkv, page,
                                                     seqs):
    layout = KVLayout(kv_layout, D, page, 64, fmt, "block_mean", dtype)
    case = Case(layout, Hq, Hkv, seqs=seqs, seed=D + Hq + page)
    case.write_context()
    key, value, slots, qsl = case.step()
    write_kv(layout, case.views, key, value, slots)
    batch = FlashPrefillBatch.make(qsl, [s for _, s in seqs], case.block_table,
                                   gather=kv_layout == "nvfp4")
    assert (batch.q_index is None) == (seqs is DECODES_FIRST)
    out = torch.full_like(case.query, float("nan"))
    flash_prefill(layout, case.cache, case.query, key, value, batch, scale=case.scale,
                  output=out, varlen_attn=varlen_ref)
    want = _expected(case, qsl, fp4_context=kv_layout == "nvfp4")
    for i, (sq, _) in enumerate(seqs):
        got = out[qsl[i]:qsl[i + 1]]
        if sq == 1:  # decode rows and padding are not the route's: left untouched
            assert torch.isnan(got).all()
            continue
        # the only rounding left: the output's cast to the model dtype (and, nvfp4, the
        # gathered rows' exact FP4 values in the model dtype)
        torch.testing.assert_close(got.double(), want[i], atol=2e-2, rtol=2e-2)
    assert torch.isnan(out[qsl[-1]:]).all()  # padding rows


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_gather_context_is_exact(fmt):
    """Decoded context == the formats module's dequantisation of the stored bytes, bit for bit;
    the chunk's rows == the fresh key/value; stale page slots never read."""
    layout = KVLayout("nvfp4", 64, 128, 64, fmt, "block_mean", torch.bfloat16)
    seqs = [(1, 70), (40, 40), (3, 300)]
    case = Case(layout, 4, 2, seqs=seqs, seed=5)
    case.write_context()
    key, value, slots, qsl = case.step()
    write_kv(layout, case.views, key, value, slots)
    batch = FlashPrefillBatch.make(qsl, [s for _, s in seqs], case.block_table, gather=True)
    k, v = gather_context(layout, case.cache, key, value, batch)
    assert k.shape == (340, 2, 64)
    starts = [0, 40]
    for (sq, skv), i, a in zip(seqs[1:], (1, 2), starts, strict=True):
        ctx = skv - sq
        for got, src in ((k, case.k[i]), (v, case.v[i])):
            want_ctx = dequantize(quantize(src[:ctx].float(), fmt, axis=-1)).to(got.dtype)
            assert torch.equal(got[a:a + ctx], want_ctx)
            assert torch.equal(got[a + ctx:a + skv], src[ctx:])


def test_flash_prefill_batch_and_errors():
    bt = torch.zeros(3, 4, dtype=torch.int32)
    assert FlashPrefillBatch.make([0, 1, 2, 3], [5, 6, 7], bt, gather=False) is None
    b = FlashPrefillBatch.make([0, 1, 4, 9], [5, 3, 70], bt, gather=True)
    assert b.rows == [1, 2] and (b.q_lo, b.q_hi) == (1, 9) and b.q_index is None
    assert b.cu_seqlens_q.tolist() == [0, 3, 8] and b.cu_seqlens_k.tolist() == [0, 3, 73]
    assert b.tile_seq.tolist() == [0, 1, 1] and b.tile_start.tolist() == [0, 0, 64]
    assert b.ctx_lens.tolist() == [0, 65] and (b.max_seqlen_q, b.max_seqlen_k) == (5, 70)
    with pytest.raises(ValueError, match="4 queries but seq_len 3"):
        FlashPrefillBatch.make([0, 4], [3], bt, gather=False)
    layout = KVLayout("auto", 64, 64, 64, "nvfp4", "block_mean", torch.float16)
    with pytest.raises(ValueError, match="query must be"):
        flash_prefill(layout, torch.zeros(1), torch.zeros(9, 2, 32, dtype=torch.float16),
                      None, None, b, scale=1.0, output=torch.zeros(1), varlen_attn=varlen_ref)
    with pytest.raises(ValueError, match="made without gather"):
        gather_context(layout, torch.zeros(1), torch.zeros(1), torch.zeros(1),
                       FlashPrefillBatch.make([0, 1, 4], [5, 3], bt, gather=False))


def _fa3_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    try:
        from thrift_vllm.backend.compat import flash_attn_varlen
    except Exception as e:
        pytest.skip(f"thrift_vllm.backend does not import: {e}")
    fn, why = flash_attn_varlen("cuda")
    if fn is None:
        pytest.skip(why)
    return fn


GPU_SEQS = [(1, 3000), (1000, 1000), (700, 5000), (1, 70), (513, 2600)]


@pytest.mark.gpu
@pytest.mark.parametrize("kv_layout", ["auto", "nvfp4"])
@pytest.mark.parametrize("real_fa3", [False, True])
def test_flash_prefill_gpu(kv_layout, real_fa3):
    """Compiled gather kernel and, with ``real_fa3``, vLLM's FlashAttention-3 on the strided
    page views (GQA 4:1, D 128, bf16, 64-token pages), against float64 attention."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    fn = _fa3_or_skip() if real_fa3 else _on_cpu(varlen_ref)
    layout = KVLayout(kv_layout, 128, 64, 64, "nvfp4", "block_mean", torch.bfloat16)
    case = Case(layout, 16, 4, seqs=GPU_SEQS, seed=3, chunks=(1024, 333))
    case.write_context()
    key, value, slots, qsl = case.step()
    write_kv(layout, case.views, key, value, slots)
    dev = torch.device("cuda")
    cache, query = case.cache.to(dev), case.query.to(dev)
    key, value, bt = key.to(dev), value.to(dev), case.block_table.to(dev)
    batch = FlashPrefillBatch.make(qsl, [s for _, s in GPU_SEQS], bt,
                                   gather=kv_layout == "nvfp4")
    out = torch.full_like(query, float("nan"))
    flash_prefill(layout, cache, query, key, value, batch, scale=case.scale, output=out,
                  varlen_attn=fn)
    want = _expected(case, qsl, fp4_context=kv_layout == "nvfp4")
    for i, (sq, _) in enumerate(GPU_SEQS):
        got = out[qsl[i]:qsl[i + 1]].cpu()
        if sq == 1:
            assert torch.isnan(got).all()
            continue
        torch.testing.assert_close(got.double(), want[i], atol=2e-2, rtol=2e-2)


def _on_cpu(fn):
    def run(**kw):
        out = kw["out"]
        cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        fn(**cpu)
        out.copy_(cpu["out"])
        return out
    return run
