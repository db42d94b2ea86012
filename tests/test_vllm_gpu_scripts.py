"""CPU tests of the H200 scripts benchmarks/vllm_gpu_check.py and benchmarks/vllm_serving.py:
they import and print --help without vLLM or CUDA, and their pure helpers (greedy / logprob
comparison with tolerances, percentiles, capacity arithmetic, engine planning, tables) behave."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_test_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def check():
    return _load("vllm_gpu_check")


@pytest.fixture(scope="module")
def serving():
    return _load("vllm_serving")


@pytest.mark.parametrize("script", ["vllm_gpu_check.py", "vllm_serving.py"])
def test_help_runs_without_vllm(script):
    code = ("import sys, runpy; sys.modules['vllm'] = None; sys.argv = [sys.argv[1], '--help']; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code, str(BENCH / script)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


def test_import_does_not_import_vllm_or_torch(check, serving):
    code = (f"import importlib.util as u, sys\n"
            f"for n in ('vllm_gpu_check', 'vllm_serving'):\n"
            f"    s = u.spec_from_file_location(n, r'{BENCH}/' + n + '.py')\n"
            f"    m = sys.modules[n] = u.module_from_spec(s)\n"
            f"    s.loader.exec_module(m)\n"
            f"print(sorted(m for m in ('vllm', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


# --- vllm_gpu_check: comparisons --------------------------------------------------------------
def _lps(ids, chosen=-1.0, other=None):
    """Top-k dicts: the chosen token at ``chosen``, plus optional (token, logprob) pairs."""
    return [{t: chosen, **dict(other or [])} for t in ids]


def test_compare_greedy_exact_and_drift(check):
    ids = [5, 6, 7, 8]
    r = check.compare_greedy(ids, _lps(ids, -1.0), ids, _lps(ids, -1.02))
    assert r["ok"] and r["status"] == "exact" and r["first_diff"] is None
    assert r["max_lp_diff"] == pytest.approx(0.02)
    r = check.compare_greedy(ids, _lps(ids, -1.0), ids, _lps(ids, -1.5), lp_tol=0.1)
    assert not r["ok"] and r["status"] == "lp_drift"


def test_compare_greedy_near_tie_accepted(check):
    ref_ids, ids = [1, 2, 3, 4], [1, 2, 9, 9]
    ref_lps = [{1: -0.1}, {2: -0.2}, {3: -0.70, 9: -0.72}, {4: -0.1}]
    lps = [{1: -0.1}, {2: -0.2}, {9: -0.70, 3: -0.71}, {9: -0.1}]
    r = check.compare_greedy(ref_ids, ref_lps, ids, lps, tie_tol=0.05)
    assert r["ok"] and r["status"] == "near_tie" and r["first_diff"] == 2
    assert r["tie_gap"] == pytest.approx(0.02)


def test_compare_greedy_clear_mismatch_rejected(check):
    ref_ids, ids = [1, 2, 3], [1, 7, 3]
    ref_lps = [{1: -0.1}, {2: -0.1, 7: -3.0}, {3: -0.1}]
    lps = [{1: -0.1}, {7: -0.1, 2: -2.5}, {3: -0.1}]
    r = check.compare_greedy(ref_ids, ref_lps, ids, lps)
    assert not r["ok"] and r["status"] == "mismatch" and r["tie_gap"] > 2
    # the other token absent from the reference's top-k: an infinite gap, not a crash
    r = check.compare_greedy(ref_ids, [{1: -0.1}, {2: -0.1}, {3: -0.1}], ids, lps)
    assert not r["ok"] and math.isinf(r["tie_gap"])


def test_compare_greedy_length_and_missing_logprobs(check):
    r = check.compare_greedy([1, 2, 3], _lps([1, 2, 3]), [1, 2], _lps([1, 2]))
    assert not r["ok"] and r["status"] == "length"
    r = check.compare_greedy([1, 2], [{1: -1.0}, {}], [1, 2], _lps([1, 2]))
    assert not r["ok"] and r["status"] == "lp_drift"  # a chosen token without a logprob


def test_compare_prompt_logprobs(check):
    ref = [None, -1.0, -2.0, -3.0]
    ok = check.compare_prompt_logprobs(ref, [None, -1.01, -2.0, -3.02])
    assert ok["ok"] and ok["n"] == 3 and ok["max"] == pytest.approx(0.02)
    assert not check.compare_prompt_logprobs(ref, [None, -1.0, -2.0, -3.5], max_tol=0.3)["ok"]
    assert not check.compare_prompt_logprobs(ref, [None, -1.0, -2.0])["ok"]
    bad = check.compare_prompt_logprobs(ref, [None, -1.0, None, -3.0])
    assert not bad["ok"] and math.isinf(bad["max"])


def test_noise_floor_widens_tolerances(check):
    """The reference disagreeing with itself by 0.2 nats (another batching) widens the logprob
    and tie tolerances to 0.4: a candidate 0.3 away passes, one 0.5 away still fails; with no
    noise the command-line tolerances stay."""
    args = check.build_parser().parse_args([])
    runner = check.RunnerBase(args)
    runner.ref_tf = [[None, -1.0, -2.0]]
    ref = [{"ids": [5, 6], "lps": [{5: -0.5, 6: -1.5}, {6: -0.2, 7: -2.0}]}]
    ok, text, data = runner.set_noise_floor(ref, ref, [[None, -1.0, -2.0]])
    assert ok and data["tolerances"]["lp"] == args.lp_tol  # no noise: unchanged

    alone = [{"ids": [5, 6], "lps": [{5: -0.7, 6: -1.5}, {6: -0.2}]}]  # 0.2 nats off
    ok, text, data = runner.set_noise_floor(alone, ref, [[None, -1.1, -2.0]])
    tol = runner.tolerances()
    assert tol["lp"] == pytest.approx(0.4) and tol["tie"] == pytest.approx(0.4)
    assert tol["tf_mean"] == pytest.approx(max(args.tf_mean_tol, 2 * 0.05))
    assert "1/1" not in text and "0.2" in text
    near = [{"ids": [5, 6], "lps": [{5: -0.8}, {6: -0.2}]}]
    far = [{"ids": [5, 6], "lps": [{5: -1.0}, {6: -0.2}]}]
    assert runner.compare_set(near, ref)[0] and not runner.compare_set(far, ref)[0]


def test_summarize_and_table(check):
    ok, text = check.summarize_comparisons([
        {"ok": True, "status": "exact", "max_lp_diff": 0.01},
        {"ok": True, "status": "near_tie", "max_lp_diff": 0.03}])
    assert ok and "exact 1" in text and "near_tie 1" in text and "0.03" in text
    table = check.format_table([{"name": "a", "ok": True, "detail": "fine", "seconds": 1.2},
                                {"name": "bb", "ok": False, "detail": "bad"}])
    lines = table.splitlines()
    assert lines[0].startswith("| check") and "PASS" in lines[2] and "FAIL" in lines[3]


def test_token_prompts(check):
    byte = check.token_prompts(320, max_len=100, long_len=500)
    assert [len(p) for p in byte["short"]] == [20, 48, 77, 120, 160, 200]
    assert len(byte["long"][0]) == 500 and all(t < 256 for t in byte["long"][0])
    assert len(byte["preempt"]) == 8 and max(len(p) for p in byte["preempt"]) == 100
    big = check.token_prompts(128256, max_len=64, long_len=128)
    assert all(300 <= t < 128256 for p in big["short"] for t in p)
    assert big == check.token_prompts(128256, max_len=64, long_len=128)  # seeded


def test_plugin_entry_point_written_when_missing(check, tmp_path, monkeypatch):
    from importlib import metadata

    monkeypatch.setenv("PYTHONPATH", "")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(metadata, "entry_points", lambda group=None: [])
    how = check.ensure_plugin_entry_point(str(tmp_path))
    assert "written" in how
    ep = next(tmp_path.glob("*.dist-info")) / "entry_points.txt"
    assert "thrift_vllm.backend.plugin:register" in ep.read_text()
    assert str(tmp_path) in sys.path
    assert str(tmp_path) in __import__("os").environ["PYTHONPATH"]


# --- vllm_serving: helpers --------------------------------------------------------------------
def test_percentile(serving):
    assert serving.percentile([3, 1, 2], 50) == 2
    assert serving.percentile([0, 10], 99) == pytest.approx(9.9)
    assert math.isnan(serving.percentile([], 50))


def test_fit_and_bytes(serving):
    # FA3 on an H200 at 0.85: ~780K tokens of 16-token blocks
    assert serving.fit_requests(48_000, 16) == 48_000 // 2064
    assert serving.fit_requests(0, 16) == 0
    assert serving.stock_bytes_per_token() == 131072  # Llama-3-8B: 32 x 8 x 2 x 128 x 2
    auto = serving.thrift_bytes_per_token("auto", 64)
    nvfp4 = serving.thrift_bytes_per_token("nvfp4", 64)
    assert auto == 32 * 8 * 664 and nvfp4 == 32 * 8 * 152  # notes/paged_kv.md's example
    assert serving.thrift_bytes_per_token("auto", 48) is None  # page not a multiple of the unit


def test_plan_engines(serving):
    plan = serving.plan_engines(["FLASH_ATTN", "thrift-auto"], [0.0, 0.05], "request")
    assert plan == [{"backend": "FLASH_ATTN", "budget": None, "budgets": [None]},
                    {"backend": "thrift-auto", "budget": 0.0, "budgets": [0.0, 0.05]}]
    plan = serving.plan_engines(["thrift-nvfp4"], [0.0, 0.05], "engine")
    assert [p["budget"] for p in plan] == [0.0, 0.05]
    with pytest.raises(ValueError, match="unknown backend"):
        serving.plan_engines(["FLASHINFER"], [0.0], "request")


def test_stream_stats_and_tables(serving):
    s = serving.stream_stats(10.0, [10.5, 10.6, 10.8])
    assert s["ttft"] == pytest.approx(0.5) and s["itl"] == pytest.approx([0.1, 0.2])
    assert math.isnan(serving.stream_stats(1.0, [])["ttft"])
    assert s["tpot"] == pytest.approx(0.15) and s["n"] == 3 == s["chunks"]
    # 5 tokens in 3 chunks (a lagging client gets several tokens per chunk): TPOT per token
    t = serving.stream_stats(10.0, [10.5, 10.6, 10.8], tokens=5)
    assert t["tpot"] == pytest.approx(0.075) and t["n"] == 5 and t["chunks"] == 3
    rows = [
        {"backend": "FLASH_ATTN", "budget": None, "case": "capacity", "kind": "capacity",
         "capacity_tokens": 780000, "bytes_per_token": 131072, "fit32k": 23, "kv_gib": 95.2},
        {"backend": "FLASH_ATTN", "budget": None, "case": "decode8k", "kind": "decode",
         "decode_tok_s": 1750.0, "steady_decode_tok_s": 1812.4},
        {"backend": "thrift-auto", "budget": 0.05, "case": "prefill32k", "kind": "prefill",
         "prefill_tok_s": 30000.0, "capacity_tokens": 600000},
        {"backend": "thrift-auto", "budget": 0.05, "case": "decode8k", "kind": "decode",
         "error": "boom"},
    ]
    table = serving.make_table(rows).splitlines()
    assert "prefill32k tok/s" in table[0] and "decode8k tok/s" in table[0]
    assert "780,000" in table[2] and "1,750 (1,812)" in table[2]
    assert "| 0.05 |" in table[3] and "30,000" in table[3] and "ERR" in table[3]
    sweep = serving.make_sweep_table([
        {"backend": "FLASH_ATTN", "budget": None, "concurrency": 8, "requests": 16,
         "ttft_p50": 0.5, "ttft_p99": 1.0, "itl_p50": 0.01, "itl_p99": 0.02, "tpot_p50": 0.0123,
         "out_tok_s": 900.0, "req_s": 3.456},
        {"backend": "thrift-auto", "budget": 0.05, "concurrency": 8, "error": "x"}])
    assert "10.0" in sweep and "12.3" in sweep and "3.46" in sweep and "ERROR" in sweep


def test_scaled_and_merge(serving, tmp_path):
    c = serving.scaled(serving.CASES["decode8k"], 1 / 64)
    assert c.prompt_len == 128 and c.n == 16 and c.new_tokens == 256
    assert serving.scaled(serving.CASES["capacity"], 0.5) == serving.CASES["capacity"]
    a = tmp_path / "a.json"
    a.write_text(json.dumps({"rows": [{"backend": "FLASH_ATTN", "case": "decode8k",
                                       "kind": "decode", "decode_tok_s": 1.0}]}))
    proc = subprocess.run([sys.executable, str(BENCH / "vllm_serving.py"), "--merge", str(a)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "FLASH_ATTN" in proc.stdout


# --- vllm_serving: kernel profiles (--profile-steps) ------------------------------------------
def test_profile_groups_and_summary(serving):
    prof = _load("vllm_profile")
    assert prof.group_of("_paged_decode_kernel") == "thrift decode"
    assert prof.group_of("_paged_topk_kernel") == "thrift selection"
    assert prof.group_of("_kv_write_tokens_kernel") == "thrift KV write / quantise"
    assert prof.group_of("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_NNT") == "GEMM"
    assert prof.group_of("void flash::FlashAttnFwdSm90<...>") == "FlashAttention"
    assert prof.group_of("triton_poi_fused_mul_0").startswith("other")
    kernels = [("_paged_decode_kernel", 3000.0, 64), ("nvjet_gemm", 1000.0, 448),
               ("_paged_topk_kernel", 500.0, 64), ("_paged_score_kernel", 500.0, 64)]
    s = prof.summarize(kernels, steps=2, top=3)
    assert s["kernel_ms_per_step"] == pytest.approx(2.5)
    assert [g["group"] for g in s["groups"]] == ["thrift decode", "GEMM", "thrift selection"]
    sel = s["groups"][2]
    assert sel["ms_per_step"] == pytest.approx(0.5) and sel["calls_per_step"] == 64
    assert sum(g["share"] for g in s["groups"]) == pytest.approx(1.0)
    assert len(s["top"]) == 3 and s["top"][0]["kernel"] == "_paged_decode_kernel"
    with pytest.raises(ValueError, match="steps must be > 0, got 0"):
        prof.summarize(kernels, steps=0)
    table = prof.profile_table([{"backend": "thrift-nvfp4", "budget": 0.05, "case": "decode32k",
                                 "profile": s}])
    assert "| thrift decode | 1.500 | 60.0 % | 32 |" in table


class _Out:
    def __init__(self, rid, n):
        self.request_id = rid
        self.outputs = [type("C", (), {"token_ids": list(range(n))})()]


class _FakeEngine:
    """Request i gets its first token at step 2 + i * stagger, then one token per step."""

    def __init__(self, stagger: int = 0):
        self.reqs, self.t, self.stagger = {}, 0, stagger

    def add_request(self, rid, prompt, sp):
        self.reqs[rid] = [0, sp.max_tokens, 2 + len(self.reqs) * self.stagger]

    def has_unfinished_requests(self):
        return any(n < m for n, m, _ in self.reqs.values())

    def step(self):
        self.t += 1
        outs = []
        for rid, r in self.reqs.items():
            if self.t >= r[2] and r[0] < r[1]:
                r[0] += 1
                outs.append(_Out(rid, r[0]))
        return outs


def test_step_run_profiles_the_last_steps_and_leaves_them_out(serving, monkeypatch):
    prof = sys.modules.get("vllm_profile") or __import__("vllm_profile")
    calls = []

    class FakeProfile:
        def start(self, into):
            calls.append(("start", eng.t))
            return True

        def stop(self, steps, into):
            calls.append(("stop", eng.t, steps))
            into["profile"] = {"steps": steps}

    monkeypatch.setattr(prof, "KernelProfile", FakeProfile)
    eng = _FakeEngine()
    llm = type("L", (), {"llm_engine": eng})()
    sp = type("SP", (), {"max_tokens": 20})()
    timing = serving.EngineTiming()
    timing.seed = 0
    res = timing.step_run(llm, [{"prompt_token_ids": [1]}] * 3, sp, profile_steps=5)
    # tokens 1..20 at steps 2..21; the profile covers steps 3..7 (right after every request
    # has its first token, step 2), the decode time starts after it (5 tokens each by then)
    assert calls == [("start", 2), ("stop", 7, 5)]
    assert res["profile"] == {"steps": 5}
    assert res["tokens"] == 60 and res["decode_tokens"] == 3 * (20 - 6)
    plain = serving.EngineTiming()
    plain.seed = 0
    res0 = plain.step_run(type("L", (), {"llm_engine": _FakeEngine()})(),
                          [{"prompt_token_ids": [1]}] * 3, sp)
    assert "profile" not in res0 and res0["decode_tokens"] == 3 * 19


def test_sweep_server_cmd_passes_thrift_settings(serving):
    sweep_mod = sys.modules.get("vllm_server_sweep") or __import__("vllm_server_sweep")
    args = serving.build_parser().parse_args(
        ["--server-sweep", "--server", "thrift-vllm", "--full-decode-graphs", "--bulk-math",
         "fp8"])
    sw = sweep_mod.Sweep(args)
    sw.model, sw.shape = "/m", {"max_positions": 131072}
    cmd = sw.server_cmd({"backend": "thrift-nvfp4", "budget": 0.05}, 8000)
    cfg = json.loads(cmd[cmd.index("--additional-config") + 1])["thrift_vllm"]
    assert cfg == {"impl": "triton", "cuda_graphs": True, "bulk_math": "fp8", "fp16_budget": 0.05}
    assert cmd[cmd.index("--kv-cache-dtype") + 1] == "nvfp4"
    fa = sw.server_cmd({"backend": "FLASH_ATTN", "budget": None}, 8000)
    assert "--additional-config" not in fa


def test_decode_graphs_setting(serving):
    common = sys.modules.get("vllm_bench_common") or __import__("vllm_bench_common")
    parse = serving.build_parser().parse_args
    assert common.decode_graphs_setting(parse([])) is None  # the backend's default (FULL)
    assert common.decode_graphs_setting(parse(["--full-decode-graphs"])) is True
    assert common.decode_graphs_setting(parse(["--piecewise-decode"])) is False
    with pytest.raises(SystemExit, match="exclude each other"):
        common.decode_graphs_setting(parse(["--full-decode-graphs", "--piecewise-decode"]))
    sweep_mod = sys.modules.get("vllm_server_sweep") or __import__("vllm_server_sweep")
    sw = sweep_mod.Sweep(parse(["--piecewise-decode"]))
    sw.model, sw.shape = "/m", {"max_positions": 131072}
    cmd = sw.server_cmd({"backend": "thrift-auto", "budget": None}, 8000)
    assert json.loads(cmd[cmd.index("--additional-config") + 1])["thrift_vllm"] == {
        "impl": "triton", "cuda_graphs": False}


def test_step_run_steady_state_excludes_the_shrinking_tail(serving, monkeypatch):
    """Requests that start decoding 3 steps apart finish 3 steps apart: the steady rate covers
    only the steps where all of them decode (3 tokens per step, one per request)."""
    import time

    clock = {"t": 0.0}
    eng = _FakeEngine(stagger=3)
    plain_step = eng.step

    def tick():  # one engine step = 1 s of fake time
        clock["t"] += 1.0
        return plain_step()

    eng.step = tick
    monkeypatch.setattr(time, "perf_counter", lambda: clock["t"])
    sp = type("SP", (), {"max_tokens": 20})()
    timing = serving.EngineTiming()
    timing.seed = 0
    res = timing.step_run(type("L", (), {"llm_engine": eng})(),
                          [{"prompt_token_ids": [1]}] * 3, sp)
    # all decoding from step 8 (the third request's first token) to step 21 (the first done):
    # 12 tokens at step 8, 51 at step 21
    assert res["steady_decode_tok_s"] == pytest.approx(39 / 13)
    assert res["decode_tok_s"] < res["steady_decode_tok_s"]  # the whole decode has the tail


def test_serving_bulk_math_choices_match_the_backend(serving):
    """The benchmark lists the backend's bulk maths by hand (importing the config would pull in
    torch); they must stay equal, and native reaches the engine's thrift config."""
    from thrift_vllm.backend.config import BACKEND_BULK_MATHS

    parser = serving.build_parser()
    action = next(a for a in parser._actions if a.dest == "bulk_math")
    assert tuple(action.choices) == BACKEND_BULK_MATHS
    common = sys.modules.get("vllm_bench_common") or __import__("vllm_bench_common")
    cfg = common.thrift_config(parser.parse_args(["--bulk-math", "native"]), 0.05)
    assert cfg["bulk_math"] == "native"


def test_serving_route_choices_match_the_backend(serving):
    """--prefill / --decode-math list the backend's values by hand; they stay equal, reach the
    engine's thrift config when not auto, and FLASH_ATTN-fp8 asks vLLM for fp8 pages."""
    from thrift_vllm.backend.config import DECODE_MATHS, PREFILLS

    parser = serving.build_parser()
    for dest, values in (("prefill", PREFILLS), ("decode_math", DECODE_MATHS)):
        action = next(a for a in parser._actions if a.dest == dest)
        assert tuple(action.choices) == values
    common = sys.modules.get("vllm_bench_common") or __import__("vllm_bench_common")
    assert "prefill" not in common.thrift_config(parser.parse_args([]), None)
    cfg = common.thrift_config(parser.parse_args(["--prefill", "thrift", "--decode-math", "fp4"]),
                               None)
    assert (cfg["prefill"], cfg["decode_math"]) == ("thrift", "fp4")
    lib = sys.modules.get("vllm_serving_lib") or __import__("vllm_serving_lib")
    assert lib.BACKENDS["FLASH_ATTN-fp8"]["kv_cache_dtype"] == "fp8"
