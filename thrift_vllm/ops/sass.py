"""SASS tools for the ahead-of-time compiles (``ops.aot``, ``ops.aot_paged``): the cuobjdump in
Triton's wheel on a cubin, resource usage (registers, spills), instruction lines. No GPU needed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile


def toolchain_problem() -> str | None:
    """Why AOT compilation for NVIDIA targets cannot run here (None when it can)."""
    try:
        import triton  # noqa: F401
        from triton.backends import backends
    except Exception as e:  # pragma: no cover - depends on the installation
        return f"triton unavailable: {e}"
    if "nvidia" not in backends:
        return f"Triton has no CUDA backend (backends: {sorted(backends)})"
    if cuobjdump_path() is None:
        return "cuobjdump not found (neither in Triton's wheel nor on PATH)"
    return None


def cuobjdump_path() -> str | None:
    """The cuobjdump Triton uses (TRITON_CUOBJDUMP_PATH or the one in its wheel), else PATH's."""
    try:
        from triton import knobs

        path = knobs.nvidia.cuobjdump.path
        if path and os.path.exists(path):
            return path
    except Exception:
        pass
    return shutil.which("cuobjdump")


def cuobjdump(cubin: bytes, flag: str = "--dump-sass") -> str:
    """``cuobjdump <flag>`` of a cubin (``--dump-sass``, ``--dump-resource-usage``, ...)."""
    tool = cuobjdump_path()
    if tool is None:
        raise FileNotFoundError("cuobjdump not found")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([tool, flag, path], check=True, capture_output=True, text=True).stdout


def sass(cubin: bytes) -> str:
    """``cuobjdump --dump-sass`` of a cubin."""
    return cuobjdump(cubin, "--dump-sass")


def resource_usage(cubin: bytes) -> dict[str, int]:
    """The kernel's REG / STACK (register spills show up there) / SHARED / LOCAL bytes, as
    cuobjdump reports them (SHARED is the static part; Triton's is dynamic: see metadata)."""
    text = cuobjdump(cubin, "--dump-resource-usage")
    m = re.search(r"Function [^:]+:\s*\n\s*(.*)", text)
    pairs = re.findall(r"([A-Z]+):(\d+)", m.group(1)) if m else []
    return {k.lower(): int(v) for k, v in pairs if k in ("REG", "STACK", "SHARED", "LOCAL")}


def sass_instructions(text: str) -> list[str]:
    """The instruction lines of a cuobjdump SASS listing, without addresses and encodings."""
    out = []
    for line in text.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s*(.*?)\s*;", line)
        if m:
            out.append(" ".join(m.group(1).split()))
    return out


def loop_bodies(text: str) -> list[list[str]]:
    """Instruction lists of the loops of a cuobjdump SASS listing, largest first: a loop is a
    backward branch (``BRA`` to a lower address) and the instructions from its target to it.
    Nested loops are reported both inside their outer loop and on their own."""
    addr, ins = [], []
    for line in text.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]+)\*/\s*(.*?)\s*;", line)
        if m:
            addr.append(int(m.group(1), 16))
            ins.append(" ".join(m.group(2).split()))
    loops = []
    for i, text_i in enumerate(ins):
        m = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", text_i)
        if m and int(m.group(1), 16) < addr[i]:
            start = addr.index(int(m.group(1), 16)) if int(m.group(1), 16) in addr else None
            if start is not None:
                loops.append(ins[start:i + 1])
    return sorted(loops, key=len, reverse=True)


def opcode_counts(instructions: list[str]) -> dict[str, int]:
    """Opcode (first word after an optional ``@P`` predicate, modifiers dropped) -> count."""
    out: dict[str, int] = {}
    for s in instructions:
        words = s.split()
        op = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
        op = op.split(".")[0]
        out[op] = out.get(op, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))
