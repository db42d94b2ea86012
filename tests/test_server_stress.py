"""``thrift-vllm serve`` under abuse, as regression tests (issue 16): the embedded model on CPU.

- stress (one server): a greedy reference completion before and after; 96 concurrent streams
  with mixed budgets; a seeded fuzz of 600 requests (budget strings, wrong JSON types, huge
  prompts and nesting, unknown models, odd methods and paths, broken chat messages); 24 streams
  dropped at once; no 5xx, no request past its timeout, /health 200 throughout, the realised FP16
  share per budget bucket plausible, ``X-FP16-Budget-Applied`` equal to the budget the attention
  layers used (exact block counts of the engine's metric), and a clean SIGTERM;
- KV exhaustion and engine death (another server, a KV pool of 6 pages = 768 tokens): more
  concurrent long requests than the pool holds all complete (queued or preempted), a request
  longer than the model's limit is a 400 naming it; then the engine core is killed: the open
  request ends in a 5xx-class JSON error (or an error event in its stream), never a hang,
  /health stops answering 200 and the Dockerfile's own HEALTHCHECK command fails.

The numbers are printed (``-s``) for BENCHMARKS.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
from server_process import Server, start_server
from server_process import vllm_import_error as _vllm_import_error
from test_server import KEY, MODEL

ROOT = Path(__file__).resolve().parents[1]
AUTH = {"Authorization": f"Bearer {KEY}"}
CAP = 0.5
TIMEOUT = 60.0  # seconds, any single request


def _server(tmp: Path, *extra: str):
    """``server_process.start_server`` with this module's budget settings (a context manager
    that stops the server and its engine core on exit)."""
    return start_server(tmp, ["--api-key", KEY, "--max-fp16-budget", str(CAP), "--fp16-budget",
                              "0.05", "--enable-log-requests", *extra], timeout=300)


@pytest.fixture
def needs_vllm():
    if _vllm_import_error() is not None:
        pytest.skip(f"import vllm failed: {_vllm_import_error()}")


def _series(text: str, name: str) -> dict[str, float]:
    return {line.split("{", 1)[1].split("}")[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith(name + "{")}


# --- the fuzz corpus ----------------------------------------------------------------------------

BUDGET_STRINGS = ["٠.٢", "１", "0.5\u200b", "0x1", "1_0", "NaN", "nan", "-inf", "Infinity",
                  "1e-400", "1e400", "-0", "0." + "1" * 10_000, "9" * 10_000, "", " ", "0.1,0.2",
                  "½", "0.25", "0", "1", "0.05", "+.5", ".", "e", "1.5", "-0.1", "None", "null"]
BODY_VALUES = [True, False, None, [0.1], {"a": 1}, "0.2", "abc", 10**400, -1, 2, 0.3, 1e308,
               "٠.٢", [], {}, "", 0, 1]
WRONG_TYPES = {"max_tokens": ["5", -1, 0, 1.5, [1], {"a": 1}, None, True, 10**30],
               "n": ["2", -1, 0, 1.5, [1], 10**6],
               "logprobs": ["x", -3, 1.5, [1], 10**6],
               "temperature": ["hot", -1, [0.5], {"t": 1}, float("1e308")],
               "stop": [5, [1, 2], {"a": "b"}, ["x"] * 100, "", [None]]}


def _fuzz_case(rng: random.Random, i: int) -> dict:
    """One request: method, path, headers (bytes pairs), content (bytes)."""
    path = rng.choice(["/v1/completions", "/v1/chat/completions"])
    chat = path.endswith("chat/completions")
    body: dict = {"model": MODEL, "max_tokens": rng.randint(1, 3), "temperature": 0}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "ab"})
    headers = [(b"authorization", f"Bearer {KEY}".encode()),
               (b"content-type", b"application/json")]
    kind = rng.randrange(11)
    content = None
    method = "POST"
    if kind == 0:  # budget header strings
        text = rng.choice([b for b in BUDGET_STRINGS if b == b.strip() and b])  # h11 rules
        headers.append((b"x-fp16-budget", text.encode("utf-8")))
    elif kind == 1:  # budget in the body, top level or vllm_xargs
        v = rng.choice(BODY_VALUES + BUDGET_STRINGS[:6])
        if rng.random() < 0.5:
            body["fp16_budget"] = v
        else:
            body["vllm_xargs"] = rng.choice([{"fp16_budget": v}, [v], v])
    elif kind == 2:  # wrong JSON types
        field = rng.choice(sorted(WRONG_TYPES))
        body[field] = rng.choice(WRONG_TYPES[field])
    elif kind == 3:  # huge prompt (beyond max_model_len)
        text = "x" * rng.choice([600, 5_000, 300_000])
        body.update({"messages": [{"role": "user", "content": text}]} if chat
                    else {"prompt": text})
    elif kind == 4:  # deep nesting
        depth = rng.choice([1_000, 100_000])
        content = (b'{"model": "' + MODEL.encode() + b'", "prompt": ' + b"[" * depth
                   + b"]" * depth + b"}")
    elif kind == 5:  # unknown model / wrong auth
        if rng.random() < 0.5:
            body["model"] = rng.choice(["gpt-4", "", "x" * 3000, "../../etc/passwd"])
        else:
            headers[0] = (b"authorization", rng.choice([b"Bearer nope", b"", b"Basic abc"]))
    elif kind == 6:  # other methods
        method = rng.choice(["PUT", "DELETE", "PATCH", "GET", "HEAD", "OPTIONS"])
    elif kind == 7:  # odd paths
        path = rng.choice(["/", "/v1", "/v1/", "/v1/completions/", "/v1/../health", "/%00",
                           "/v1/" + "a" * 5000, "/v1/thrift/config/x", "/metrics/../v1/models",
                           "/v1/models/" + MODEL, "/docs", "/v1/embeddings"])
    elif kind == 8 and chat:  # broken or many chat messages
        body["messages"] = rng.choice([
            [{"role": "user"}], [{"content": "x"}], [{}], [], "hello", [{"role": 5,
                                                                       "content": "x"}],
            [{"role": "user", "content": "m"}] * 500,
            [{"role": "user", "content": [{"type": "image_url"}]}]])
    elif kind == 9:  # not JSON
        content = rng.choice([b"", b"{", b"null", b"[]", b'"x"', b"\xff\xfe", b"{" * 50,
                              b'{"model": "' + MODEL.encode() + b'", "prompt": "ab",}'])
        if rng.random() < 0.3:
            headers[1] = (b"content-type", b"text/plain")
    else:  # valid, with a valid budget somewhere
        b = rng.choice([0, 0.05, 0.25, 0.5, 0.9])
        if rng.random() < 0.5:
            headers.append((b"x-fp16-budget", str(b).encode()))
        else:
            body["fp16_budget"] = b
    if content is None:
        content = json.dumps(body).encode()
    return {"method": method, "path": path, "headers": headers, "content": content, "kind": kind}


async def _fuzz(url: str, cases: list[dict], concurrency: int = 8) -> list[tuple[int, dict]]:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT, limits=limits) as client:
        async def one(case):
            async with sem:
                try:
                    r = await client.request(case["method"], case["path"],
                                             headers=case["headers"], content=case["content"])
                    return r.status_code, case
                except httpx.TimeoutException:
                    return -1, case  # a hang
                except httpx.LocalProtocolError:
                    return 0, case  # the client itself refuses to send it (h11)
        return await asyncio.gather(*(one(c) for c in cases))


async def _streams(url: str, n: int, drop: bool = False) -> list:
    """``n`` concurrent streaming completions with mixed budgets (header); each returns
    (status, applied header, chunks, finish_reason) — or, with ``drop``, hangs up after the
    first event."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT,
                                 limits=httpx.Limits(max_connections=n)) as client:
        async def one(i):
            budget = ["0", "0.05", "0.25", "0.5", "0.9"][i % 5]
            body = {"model": MODEL, "prompt": f"request {i}: def f(", "max_tokens": 8,
                    "stream": True, "ignore_eos": True, "temperature": 0}
            async with client.stream("POST", "/v1/completions", json=body,
                                     headers={**AUTH, "X-FP16-Budget": budget}) as r:
                chunks, finish = 0, None
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunks += 1
                    if drop:
                        break
                    finish = json.loads(line[6:])["choices"][0].get("finish_reason") or finish
                return r.status_code, r.headers.get("x-fp16-budget-applied"), chunks, finish
        return await asyncio.gather(*(one(i) for i in range(n)))


