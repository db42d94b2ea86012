"""Compile-and-run smoke test of every kernel variant on a GPU; prints the tail of any error."""

import torch

from thrift_vllm.ops.attention import thrift_attention_triton


def main() -> None:
    for Sq in (200, 1):
        for mm in ("bf16", "fp8"):
            for fmt in ("nvfp4", "mxfp4"):
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
                    print("FAIL", Sq, mm, fmt, str(exc)[-1500:], flush=True)


if __name__ == "__main__":
    main()
