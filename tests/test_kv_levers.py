"""thrift_vllm.kv_levers (issue 17): FP4 K/V storage with full-precision math, K smoothing and
the Hadamard rotation, against independent constructions on fresh random data at awkward sizes.
"""

from __future__ import annotations

import math

import pytest
import torch

from thrift_vllm import kv_levers as L  # noqa: N812
from thrift_vllm.formats import dequantize, quantize


def _kron_hadamard(d: int) -> torch.Tensor:
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    h = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(int(math.log2(d))):
        h = torch.kron(h, h2)
    return (h / math.sqrt(d)).float()


@pytest.mark.parametrize("d", [1, 2, 16, 64, 128])
def test_hadamard_matches_kronecker_and_is_orthonormal(d):
    h = L.hadamard(d)
    torch.testing.assert_close(h, _kron_hadamard(d))
    torch.testing.assert_close(h @ h.T, torch.eye(d), atol=1e-6, rtol=0)


@pytest.mark.parametrize("bad", [0, 3, 48, -4, 2.0])
def test_hadamard_rejects_non_powers_of_two(bad):
    with pytest.raises(ValueError, match=str(bad)):
        L.hadamard(bad)


def test_k_mean_modes():
    torch.manual_seed(1)
    k = torch.randn(2, 3, 77, 32)
    assert L.k_mean(k, "none") is None
    torch.testing.assert_close(L.k_mean(k, "head"), k.mean(-2, keepdim=True))
    torch.testing.assert_close(L.k_mean(k, "first", unit=20), k[..., :20, :].mean(-2, keepdim=True))
    m = L.k_mean(k, "unit", unit=20)
    for t in (0, 19, 20, 59, 60, 76):  # units [0,20) [20,40) [40,60) and the partial [60,77)
        u0 = t // 20 * 20
        torch.testing.assert_close(m[..., t, :], k[..., u0:min(u0 + 20, 77), :].mean(-2))
    with pytest.raises(ValueError, match="sideways"):
        L.k_mean(k, "sideways")
    with pytest.raises(ValueError, match="0"):
        L.k_mean(k, "unit", unit=0)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_store_kv_against_manual_construction(fmt):
    torch.manual_seed(2)
    k = torch.randn(1, 2, 45, 64, dtype=torch.float16) + 3 * torch.randn(64).half()
    v = torch.randn(1, 2, 45, 64, dtype=torch.float16)
    deq = lambda x: dequantize(quantize(x, fmt, -1), torch.float32)
    h = _kron_hadamard(64)
    kf, vf = k.float(), v.float()
    m = kf[..., :64, :].mean(-2, keepdim=True)  # 45 < 64: the first unit is the whole sequence
    cases = {
        ("none", False): (deq(kf), deq(vf)),
        ("first", False): (deq(kf - m) + m, deq(vf)),
        ("none", True): (deq(kf @ h) @ h.T, deq(vf @ h) @ h.T),
        ("first", True): (deq((kf - m) @ h) @ h.T + m, deq(vf @ h) @ h.T),
    }
    for (smooth, rot), (k_ref, v_ref) in cases.items():
        k_hat, v_hat = L.store_kv(k, v, fmt, smooth, rot)
        torch.testing.assert_close(k_hat, k_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v_hat, v_ref, atol=1e-5, rtol=1e-5)
    # the auto layout's V: groups of tokens (axis -2), before and after the rotation
    deq_t = lambda x: dequantize(quantize(x, fmt, -2), torch.float32)
    torch.testing.assert_close(L.store_kv(k, v, fmt, v_axis="tokens")[1], deq_t(vf),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(L.store_kv(k, v, fmt, rotate=True, v_axis="tokens")[1],
                               deq_t(vf @ h) @ h.T, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="channels"):
        L.store_kv(k, v, fmt, v_axis="channels")


def test_smoothing_reduces_storage_error_on_offset_channels():
    """K with a large per-channel offset (the structure smoothing removes): the reconstruction
    error drops. (No such test for the rotation: with 16-element scale groups, spreading one
    outlier channel over all 64 can raise the error; its effect is measured on the model.)"""
    torch.manual_seed(3)
    k = torch.randn(1, 3, 300, 64) + 8 * torch.randn(64)
    v = torch.randn(1, 3, 300, 64)
    errs = {sm: (L.store_kv(k, v, "nvfp4", sm)[0] - k).norm().item()
            for sm in ("none", "head", "first", "unit")}
    for sm in ("head", "first", "unit"):
        assert errs[sm] < 0.5 * errs["none"], errs


def test_shared_mean_leaves_softmax_unchanged():
    """Why a per-(layer, head) mean may be dropped by readers: q . m is constant along a row."""
    torch.manual_seed(4)
    q, k = torch.randn(2, 50, 32, dtype=torch.float64), torch.randn(2, 50, 32, dtype=torch.float64)
    m = k.mean(-2, keepdim=True)
    torch.testing.assert_close(torch.softmax(q @ k.transpose(-1, -2), -1),
                               torch.softmax(q @ (k - m).transpose(-1, -2), -1))


def _naive_mixed(q, kh, vh, kl, vl, sel, bs, scale):
    B, Hq, S, D = q.shape
    g = Hq // kh.shape[1]
    out = torch.zeros(B, Hq, S, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            for i in range(S):
                chosen = set(sel[b, h, i // bs].tolist()) - {-1}
                ks, vs = [], []
                for j in range(i + 1):
                    hi = j // bs in chosen
                    ks.append((kh if hi else kl)[b, h // g, j])
                    vs.append((vh if hi else vl)[b, h // g, j])
                s = torch.stack(ks).double() @ q[b, h, i].double() * scale
                out[b, h, i] = torch.softmax(s, 0) @ torch.stack(vs).double()
    return out


def test_mixed_attention_against_naive_loop():
    torch.manual_seed(5)
    B, Hq, Hkv, S, D, bs = 1, 4, 2, 37, 16, 8
    q = torch.randn(B, Hq, S, D)
    kh, vh, kl, vl = (torch.randn(B, Hkv, S, D) for _ in range(4))
    nq = -(-S // bs)
    sel = torch.randint(-1, nq, (B, Hq, nq, 2), dtype=torch.int32)
    ref = _naive_mixed(q, kh, vh, kl, vl, sel, bs, 0.3)
    out = L.mixed_attention(q, kh, vh, kl, vl, sel, bs, 0.3, chunk_rows=10)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    # no selection = attention over the low copies only; everything selected = the high copies
    empty = torch.empty(B, Hq, nq, 0, dtype=torch.int32)
    torch.testing.assert_close(L.mixed_attention(q, kh, vh, kl, vl, empty, bs, 0.3),
                               L.storage_attention(q, kl, vl, 0.3), atol=1e-5, rtol=1e-5)
    full = torch.arange(nq, dtype=torch.int32).expand(B, Hq, nq, nq)
    torch.testing.assert_close(L.mixed_attention(q, kh, vh, kl, vl, full, bs, 0.3),
                               L.storage_attention(q, kh, vh, 0.3), atol=1e-5, rtol=1e-5)
