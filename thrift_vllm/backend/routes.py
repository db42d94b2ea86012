"""Which arithmetic an engine runs on its device: the decode math and the prefill route that the
config's ``auto`` values resolve to (policy in ``config``: ``resolve_decode_math``,
``resolve_prefill``, ``budget_effect``), for the metadata builder and ``thrift-vllm serve``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from thrift_vllm.backend.compat import flash_attn_varlen
from thrift_vllm.backend.config import ThriftBackendConfig, budget_effect
from thrift_vllm.ops.paged_attention import native_fp4_decode


@dataclass(frozen=True)
class Routes:
    decode_math: str  # "fp4" | "fp16"
    prefill: str  # "flash" | "thrift"
    flash_problem: str | None  # why the flash prefill cannot run here (None: it can)
    varlen_attn: Callable | None  # vLLM's FlashAttention-3 varlen function when prefill is flash

    def budget_effect(self, kv_layout: str) -> tuple[bool, str]:
        return budget_effect(kv_layout, self.decode_math, self.prefill)


def resolve_routes(config: ThriftBackendConfig, device: torch.device | str) -> Routes:
    """The routes of an engine on ``device``; ValueError when an explicit choice cannot run."""
    device = torch.device(device)
    triton = config.uses_triton(device.type)
    decode_math = config.resolve_decode_math(triton and native_fp4_decode(device))
    varlen, why = (flash_attn_varlen(device.type) if triton
                   else (None, "the PyTorch path runs (impl torch, or a CPU device)"))
    prefill = config.resolve_prefill(why)
    return Routes(decode_math, prefill, why, varlen if prefill == "flash" else None)
