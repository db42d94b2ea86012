"""Ahead-of-time compile of the paged kernels (KV write, paged select/decode/reduce), no GPU.

Every Triton launch of ``write_kv_triton`` and ``paged_decode_triton`` on meta tensors is
recorded and compiled for ``GPUTarget("cuda", arch, 32)`` with the JIT's specialisation (as
``thrift_vllm.ops.aot.compile_launch``). Run without the interpreter::

    env -u TRITON_INTERPRET python -m thrift_vllm.ops.aot_paged --arch 90 100 120

Prints one JSON line per (arch, layout, kernel): registers, spills (STACK/LOCAL bytes), MMA ops.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
from unittest import mock


def capture(kv_layout: str, fmt: str, selection: str, dtype: str = "fp16", D: int = 128,
            B: int = 16, Hq: int = 32, Hkv: int = 8, P: int = 64, U: int = 64,
            max_pages: int = 512, native: bool = False, math: str = "fp4",
            launch: dict | None = None):
    """[(JITFunction, bound args, options)] of the write and decode launches on meta tensors
    (``native``: the decode's FP4 dots on the block-scaled MMA, as on sm_120; ``math`` /
    ``launch``: ``paged_decode_triton``'s)."""
    import torch
    from triton.runtime.jit import JITFunction

    from thrift_vllm.kv_layout import KVLayout
    from thrift_vllm.ops.kv_write import write_kv_triton
    from thrift_vllm.ops.paged_attention import paged_decode_triton

    dt = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    lay = KVLayout(kv_layout, D, P, U, fmt, selection, dt)
    meta = dict(device="meta")
    cache = torch.empty(B * max_pages, Hkv, P, lay.bytes_per_head_token, dtype=torch.uint8,
                        **meta)
    q = torch.empty(B, Hq, D, dtype=dt, **meta)
    k = torch.empty(B, Hkv, D, dtype=dt, **meta)
    i32 = dict(dtype=torch.int32, **meta)
    calls = []

    def record(self, *args, grid, warmup, **kw):
        calls.append((self, args, kw))

    with mock.patch.object(JITFunction, "run", record):
        write_kv_triton(k, k, cache, torch.empty(B, dtype=torch.int64, **meta), lay)
        paged_decode_triton(lay, cache, q, k, k, block_table=torch.empty(B, max_pages, **i32),
                            seq_lens=torch.empty(B, **i32), num_fp16_blocks=torch.empty(B, **i32),
                            scale=D**-0.5, max_num_fp16_blocks=64,
                            native=None if math == "fp16" else native, math=math, launch=launch)
    out = []
    for fn, args, kw in calls:
        bound = dict(zip(fn.arg_names, args, strict=False))
        options = {}
        for name, val in kw.items():
            (bound if name in fn.arg_names else options)[name] = val
        for p in fn.params:
            name = fn.arg_names[p.num]
            if name not in bound and p.default is not inspect.Parameter.empty:
                bound[name] = p.default
        out.append((fn, bound, options))
    return out


def main(argv: list[str] | None = None) -> int:
    from thrift_vllm.ops.aot import _check_not_interpreted, compile_launch
    from thrift_vllm.ops.sass import loop_bodies, opcode_counts, resource_usage, sass

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 100, 120])
    ap.add_argument("--dtype", default="fp16", choices=("fp16", "bf16"))
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--decode-math", default="fp4", choices=("fp4", "fp16"))
    ap.add_argument("--launch", default="{}",
                    help='JSON launch overrides of the decode, e.g. \'{"units_per_iter": 2}\'')
    ap.add_argument("--layouts", nargs="+", default=["auto", "nvfp4", "nvfp4-mxfp4"],
                    choices=("auto", "nvfp4", "nvfp4-mxfp4"))
    ap.add_argument("--loops", action="store_true",
                    help="also count the SASS instructions of the decode kernel's loops")
    a = ap.parse_args(argv)
    _check_not_interpreted()
    launch = json.loads(a.launch)
    all_cases = {"auto": ("auto", "nvfp4", "block_mean"), "nvfp4": ("nvfp4", "nvfp4", "quest"),
                 "nvfp4-mxfp4": ("nvfp4", "mxfp4", "local")}
    cases = [all_cases[c] for c in a.layouts]
    failed = 0
    for arch in a.arch:
        for kvl, fmt, sel in cases:
            # the device rule of ops.paged_attention.native_fp4_decode, by arch
            for fn, args, options in capture(kvl, fmt, sel, a.dtype, a.head_dim,
                                             native=arch == 120, math=a.decode_math,
                                             launch=launch):
                row = dict(arch=arch, kv_layout=kvl, fmt=fmt, selection=sel, kernel=fn.__name__)
                try:
                    ck = compile_launch(fn, args, options, arch)[0]
                    row.update(resource_usage(ck.asm["cubin"]))
                    mma = sorted(set(re.findall(r"\b(?:mma\.sync|wgmma\.mma_async)[\w.:]*",
                                                ck.asm["ptx"])))
                    row["mma"] = mma[:4]
                    row["block_scaled_mma"] = sum("block_scale" in m for m in mma)
                    if a.loops and "decode" in fn.__name__:
                        loops = loop_bodies(sass(ck.asm["cubin"]))
                        row["loops"] = [len(lp) for lp in loops[:4]]
                        if loops:
                            top = opcode_counts(loops[0])
                            row["loop0_ops"] = top
                    row["ok"] = True
                except Exception as e:  # report and go on: one line per case
                    row.update(ok=False, error=f"{type(e).__name__}: {str(e)[-400:]}")
                    failed += 1
                print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
