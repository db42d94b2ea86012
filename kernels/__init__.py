"""Triton kernels only (`@triton.jit` code). Installed as `thrift_vllm.kernels`."""
