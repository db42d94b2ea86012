"""Device inputs of the paged decode launch, made once per step by the metadata builder and
shared by every layer (the Triton path; thrift_vllm.ops.paged_attention.paged_decode_triton).

Two ways to make them:

* ``DecodeBatch.make`` (eager; ``thrift_vllm.ops.paged_attention``): fresh tensors for the
  step's one-token sequences, wherever they sit in the batch; the select width is this step's
  largest k.
* :class:`GraphDecodeBuffers` (FULL CUDA graphs of pure-decode batches): the k per sequence
  lives in a persistent buffer updated in place, ``seq_lens`` and ``block_table`` are vLLM's own
  persistent runner buffers, the query rows are ``0..n-1`` and the select width is fixed (every
  unit of ``max_model_len``), so a captured launch replays with the next step's values.
"""

from __future__ import annotations

import torch

from thrift_vllm.ops.paged_attention import DecodeBatch, host_to_device


class GraphDecodeBuffers:
    """Persistent decode inputs for CUDA-graph replay (see the module docstring).

    max_num_seqs: vLLM's ``max_num_seqs`` (the largest captured batch); max_units: selection
    units of a ``max_model_len`` sequence (the fixed select width); device: the engine's.
    """

    def __init__(self, max_num_seqs: int, max_units: int, device: torch.device | str) -> None:
        if max_num_seqs < 1 or max_units < 1:
            raise ValueError(f"need max_num_seqs >= 1 and max_units >= 1, got {max_num_seqs}, "
                             f"{max_units}")
        self.max_units = max_units
        self.num_fp16_blocks = torch.zeros(max_num_seqs, dtype=torch.int32, device=device)

    def fill(self, seq_lens: torch.Tensor, block_table: torch.Tensor, ks: list[int]
             ) -> DecodeBatch:
        """A pure-decode batch of ``n = len(ks)`` sequences, query row i = sequence i.
        ``seq_lens`` int32 ``[n]`` and ``block_table`` int32 ``[n, max_pages]`` are vLLM's
        persistent buffers (views of them); ``ks`` host ints, copied into the k buffer."""
        n = len(ks)
        if n > self.num_fp16_blocks.shape[0]:
            raise ValueError(f"{n} sequences exceed max_num_seqs {self.num_fp16_blocks.shape[0]}")
        if seq_lens.dtype != torch.int32 or block_table.dtype != torch.int32:
            raise ValueError(f"seq_lens/block_table must be int32, got {seq_lens.dtype}/"
                             f"{block_table.dtype}")
        # pinned + non-blocking: a pageable copy would synchronise the stream every step
        self.num_fp16_blocks[:n].copy_(
            host_to_device(ks, torch.int32, self.num_fp16_blocks.device), non_blocking=True)
        return DecodeBatch(rows=None, seq_lens=seq_lens[:n],
                           num_fp16_blocks=self.num_fp16_blocks[:n],
                           block_table=block_table[:n], max_num_fp16_blocks=self.max_units)
