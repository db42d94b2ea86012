"""ThriftAttention as a vLLM attention backend (registered as ``AttentionBackendEnum.CUSTOM``).

Shape of the module follows vLLM's own backends (``vllm/v1/attention/backends/cpu_attn.py``):
``ThriftAttentionMetadata`` (per batch) <- ``ThriftAttentionMetadataBuilder`` (once per step) ->
``ThriftAttentionBackend`` (declarative capabilities) -> ``ThriftAttentionImpl`` (per layer).

KV cache layout (kv cache dtype "auto"): vLLM's ordinary paged K/V pages in the model dtype. The
per-layer cache is ``[num_blocks, num_kv_heads, page_size, 2 * head_size]`` (logical
``[B, H, N, C]``, layout LBHNC); in each row the first ``head_size`` values are K and the next
``head_size`` are V. The FP4 copies of K/V and the per-block key summaries (block means, QUEST
min/max) that a kernel reading FP4 straight from the cache needs are the next step; today the
operator quantises the gathered K/V itself on every call.

Forward: for each sequence, gather its K/V from the pages through its block table and call
``thrift_vllm.attention`` on its query chunk (``Sq`` = query length, ``Skv`` = sequence length,
bottom-right causal), so prefill, chunked prefill, decode and mixed batches are one code path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

import thrift_vllm
from thrift_vllm.backend import request_budget, stats
from thrift_vllm.backend.compat import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionSpec,
    AttentionType,
    CommonAttentionMetadata,
    KVCacheLayout,
    MultipleOf,
    VllmConfig,
    get_current_vllm_config_or_none,
    get_logger,
)
from thrift_vllm.backend.config import ThriftBackendConfig
from thrift_vllm.selection import BlockGrid, budget_to_k

logger = get_logger(__name__)

BACKEND_NAME = "CUSTOM"  # the enum member vLLM resolves get_name() to (see plugin.py)
SUPPORTED_HEAD_SIZES = (64, 128)


def split_kv_cache(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views ``(key_cache, value_cache)``, each ``[num_blocks, H, page_size, head_size]``."""
    if kv_cache.dim() != 4 or kv_cache.shape[-1] != 2 * head_size:
        raise ValueError(f"expected a KV cache [num_blocks, H, page, {2 * head_size}], "
                         f"got {tuple(kv_cache.shape)}")
    return kv_cache[..., :head_size], kv_cache[..., head_size:]


@dataclass
class ThriftAttentionMetadata:
    """Everything ``forward`` needs for one step, shared by every layer of the group."""

    num_actual_tokens: int  # tokens excluding padding
    num_reqs: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # [num_reqs + 1]
    seq_lens: torch.Tensor  # [num_reqs], context including this step's tokens
    block_table: torch.Tensor  # [num_reqs, max_blocks] int32
    slot_mapping: torch.Tensor  # [num_actual_tokens]
    # Host copies, made once per step so layers do not sync per sequence.
    query_start_loc_host: list[int]
    seq_lens_host: list[int]
    fp16_budgets: list[float]  # per sequence
    num_fp16_blocks: list[int]  # per sequence: blocks per query-block row (budget_to_k)
    page_size: int


