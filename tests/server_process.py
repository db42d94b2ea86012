"""One ``thrift-vllm serve`` process for the HTTP tests (tests/test_server.py,
tests/test_server_security.py): the embedded model, CPU, ``--max-model-len 512``, eager, a free
port, a temporary cwd; started, polled on ``/health`` and, at the end, terminated with its
process group (the engine core)."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


@functools.cache
def vllm_import_error() -> str | None:
    try:
        import vllm  # noqa: F401
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


needs_vllm = pytest.mark.skipif(vllm_import_error() is not None,
                                reason=f"import vllm failed: {vllm_import_error()}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc, port, log):
        self.proc, self.port, self.log = proc, port, log
        self.url = f"http://127.0.0.1:{port}"

    def tail(self, n=60) -> str:
        return "\n".join(Path(self.log).read_text(errors="replace").splitlines()[-n:])


@contextlib.contextmanager
def start_server(tmp: Path, args: list[str], env: dict[str, str] | None = None,
                 timeout: float = 240) -> Iterator[Server]:
    """``thrift-vllm serve`` with the common CPU arguments plus ``args``; ``env`` is added to the
    environment (``VLLM_API_KEY`` is removed unless given there)."""
    import httpx

    log = tmp / "server.log"
    port = free_port()
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1",
                    VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
    full_env.pop("VLLM_API_KEY", None)
    full_env.update(env or {})
    cmd = [sys.executable, "-m", "thrift_vllm.server.cli", "serve", "--host", "127.0.0.1",
           "--port", str(port), "--max-model-len", "512", "--enforce-eager", *args]
    # A temporary cwd, so a stale egg-info in the checkout cannot hide the entry points.
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=tmp, env=full_env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    srv = Server(proc, port, log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{srv.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(srv.url + "/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy after {timeout} s:\n{srv.tail()}")
            time.sleep(1)
        yield srv
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # the engine core, if anything is left
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
