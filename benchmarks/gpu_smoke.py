"""Compile-and-run smoke test of every kernel variant on a GPU; prints the tail of any error."""

import torch

from thrift_vllm.ops.attention import thrift_attention_triton


def main() -> None:
    import sys

    global FMTS, MATHS, NSQ
    FMTS = sys.argv[1].split(",") if len(sys.argv) > 1 else ("nvfp4", "mxfp4")
    MATHS = sys.argv[2].split(",") if len(sys.argv) > 2 else ("bf16", "fp8")
    NSQ = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    for Sq in (200, 1)[:NSQ]:
        for mm in MATHS:
            for fmt in FMTS:
                q = torch.randn(1, 8, Sq, 128, device="cuda", dtype=torch.bfloat16)
                k = torch.randn(1, 2, 200, 128, device="cuda", dtype=torch.bfloat16)
                v = torch.randn_like(k)
                try:
                    thrift_attention_triton(q, k, v, causal=True, fp16_budget=0.1,
                                            selection="block_mean", quant_format=fmt,
                                            block_size=64, sm_scale=None, bulk_math=mm)
                    torch.cuda.synchronize()
                    print("OK", Sq, mm, fmt, flush=True)
                except Exception as exc:  # report the compiler's own words
                    cause = exc
                    while cause.__cause__ is not None:
                        cause = cause.__cause__
                    print("FAIL", Sq, mm, fmt, str(cause)[-1500:], flush=True)


if __name__ == "__main__":
    main()