class ThriftAttentionMetadataBuilder(AttentionMetadataBuilder[ThriftAttentionMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str],
                 vllm_config: VllmConfig, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.config = ThriftBackendConfig.from_vllm_config(vllm_config)
        self.page_size = kv_cache_spec.block_size
        self.per_request = request_budget.is_enabled(vllm_config)

    def request_budgets(self, common: CommonAttentionMetadata) -> list[float]:
        """Per-sequence FP16 budget: the request's ``extra_args["fp16_budget"]`` when the
        budget logits processor is enabled (rows = persistent batch rows, runner V1), else the
        server default."""
        default = self.config.fp16_budget
        if not self.per_request:
            return [default] * common.num_reqs
        if common.req_idx is not None:  # model runner V2: rows are request slots
            logger.warning_once("thrift_vllm: per-request fp16_budget is not wired for model "
                                "runner V2 yet; using the server default %s", default)
            return [default] * common.num_reqs
        return request_budget.budgets_for_rows(common.num_reqs, default)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> ThriftAttentionMetadata:
        common = common_attn_metadata
        if isinstance(common.causal, torch.Tensor) or not common.causal:
            raise NotImplementedError("ThriftAttention backend: only causal decoder attention")
        num_reqs = common.num_reqs
        qsl = common.query_start_loc_cpu[: num_reqs + 1].tolist()
        seq_lens = common.seq_lens[:num_reqs].tolist()  # CPU tensor on CPU; one sync on GPU
        budgets = self.request_budgets(common)
        ks, grids = [], []
        for i in range(num_reqs):
            sq, skv = qsl[i + 1] - qsl[i], seq_lens[i]
            if sq <= 0:  # padding request
                ks.append(0)
                grids.append(None)
                continue
            grid = BlockGrid(seq_len_q=sq, seq_len_kv=skv, block_size=self.config.block_size,
                             causal=True)
            ks.append(budget_to_k(budgets[i], grid))
            grids.append(grid)
        stats.record_step(grids, ks, budgets)  # realised FP16 share, for /metrics
        return ThriftAttentionMetadata(
            num_actual_tokens=common.num_actual_tokens,
            num_reqs=num_reqs,
            max_query_len=common.max_query_len,
            max_seq_len=common.max_seq_len,
            query_start_loc=common.query_start_loc,
            seq_lens=common.seq_lens,
            block_table=common.block_table_tensor,
            slot_mapping=common.slot_mapping,
            query_start_loc_host=qsl,
            seq_lens_host=seq_lens,
            fp16_budgets=budgets,
            num_fp16_blocks=ks,
            page_size=self.page_size,
        )


class ThriftAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False

    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[ThriftAttentionImpl]:
        return ThriftAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[ThriftAttentionMetadataBuilder]:
        return ThriftAttentionMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        # The gather works for any page size; 16 keeps vLLM's usual granularity.
        return [MultipleOf(16)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(SUPPORTED_HEAD_SIZES)

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBHNC,)  # head-major pages: [B, H, N, C] per layer

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


class ThriftAttentionImpl(AttentionImpl[ThriftAttentionMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
        **unsupported,
    ) -> None:
        unsupported_features = {
            "sliding window": sliding_window is not None,
            "ALiBi": alibi_slopes is not None,
            "logits soft-capping": bool(logits_soft_cap),
            "attention sinks": sinks is not None,
            f"attention type {attn_type!r} (decoder only)": attn_type != AttentionType.DECODER,
            f"kv_cache_dtype {kv_cache_dtype!r} ('auto' only)": kv_cache_dtype != "auto",
            f"head size {head_size} (supported: {SUPPORTED_HEAD_SIZES})":
                head_size not in SUPPORTED_HEAD_SIZES,
            f"extra arguments {sorted(unsupported)}": bool(unsupported),
        }
        bad = [name for name, on in unsupported_features.items() if on]
        if bad:
            raise NotImplementedError(f"ThriftAttention backend does not support: {', '.join(bad)}")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{num_heads} query heads are not a multiple of "
                             f"{self.num_kv_heads} KV heads")
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        # None outside an engine (unit tests): defaults and THRIFT_VLLM_* only
        self.config = ThriftBackendConfig.from_vllm_config(get_current_vllm_config_or_none())

    def do_kv_cache_update(self, layer: torch.nn.Module, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Write this step's K/V ``[T, Hkv, D]`` into the pages at ``slot_mapping`` (-1: skip)."""
        if kv_cache.numel() == 0:
            return
        key_cache, value_cache = split_kv_cache(kv_cache, self.head_size)
        page = kv_cache.shape[2]
        n = slot_mapping.shape[0]
        slots = slot_mapping.to(torch.int64)
        keep = slots >= 0
        if not bool(keep.all()):
            slots = slots[keep]
            key, value = key[:n][keep], value[:n][keep]
        else:
            key, value = key[:n], value[:n]
        blocks, offsets = slots // page, slots % page
        # advanced indices on dims 0 and 2 -> indexed shape [n, H, D]
        key_cache[blocks, :, offsets] = key.to(kv_cache.dtype)
        value_cache[blocks, :, offsets] = value.to(kv_cache.dtype)

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: ThriftAttentionMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query ``[T, Hq, D]``, kv_cache ``[num_blocks, Hkv, page, 2D]``; writes ``output``."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("ThriftAttention backend: fused output quantisation")
        if attn_metadata is None:  # profiling / warm-up run
            return output
        md = attn_metadata
        key_cache, value_cache = split_kv_cache(kv_cache, self.head_size)
        page = md.page_size
        cfg = self.config
        for i in range(md.num_reqs):
            q0, q1 = md.query_start_loc_host[i], md.query_start_loc_host[i + 1]
            if q1 <= q0:
                continue
            seq_len = md.seq_lens_host[i]
            n_pages = -(-seq_len // page)
            pages = md.block_table[i, :n_pages].to(torch.int64)
            # [n_pages, H, page, D] -> [1, H, seq_len, D]
            k = key_cache[pages].transpose(0, 1).reshape(self.num_kv_heads, -1, self.head_size)
            v = value_cache[pages].transpose(0, 1).reshape(self.num_kv_heads, -1, self.head_size)
            k, v = k[None, :, :seq_len], v[None, :, :seq_len]
            q = query[q0:q1].transpose(0, 1).unsqueeze(0)  # [1, Hq, Sq, D]
            out = thrift_vllm.attention(
                q.contiguous(), k.contiguous(), v.contiguous(), causal=True,
                fp16_budget=md.fp16_budgets[i], selection=cfg.selection,
                quant_format=cfg.quant_format, block_size=cfg.block_size, sm_scale=self.scale,
                impl=cfg.impl)
            output[q0:q1] = out[0].transpose(0, 1).to(output.dtype)
        return output
