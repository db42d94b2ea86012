"""benchmarks/summary.py: headline figures from a session file, ratios, latest per name."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def summary():
    spec = importlib.util.spec_from_file_location("summary", HERE.parent / "benchmarks" /
                                                  "summary.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(backend, case, budget=None, **kw):
    return {"backend": backend, "case": case, "budget": budget, **kw}


def test_figures_ratios_and_merge(summary, tmp_path):
    session = {
        "meta": {"commit": "abc1234", "device": "H200", "date": "2026-12-07"},
        "c1": {"meta": {"argv": ["--backends", "FLASH_ATTN"]}, "rows": [
            _row("FLASH_ATTN", "decode32k", steady_decode_tok_s=600.0),
            _row("FLASH_ATTN", "prefill32k", prefill_tok_s=30000.0, capacity_tokens=800)]},
        "c2": {"meta": {"argv": ["--backends", "thrift-nvfp4"]}, "rows": [
            _row("thrift-nvfp4", "decode32k", 0.25, steady_decode_tok_s=1.0),  # other budget
            _row("thrift-nvfp4", "decode32k", 0.05, steady_decode_tok_s=900.0),
            _row("thrift-nvfp4", "prefill32k", 0.05, prefill_tok_s=27000.0,
                 capacity_tokens=2700)]},
        "c3": {"meta": {"argv": ["--server-sweep"]}, "sweep": [
            {"backend": "FLASH_ATTN", "budget": None, "concurrency": 1, "ttft_p50": 1.0},
            {"backend": "thrift-nvfp4", "budget": 0.05, "concurrency": 1, "ttft_p50": 1.25}]},
        "c4": {"rows": [{"section": "decode", "batch": 16, "context": 32768, "layout": "nvfp4",
                         "math": "fp16", "launch": {"swap": True}, "total_ms": 0.2},
                        {"section": "decode", "batch": 16, "context": 32768, "layout": "nvfp4",
                         "math": "fp4", "launch": {}, "total_ms": 0.1},  # not the default
                        {"section": "fa3", "batch": 16, "context": 32768, "layout": "bf16",
                         "math": "fa3", "total_ms": 0.5}]},
    }
    figs = {f["name"]: f for f in summary.figures(session)}
    assert figs["engine.decode.16x32k"]["ratio"] == 1.5  # rate: ours / peer
    assert figs["engine.prefill.4x32k"]["ratio"] == 0.9
    assert figs["engine.kv_tokens"]["ratio"] == pytest.approx(3.375, abs=1e-3)
    assert figs["server.ttft_p50.c1"]["ratio"] == 0.8  # time: peer / ours
    assert figs["kernel.decode.16x32k"]["ratio"] == 2.5
    assert "engine.decode.16x32k.fp8kv" not in figs  # no FLASH_ATTN-fp8 row: no figure
    f = figs["engine.decode.16x32k"]
    assert set(f) == {"name", "value", "unit", "peer", "peer_value", "ratio", "commit",
                      "device", "date", "command"}
    assert (f["commit"], f["date"]) == ("abc1234", "2026-12-07")
    old = dict(f, date="2026-11-30", value=1.0)
    merged = summary.merge([old], [f])
    assert merged == [f]
    assert summary.merge([f], [old]) == [f]  # an older figure never replaces a newer one
    session["meta"]["summary_skip"] = ["c2"]  # a comparison run: no figures from it
    assert "engine.decode.16x32k" not in {f["name"] for f in summary.figures(session)}
    del session["meta"]["summary_skip"]
    path = tmp_path / "s.json"
    path.write_text(json.dumps(session))
    assert summary.main([str(path), "--out", str(tmp_path / "out.json")]) == 0
    assert len(json.loads((tmp_path / "out.json").read_text())["figures"]) == len(figs)
