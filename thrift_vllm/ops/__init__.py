"""Host wrappers: validate, allocate and launch the Triton kernels."""