def _reference(srv: Server) -> list[int]:
    import httpx

    r = httpx.post(srv.url + "/v1/completions", headers=AUTH, timeout=TIMEOUT, json={
        "model": MODEL, "prompt": "import os\nimport sys\n\n\ndef main(", "max_tokens": 24,
        "temperature": 0, "logprobs": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["tokens"]


def _expected_blocks(prompt_len: int, new_tokens: int, budget: float) -> tuple[int, int]:
    """FP16 and candidate query-key blocks the builder counts for one request alone: the
    prefill of the whole prompt, then one decode step per further token."""
    from thrift_vllm.backend import stats
    from thrift_vllm.backend.config import ThriftBackendConfig
    from thrift_vllm.selection import BlockGrid, budget_to_k

    bs = ThriftBackendConfig().block_size
    f = a = 0
    for sq, skv in [(prompt_len, prompt_len)] + [(1, prompt_len + i)
                                                 for i in range(1, new_tokens)]:
        grid = BlockGrid(seq_len_q=sq, seq_len_kv=skv, block_size=bs, causal=True)
        x, y = stats.step_blocks(grid, budget_to_k(budget, grid))
        f, a = f + x, a + y
    return f, a


@pytest.mark.slow
def test_server_stress(needs_vllm, tmp_path):
    import httpx

    with _server(tmp_path, "--max-num-seqs", "32", "--warmup-tokens", "0") as srv:
        timings = {}
        try:
            t0 = time.monotonic()
            ref = _reference(srv)
            # concurrency: mixed budgets, every stream finishes, the header says what applied
            t = time.monotonic()
            res = asyncio.run(_streams(srv.url, 96))
            timings["96 streams"] = time.monotonic() - t
            applied = {"0": "0.0", "0.05": "0.05", "0.25": "0.25", "0.5": "0.5", "0.9": "0.5"}
            for i, (status, hdr, chunks, finish) in enumerate(res):
                assert status == 200 and finish == "length" and chunks >= 1, res[i]
                assert hdr == applied[["0", "0.05", "0.25", "0.5", "0.9"][i % 5]], res[i]
            # fuzz: seeded, no 5xx, no hang
            rng = random.Random(20261207)
            cases = [_fuzz_case(rng, i) for i in range(600)]
            t = time.monotonic()
            out = asyncio.run(_fuzz(srv.url, cases))
            timings["600 fuzz"] = time.monotonic() - t
            codes: dict[int, int] = {}
            for status, _case in out:
                codes[status] = codes.get(status, 0) + 1
            bad = [(s, c["method"], c["path"][:60], c["content"][:120]) for s, c in out
                   if s < 0 or s >= 500]
            assert not bad, bad[:10]
            assert codes.get(200, 0) > 20 and codes.get(400, 0) > 100, codes
            assert httpx.get(srv.url + "/health", timeout=5).status_code == 200
            # dropped streams: 24 hang up after their first event
            t = time.monotonic()
            dropped = asyncio.run(_streams(srv.url, 24, drop=True))
            timings["24 dropped"] = time.monotonic() - t
            assert all(s == 200 for s, *_ in dropped), dropped
            assert _reference(srv) == ref  # same greedy completion after all of it
            assert httpx.get(srv.url + "/health", timeout=5).status_code == 200

            # realised FP16 share per budget bucket: plausible under the load
            text = httpx.get(srv.url + "/metrics", headers=AUTH, timeout=10).text
            f16 = _series(text, "thrift_vllm_fp16_blocks_total")
            att = _series(text, "thrift_vllm_attention_blocks_total")
            share = {k: f16.get(k, 0) / v for k, v in att.items() if v}
            assert share['budget_bucket="0.0"'] == 0.0, share
            assert 0 < share['budget_bucket="0.25"'] <= share['budget_bucket="0.5"'] <= 1, share
            assert 'budget_bucket="1.0"' not in att  # 0.9 was clamped to the cap before the engine

            # X-FP16-Budget-Applied == what the attention layers used, to the block
            prompt = "The applied budget is the one the attention used. " * 4
            r = httpx.post(srv.url + "/v1/completions", timeout=TIMEOUT, json={
                "model": MODEL, "prompt": prompt, "max_tokens": 6, "temperature": 0,
                "ignore_eos": True, "cache_salt": f"exact-{time.time()}"},
                headers={**AUTH, "X-FP16-Budget": "0.9"})
            assert r.status_code == 200 and r.headers["x-fp16-budget-applied"] == "0.5"
            time.sleep(1.0)  # the engine's step counters reach the front end's /metrics
            text = httpx.get(srv.url + "/metrics", headers=AUTH, timeout=10).text
            f16b = _series(text, "thrift_vllm_fp16_blocks_total")
            attb = _series(text, "thrift_vllm_attention_blocks_total")
            delta = {k: (f16b.get(k, 0) - f16.get(k, 0), attb[k] - att.get(k, 0)) for k in attb
                     if attb[k] != att.get(k, 0)}
            want = _expected_blocks(r.json()["usage"]["prompt_tokens"], 6, 0.5)
            assert delta == {'budget_bucket="0.5"': want}, (delta, want)
            timings["total"] = time.monotonic() - t0
            print(f"\nstress: {len(cases)} fuzz requests, codes {dict(sorted(codes.items()))}; "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
        finally:
            if srv.proc.poll() is None:
                srv.proc.send_signal(signal.SIGTERM)
                try:
                    rc = srv.proc.wait(60)
                except subprocess.TimeoutExpired:
                    rc = None
            else:
                rc = "exited early"
        assert rc == 0, f"SIGTERM: {rc}\n{srv.tail()}"
        with pytest.raises(ProcessLookupError):  # the engine core went with it
            for _ in range(40):
                os.killpg(srv.proc.pid, 0)
                time.sleep(0.5)


def _dockerfile_healthcheck() -> list[str]:
    text = (ROOT / "Dockerfile").read_text()
    m = re.search(r"HEALTHCHECK[^\n]*\\\n\s*CMD\s+(\[.*\])", text)
    assert m, "no HEALTHCHECK CMD in the Dockerfile"
    return json.loads(m.group(1))


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=,ppid=,args=", "-g", str(pid)], capture_output=True,
                         text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines()
            if "EngineCore" in line and int(line.split()[0]) != pid]


@pytest.mark.slow
def test_server_kv_exhaustion_then_engine_death(needs_vllm, tmp_path):
    import httpx

    # 6 pages of 128 tokens: one 512-token request fits (vLLM refuses to start otherwise)
    with _server(tmp_path, "--num-gpu-blocks-override", "6", "--max-num-seqs", "8",
                 "--warmup-tokens", "0") as srv:
        health = _dockerfile_healthcheck()
        env = dict(os.environ, PORT=str(srv.port))
        assert subprocess.run(health, env=env, timeout=30).returncode == 0

        # 6 requests of ~245 + 60 tokens at once (2 pages each at admission, a third while
        # decoding): the 5 usable pages hold 2, which then outgrow them -> queued / preempted
        async def long_ones():
            async with httpx.AsyncClient(base_url=srv.url, timeout=240) as client:
                async def one(i):
                    r = await client.post("/v1/completions", headers=AUTH, json={
                        "model": MODEL, "prompt": f"{i} " + "0123456789" * 24, "max_tokens": 60,
                        "ignore_eos": True, "temperature": 0})
                    return r.status_code, r.json()
                return await asyncio.gather(*(one(i) for i in range(6)))

        t = time.monotonic()
        res = asyncio.run(long_ones())
        took = time.monotonic() - t
        for status, body in res:
            assert status == 200, body
            assert body["usage"]["completion_tokens"] == 60
        text = httpx.get(srv.url + "/metrics", headers=AUTH, timeout=10).text
        preempted = sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines()
                        if x.startswith("vllm:num_preemptions_total"))
        # a prompt longer than the model's limit (which the pool covers): a 400 naming it
        r = httpx.post(srv.url + "/v1/completions", headers=AUTH, timeout=TIMEOUT, json={
            "model": MODEL, "prompt": "x" * 700, "max_tokens": 4})
        assert r.status_code == 400, r.text
        assert "512" in r.json()["error"]["message"], r.text
        # prompt + max_tokens beyond it: vLLM shortens max_tokens to what fits, and completes
        r = httpx.post(srv.url + "/v1/completions", headers=AUTH, timeout=TIMEOUT, json={
            "model": MODEL, "prompt": "y" * 400, "max_tokens": 300, "ignore_eos": True})
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] == 512, usage
        print(f"\nKV exhaustion: 6 x ~305 tokens on a 768-token pool in {took:.1f} s, "
              f"{preempted:.0f} preemptions")

        # engine death: kill the engine core under an open stream
        async def during_death():
            async with httpx.AsyncClient(base_url=srv.url, timeout=TIMEOUT) as client:
                body = {"model": MODEL, "prompt": "die", "max_tokens": 400, "stream": True,
                        "ignore_eos": True}
                async with client.stream("POST", "/v1/completions", json=body,
                                         headers=AUTH) as r:
                    lines = []
                    async for line in r.aiter_lines():
                        lines.append(line)
                        if len(lines) == 2:
                            for pid in _children(srv.proc.pid):
                                os.kill(pid, signal.SIGKILL)
                    return r.status_code, lines
                # (the stream must end: a hang is a TimeoutException, failing the test)

        cores = _children(srv.proc.pid)
        assert cores, "no EngineCore process found"
        status, lines = asyncio.run(during_death())
        events = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
        errors = [e["error"] for e in events if "error" in e]
        assert status >= 500 or errors, (status, lines[-3:])
        if errors:
            assert errors[-1]["code"] >= 500, errors
        # a new request: a clean 5xx JSON error or a refused connection, never a hang
        try:
            r = httpx.post(srv.url + "/v1/completions", headers=AUTH, timeout=TIMEOUT,
                           json={"model": MODEL, "prompt": "x", "max_tokens": 2})
            assert r.status_code >= 500 and "error" in r.json(), r.text
            after = f"{r.status_code} {r.text[:160]}"
        except httpx.TransportError as e:
            after = f"connection refused ({type(e).__name__}): the server shut itself down"
        print(f"engine death: open stream status {status}, last events {lines[-2:]}; "
              f"next request: {after}")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # /health stops answering 200
            try:
                if httpx.get(srv.url + "/health", timeout=5).status_code != 200:
                    break
            except httpx.TransportError:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"/health still 200 30 s after the engine died:\n{srv.tail()}")
        assert subprocess.run(health, env=env, timeout=30,
                              capture_output=True).returncode != 0, shlex.join(health)
