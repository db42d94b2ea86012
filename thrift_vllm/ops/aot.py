"""Ahead-of-time compilation of the ThriftAttention kernels for a chosen GPU target, no GPU needed.

Used by CI (``tests/test_blackwell_aot.py``) to check that the kernels lower to the native
block-scaled tensor-core instructions on Blackwell (``tcgen05.mma ... .block_scale`` on sm_100,
``mma.sync ... .block_scale`` / ``OMMA.SF`` on sm_120) and to wgmma on Hopper. Compilation goes
through ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``. The arguments are
the launcher's own: ``thrift_vllm.ops.attention.thrift_attention_triton`` runs on meta tensors
with every Triton launch recorded instead of executed, and the prefill/decode launch is
specialised as the JIT would (see :func:`compile_kernel`), so the test follows the launcher's
block sizes, constexprs and num_warps as they change. The cubin is disassembled with the
``cuobjdump`` in Triton's wheel.

The kernels must be real ``triton.JITFunction`` objects, so run this with ``TRITON_INTERPRET``
unset (``tests/conftest.py`` sets it on CPU machines), e.g. in a subprocess::

    env -u TRITON_INTERPRET python -m thrift_vllm.ops.aot --kernel prefill --fmt nvfp4 --arch 100
    echo '[{"kernel": "decode", "arch": 120}]' | env -u TRITON_INTERPRET \\
        python -m thrift_vllm.ops.aot --batch

The first prints one JSON object (see :func:`inspect_kernel`), the second a JSON list of them.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, fields

from thrift_vllm.ops.sass import resource_usage, sass, sass_instructions

# Kept equal to thrift_vllm.formats.GROUP_SIZE (not imported: that module pulls in torch).
GROUP_SIZE = {"nvfp4": 16, "mxfp4": 32}
KERNELS = ("prefill", "decode")
DTYPES = ("fp16", "bf16")

# Tensor-core instructions. PTX: the mnemonic with all its modifiers; SASS: any *MMA opcode
# (HMMA, HGMMA, OMMA, QMMA, UTCHMMA, UTCOMMA, ...) with its modifiers.
PTX_MMA = re.compile(r"^\s*(?:@!?%p\d+\s+)?((?:tcgen05\.mma|mma\.sync|wgmma\.mma_async)[\w.:]*)")
SASS_MMA = re.compile(r"\b([A-Z]*MMA(?:\.\w+)*)")
# Ops counted in the Triton IRs: TTIR before layout assignment, TTGIR after (a tt.dot_scaled
# that survives on sm_120, or becomes ttng.tc_gen5_mma_scaled on sm_100, is native; one that
# was decomposed shows up as tt.fp_to_fp upcasts feeding a plain tt.dot / ttng.tc_gen5_mma).
IR_OPS = re.compile(
    r"\b(tt\.dot_scaled|tt\.dot|ttng\.tc_gen5_mma_scaled|ttng\.tc_gen5_mma|"
    r"ttng\.warp_group_dot|tt\.fp_to_fp)\b"
)

# The block-scaled FP4 MMA each target must use for each format: (PTX mnemonic, SASS opcode).
BLOCK_SCALED = {
    (100, "nvfp4"): (
        re.compile(r"^tcgen05\.mma\.cta_group::[12]\.kind::mxf4nvf4\.block_scale\.block16$"),
        re.compile(r"^UTCOMMA(?:\.\w+)*\.4X$"),
    ),
    (100, "mxfp4"): (
        re.compile(r"^tcgen05\.mma\.cta_group::[12]\.kind::mxf4\.block_scale\.block32$"),
        re.compile(r"^UTCOMMA(?:\.(?!4X)\w+)*$"),
    ),
    (120, "nvfp4"): (
        re.compile(
            r"^mma\.sync\.aligned\.m16n8k64\.row\.col\.kind::mxf4nvf4\.block_scale"
            r"\.scale_vec::4X\.f32\.e2m1\.e2m1\.f32\.ue4m3$"
        ),
        re.compile(r"^OMMA\.SF\.16864\.F32\.E2M1\.E2M1\.UE4M3\.4X$"),
    ),
    (120, "mxfp4"): (
        re.compile(
            r"^mma\.sync\.aligned\.m16n8k64\.row\.col\.kind::mxf4nvf4\.block_scale"
            r"\.scale_vec::2X\.f32\.e2m1\.e2m1\.f32\.ue8m0$"
        ),
        re.compile(r"^OMMA\.SF\.16864\.F32\.E2M1\.E2M1\.E8$"),
    ),
}


# torch dtype name -> Triton pointer element type (as the JIT would specialise a tensor).
_TORCH_TO_TRITON = {
    "float16": "fp16",
    "bfloat16": "bf16",
    "float32": "fp32",
    "float64": "fp64",
    "uint8": "u8",
    "int8": "i8",
    "int16": "i16",
    "int32": "i32",
    "int64": "i64",
    "bool": "i1",
    "float8_e4m3fn": "fp8e4nv",
    "float8_e5m2": "fp8e5",
}


@dataclass(frozen=True)
class AotConfig:
    """One compilation: the kernel as ``thrift_vllm.ops.attention.thrift_attention_triton``
    launches it for q [batch, num_heads, seq_len (1 for decode), head_dim], k/v [batch,
    num_kv_heads, seq_len, head_dim] of ``dtype``, ``block`` (the API's block_size), ``k_sel``
    selected tiles per row and bulk_math ``fp4_math``. ``num_warps``/``num_stages`` override the
    prefill launch (None: the launcher's own choice; decode always uses its own)."""

    kernel: str = "prefill"
    fmt: str = "nvfp4"
    arch: int = 100
    head_dim: int = 128
    dtype: str = "fp16"
    fp4_math: str = "native"
    causal: bool = True
    block: int = 64
    num_warps: int | None = None
    num_stages: int | None = None
    batch: int = 2
    num_heads: int = 32
    num_kv_heads: int = 8
    seq_len: int = 4096
    k_sel: int = 7

    @classmethod
    def from_dict(cls, d: dict) -> AotConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown AotConfig fields {sorted(unknown)}")
        return cls(**d)


def _check_not_interpreted() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError(
            "TRITON_INTERPRET=1 turns @triton.jit kernels into interpreter objects; run the AOT "
            "compilation with it unset (e.g. `env -u TRITON_INTERPRET python -m "
            "thrift_vllm.ops.aot`)"
        )


def capture_launch(cfg: AotConfig):
    """Run ``thrift_attention_triton`` on meta tensors with every Triton launch recorded instead
    of run; return ``(kernel, args, options)`` of the prefill or decode kernel's launch: every
    argument by name (tensors are meta tensors) and the launch options (num_warps, ...)."""
    _check_not_interpreted()
    from unittest import mock

    import torch
    from triton.runtime.jit import JITFunction

    from thrift_vllm.ops import attention
    from thrift_vllm.selection import BlockGrid

    if cfg.kernel not in KERNELS or cfg.fmt not in GROUP_SIZE or cfg.dtype not in DTYPES:
        raise ValueError(f"bad config {cfg}")
    if cfg.kernel == "prefill":
        from thrift_vllm.kernels.prefill import _thrift_prefill_kernel as fn
    else:
        from thrift_vllm.kernels.decode import _thrift_decode_kernel as fn
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16}[cfg.dtype]
    B, Hq, Hkv, S, D = cfg.batch, cfg.num_heads, cfg.num_kv_heads, cfg.seq_len, cfg.head_dim
    Sq = S if cfg.kernel == "prefill" else 1
    q = torch.empty(B, Hq, Sq, D, dtype=dt, device="meta")
    k = torch.empty(B, Hkv, S, D, dtype=dt, device="meta")
    v = torch.empty(B, Hkv, S, D, dtype=dt, device="meta")
    grid = BlockGrid(Sq, S, cfg.block, cfg.causal)
    sel = torch.empty(B, Hq, grid.num_q_blocks, cfg.k_sel, dtype=torch.int32, device="meta")
    kwargs: dict = dict(
        causal=cfg.causal,
        fp16_budget=0.1,
        selection="mean",
        quant_format=cfg.fmt,
        block_size=cfg.block,
        sm_scale=None,
        bulk_math=cfg.fp4_math,
        sel=sel,
    )
    launch = {n: getattr(cfg, n) for n in ("num_warps", "num_stages")}
    launch = {n: val for n, val in launch.items() if val is not None}
    if launch:
        kwargs["launch"] = launch
    calls = []

    def record(self, *args, grid, warmup, **kw):
        calls.append((self, args, kw))

    with mock.patch.object(JITFunction, "run", record):
        attention.thrift_attention_triton(q, k, v, **kwargs)
    mine = [(a, kw) for f, a, kw in calls if f is fn]
    if len(mine) != 1:
        names = [f.__name__ for f, _, _ in calls]
        raise RuntimeError(f"expected one launch of {fn.__name__}, got launches of {names}")
    args, kw = mine[0]
    bound = dict(zip(fn.arg_names, args, strict=False))
    options = {}
    for name, val in kw.items():
        (bound if name in fn.arg_names else options)[name] = val
    for p in fn.params:
        if fn.arg_names[p.num] not in bound and p.default is not inspect.Parameter.empty:
            bound[fn.arg_names[p.num]] = p.default
    missing = [n for n in fn.arg_names if n not in bound]
    if missing:
        raise RuntimeError(f"launch of {fn.__name__} leaves {missing} unset")
    return fn, bound, options


def compile_launch(fn, args: dict, options: dict, arch: int):
    """triton.compile ``fn`` with the bound launch arguments ``args`` (name -> value) and
    ``options``, for GPUTarget("cuda", arch, 32). Returns ``(CompiledKernel, constexprs)``
    (the kernel's own constexpr parameters); ``.asm`` holds "ttir", "ttgir", "ptx", "cubin", ...

    Specialisation follows the JIT: tensors become pointers to their dtype, 16-byte aligned;
    integers equal to 1 become constants, multiples of 16 get divisibility hints; floats fp32."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget

    const_params = {fn.arg_names[p.num] for p in fn.params if p.is_constexpr}
    signature: dict[str, str] = {}
    constexprs: dict[str, object] = {}
    attrs: dict[tuple[int], list] = {}
    for i, name in enumerate(fn.arg_names):
        val = args[name]
        if name in const_params or val is None:
            signature[name], constexprs[name] = "constexpr", val
        elif isinstance(val, torch.Tensor):
            signature[name] = "*" + _TORCH_TO_TRITON[str(val.dtype).removeprefix("torch.")]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(val, bool):
            signature[name] = "i1"
        elif isinstance(val, float):
            signature[name] = "fp32"
        elif not isinstance(val, int):
            raise TypeError(f"{fn.__name__} argument {name}={val!r}")
        elif val == 1:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32" if -(2**31) <= val < 2**31 else "i64"
            if val % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    return ck, {n: v for n, v in constexprs.items() if n in const_params}


def compile_kernel(cfg: AotConfig):
    """:func:`compile_launch` on the kernel of ``cfg``, launched as the launcher would.
    Returns ``(CompiledKernel, constexprs, options)``."""
    fn, args, options = capture_launch(cfg)
    ck, shown = compile_launch(fn, args, options, cfg.arch)
    return ck, shown, options


def _collect(lines: list[str], pattern: re.Pattern) -> dict[str, dict]:
    """{mnemonic: {"count": n, "line": first line using it}} for lines matching ``pattern``."""
    found: dict[str, dict] = {}
    for line in lines:
        m = pattern.search(line)
        if m:
            entry = found.setdefault(m.group(1), {"count": 0, "line": " ".join(line.split())})
            entry["count"] += 1
    return found


def _error_text(e: BaseException) -> str:
    """The messages of an exception and its causes, innermost last (Triton's CompilationError
    wraps the failing construct's error in a chain of call sites)."""
    parts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        parts.append(f"{type(e).__name__}: {e}".strip())
        e = e.__cause__ or e.__context__
    return "\n--- caused by ---\n".join(parts)


def block_scaled_matches(res: dict) -> tuple[list[str], list[str]]:
    """The PTX and SASS lines of ``res`` (an :func:`inspect_kernel` result) that are the
    block-scaled FP4 MMA expected for its target and format."""
    cfg = res["config"]
    ptx_re, sass_re = BLOCK_SCALED[(cfg["arch"], cfg["fmt"])]
    ptx = [v["line"] for k, v in res.get("ptx_mma", {}).items() if ptx_re.match(k)]
    sas = [v["line"] for k, v in res.get("sass_mma", {}).items() if sass_re.match(k)]
    return ptx, sas


def inspect_kernel(cfg: AotConfig) -> dict:
    """Compile ``cfg`` and report what it lowered to::

    {"config": {...}, "ok": bool, "error": str | None, "target": "sm_100a",
     "ttir_ops": {op: n}, "ttgir_ops": {op: n},
     "ptx_mma": {mnemonic: {"count", "line"}}, "sass_mma": {opcode: {"count", "line"}},
     "resources": {"reg", "stack", "shared", "local"}, "dynamic_shared": int}
    """
    out: dict = {"config": asdict(cfg), "ok": False, "error": None}
    try:
        ck, constexprs, options = compile_kernel(cfg)
        sass_text = sass(ck.asm["cubin"])
    except Exception as e:  # the test prints the compiler's message
        out["error"] = _error_text(e)
        return out
    ptx = ck.asm["ptx"]
    m = re.search(r"^\.target\s+(\S+)", ptx, re.M)
    out["target"] = m.group(1) if m else None
    for key in ("ttir", "ttgir"):
        out[f"{key}_ops"] = dict(collections.Counter(IR_OPS.findall(ck.asm[key])))
    out["constexprs"] = {k: v for k, v in constexprs.items() if isinstance(v, (int, str))}
    out["options"] = options
    out["ptx_mma"] = _collect(ptx.splitlines(), PTX_MMA)
    out["sass_mma"] = _collect(sass_instructions(sass_text), SASS_MMA)
    out["resources"] = resource_usage(ck.asm["cubin"])
    out["dynamic_shared"] = getattr(ck.metadata, "shared", None)
    out["ok"] = True
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument(
        "--batch",
        action="store_true",
        help="read a JSON list of AotConfig dicts on stdin, print a JSON list",
    )
    p.add_argument("--kernel", choices=KERNELS, default="prefill")
    p.add_argument("--fmt", choices=tuple(GROUP_SIZE), default="nvfp4")
    p.add_argument("--arch", type=int, default=100, help="compute capability: 90, 100, 120, ...")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=DTYPES, default="fp16")
    p.add_argument("--fp4-math", default="native", help="bulk_math: native, bf16, fp8")
    p.add_argument("--block", type=int, default=64, help="block_size")
    p.add_argument("--heads", type=int, default=32, help="query heads")
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--no-causal", action="store_true")
    p.add_argument("--num-warps", type=int, help="prefill launch override")
    p.add_argument("--num-stages", type=int, help="prefill launch override")
    p.add_argument("--dump", metavar="DIR", help="also write the PTX and SASS there")
    a = p.parse_args(argv)
    if a.batch:
        results = [inspect_kernel(AotConfig.from_dict(d)) for d in json.load(sys.stdin)]
        json.dump(results, sys.stdout)
        sys.stdout.write("\n")
        return 0
    cfg = AotConfig(
        kernel=a.kernel,
        fmt=a.fmt,
        arch=a.arch,
        head_dim=a.head_dim,
        dtype=a.dtype,
        fp4_math=a.fp4_math,
        causal=not a.no_causal,
        block=a.block,
        num_warps=a.num_warps,
        num_stages=a.num_stages,
        num_heads=a.heads,
        num_kv_heads=a.kv_heads,
        seq_len=a.seq_len,
    )
    res = inspect_kernel(cfg)
    if a.dump and res["ok"]:
        ck = compile_kernel(cfg)[0]  # a Triton cache hit
        os.makedirs(a.dump, exist_ok=True)
        stem = os.path.join(a.dump, f"{cfg.kernel}_{cfg.fmt}_sm{cfg.arch}")
        with open(stem + ".ptx", "w") as f:
            f.write(ck.asm["ptx"])
        with open(stem + ".sass", "w") as f:
            f.write(sass(ck.asm["cubin"]))
    json.dump(res, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
