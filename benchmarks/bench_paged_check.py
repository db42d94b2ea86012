"""``bench_paged.py``'s check section: the Triton KV write (bit-exact but k_mean) and paged
attention (decode and mixed prefill batches) against ``thrift_vllm.paged`` on small shapes, fresh
random data, shuffled block tables, both layouts and both FP4 formats."""

from __future__ import annotations

from collections.abc import Callable

import torch

from thrift_vllm.kv_layout import KVLayout
from thrift_vllm.ops.kv_write import write_kv_triton
from thrift_vllm.ops.paged_attention import paged_attention_triton
from thrift_vllm.paged import paged_attention, write_kv


def check(out: str, quick: bool, dev: str, emit: Callable[[str, dict], None]) -> bool:
    """The reference runs on CPU copies (plain PyTorch, fp32), the kernels on ``dev`` ("cuda";
    "cpu" for the interpreter dry run, with smaller shapes). Rows go through ``emit``."""
    ok_all = True
    cases = [("auto", "nvfp4", "block_mean", torch.bfloat16), ("nvfp4", "nvfp4", "quest",
             torch.float16), ("nvfp4", "mxfp4", "local", torch.bfloat16),
             ("auto", "mxfp4", "quest", torch.float16)]
    Hq, Hkv, D, P = (32, 8, 128, 64) if dev == "cuda" else (8, 2, 64, 64)
    for kvl, fmt, sel, dt in cases[: 2 if quick else 4]:
        for kind in ("decode", "mixed"):
            g = torch.Generator().manual_seed(0)
            lay = KVLayout(kvl, D, P, 64, fmt, sel, dt)
            seq_lens = [1, 63, 1000, 4097] if kind == "decode" else [63, 1000, 300, 4097]
            q_lens = [1, 1, 1, 1] if kind == "decode" else [1, 64, 300, 129]
            if dev != "cuda":  # dry run: interpreter-sized
                seq_lens, q_lens = [s // 8 + 1 for s in seq_lens], [min(q, 9) for q in q_lens]
            budgets = [0.0, 0.05, 0.5, 1.0] if kind == "decode" else [0.5, 0.05, 0.0, 1.0]
            pages = max(-(-s // P) for s in seq_lens)
            nb = len(seq_lens) * pages + 3
            bt = torch.randperm(nb, generator=g)[: len(seq_lens) * pages].view(-1, pages)
            bt = bt.to(torch.int32).contiguous()
            ref_cache = lay.allocate(nb, Hkv)
            views = lay.views(ref_cache)
            hist, step, qsl = [], [], [0]
            for i, (s, q) in enumerate(zip(seq_lens, q_lens, strict=True)):
                hist += [int(bt[i, p // P]) * P + p % P for p in range(s - q)]
                step += [int(bt[i, p // P]) * P + p % P for p in range(s - q, s)]
                qsl.append(qsl[-1] + q)
            kh = torch.randn(len(hist), Hkv, D, generator=g).to(dt)
            vh = torch.randn(len(hist), Hkv, D, generator=g).to(dt)
            write_kv(lay, views, kh, vh, torch.tensor(hist, dtype=torch.int64))
            cache = ref_cache.to(dev)
            step_t = torch.tensor(step, dtype=torch.int64)
            k = torch.randn(len(step), Hkv, D, generator=g).to(dt)
            v = torch.randn(len(step), Hkv, D, generator=g).to(dt)
            q = torch.randn(len(step), Hq, D, generator=g).to(dt)
            write_kv(lay, views, k, v, step_t)
            write_kv_triton(k.to(dev), v.to(dev), cache, step_t.to(dev), lay)
            got_v, ref_v = lay.views(cache.cpu()), views
            u8 = torch.uint8
            write_exact = all(
                torch.equal(getattr(got_v, n).view(u8), getattr(ref_v, n).view(u8))
                for n in got_v._fields if getattr(ref_v, n) is not None and n != "k_mean")
            mean_err = 0.0
            if ref_v.k_mean is not None:
                mean_err = (got_v.k_mean - ref_v.k_mean).abs().max().item()
            kw = dict(query_start_loc=qsl, seq_lens=seq_lens, fp16_budgets=budgets, scale=D**-0.5)
            # The reference reads the pages the kernel wrote: k_mean may differ from the torch
            # write by an ulp (summation order), which can flip a near-tie in block_mean
            # selection and then differ by a whole block's FP4 error (seen on the H200).
            ref = paged_attention(lay, got_v, q, k, v, block_table=bt, **kw)
            got = paged_attention_triton(lay, cache, q.to(dev), k.to(dev), v.to(dev),
                                         block_table=bt.to(dev), **kw).cpu()
            errs = []
            for i in range(len(seq_lens)):
                a, r = got[qsl[i]:qsl[i + 1]].double(), ref[qsl[i]:qsl[i + 1]].double()
                errs.append(((a - r).norm() / r.norm()).item())
            tol = 2e-3 if dt == torch.float16 else 1e-2
            ok = write_exact and mean_err < 1e-5 and max(errs) < tol and not got.isnan().any()
            ok_all &= ok
            emit(out, dict(section="check", kind=kind, kv_layout=kvl, fmt=fmt, selection=sel,
                           dtype=str(dt).removeprefix("torch."), write_bit_exact=write_exact,
                           k_mean_max_abs_err=mean_err, rel_err=[f"{e:.2e}" for e in errs],
                           tol=tol, ok=bool(ok)))
    return ok_all
