"""Paged KV-layout evaluation of the quality harness (``MethodConfig.kv_layout`` ``"nvfp4"`` /
``"auto"``; names ``fp16-kv4/F``, ``fp4-kv4/F/bf16``, ``thrift-kv4/F/bf16/SEL/B%`` = budget 1, 0,
B, and ``*-kvauto/...``): the paged vLLM backend's semantics, ``thrift_vllm.paged`` (CPU) /
``thrift_vllm.ops`` (Triton, CUDA), in a **two-step evaluation**. Every layer holds a paged cache
of the layout (page = selection unit); each step writes its K/V (``write_kv``) and then attends
over the cache (``paged_attention``), exactly what the backend does for one sequence. Step 1 = the
context, all its K/V fresh (the layout's prefill semantics); step 2 = the scored queries, which
see step-1 tokens only through the layout's storage. In the nvfp4 layout (FP4 only, V along
head_dim) that means: FP16 blocks read dequantised FP4 K/V for step-1 tokens and the fresh
model-dtype K/V for step-2 tokens, the FP4 blocks read the stored FP4, selection scores the stored
(dequantised) keys; budget 1 is exact attention on those FP16-path tensors, so it is *not* fp16.
The split:

* NLL: ``[BOS] + window`` of ``L`` ids, ``q = (L - 1) // 4`` (the ``nll_tail`` positions). Step 1
  = ids ``[0, L - 1 - q)``, step 2 = ids ``[L - 1 - q, L - 1)``: the ``q`` queries whose logits
  predict the last ``q`` bytes. ``nll_tail`` is scored on step 2 only; ``nll`` also pools the step-1
  predictions (prefill semantics of the layout).
* Retrieval: step 1 = ``[BOS] + prompt[:-1]``, step 2 = ``prompt[-1:] + answer[:-1]``: the
  queries whose argmax is scored (every answer byte, the first one included, is predicted from a
  cache holding the context in the layout's storage; the step's own tokens are fresh, i.e. the
  answer is teacher-forced as one chunk, not one decode step per byte).

``harness.use_method`` of a paged config puts a ``PagedState`` in the routing state, and the
harness's attention forward hands every call to its ``step``; ``harness.nll_sample`` /
``harness.retrieval_sample`` with ``two_step`` run the model through ``nll_logits`` /
``answer_predictions`` here.
"""

from __future__ import annotations

import torch

from thrift_vllm.quality.methods import MethodConfig, nll_split


class PagedState:
    """Per-layer paged caches of one sample (a paged config): every attention call is one step
    of one sequence, written then attended exactly like the vLLM backend does
    (``write_kv`` + ``paged_attention``: ``thrift_vllm.paged`` on the PyTorch path,
    ``thrift_vllm.ops`` Triton kernels when ``impl`` is triton or auto on CUDA)."""

    def __init__(self, cfg: MethodConfig, impl: str = "auto"):
        self.cfg, self.impl = cfg, impl
        self.capacity = 0
        self.caches: dict[int, torch.Tensor] = {}
        self.written: dict[int, int] = {}

    def reset(self, capacity: int) -> None:
        """Start a new sequence of at most ``capacity`` tokens (fresh zeroed caches)."""
        self.capacity = capacity
        self.caches.clear()
        self.written.clear()

    def step(self, layer: int, query, key, value, scaling, op_dt) -> torch.Tensor:
        """q ``[1, Hq, T, D]``, k/v ``[1, Hkv, T, D]`` (this step's tokens, after RoPE) ->
        ``[T, Hq, D]``: write the step's K/V behind the layer's earlier steps, then attend."""
        if query.shape[0] != 1:
            raise RuntimeError("paged evaluation takes one sequence at a time")
        q, k, v = (t[0].transpose(0, 1).to(op_dt).contiguous() for t in (query, key, value))
        T, Hkv, D = k.shape
        layout = self.cfg.kv_layout_obj(D, op_dt)
        start = self.written.get(layer, 0)
        skv = start + T
        if skv > self.capacity:
            raise RuntimeError(f"step ends at {skv} > capacity {self.capacity}")
        n_pages = -(-self.capacity // layout.page_size)
        if layer not in self.caches:
            self.caches[layer] = layout.allocate(n_pages, Hkv, q.device)
        cache = self.caches[layer]
        dev = q.device
        slots = torch.arange(start, skv, device=dev)
        table = torch.arange(n_pages, dtype=torch.int32, device=dev)[None]
        kw = dict(query_start_loc=[0, T], seq_lens=[skv], block_table=table,
                  fp16_budgets=[self.cfg.budget],
                  scale=float(scaling) if scaling is not None else D ** -0.5,
                  force_sink_recent=self.cfg.force_sink_recent)
        if self.impl == "triton" or (self.impl == "auto" and q.is_cuda):
            from thrift_vllm.ops.kv_write import write_kv_triton
            from thrift_vllm.ops.paged_attention import paged_attention_triton

            write_kv_triton(k, v, cache, slots, layout)
            out = paged_attention_triton(layout, cache, q, k, v, **kw)
        else:
            from thrift_vllm import paged

            views = layout.views(cache)
            paged.write_kv(layout, views, k, v, slots)
            out = paged.paged_attention(layout, views, q, k, v, **kw)
        self.written[layer] = skv
        return out


@torch.inference_mode()
def logits_two_step(model, state: PagedState | None, ids: list[int], split: int,
                    positions: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of ``ids`` run as two steps over the paged caches of ``state`` (the current paged
    method's): ids ``[0, split)``, then ``[split, len)``, at their absolute positions."""
    if state is None:
        raise RuntimeError("two-step evaluation needs a paged method (use_method(kv config))")
    if not 0 < split < len(ids):
        raise ValueError(f"split {split} must lie inside the {len(ids)} ids")
    dev = next(model.parameters()).device
    x = torch.tensor([ids], dtype=torch.long, device=dev)
    pos = torch.arange(len(ids), device=dev)[None]
    state.reset(len(ids))
    h = torch.cat([model.model(input_ids=x[:, a:b], position_ids=pos[:, a:b],
                               use_cache=False).last_hidden_state[0]
                   for a, b in ((0, split), (split, len(ids)))])
    if positions is not None:
        h = h[positions.to(dev)]
    return model.lm_head(h).float()


def nll_logits(model, state: PagedState | None, ids: list[int]) -> torch.Tensor:
    """Logits of the ``len(ids) - 1`` predictions of an NLL sample ``ids`` (``[BOS] + window``):
    the last quarter's queries run as step 2 (``nll_split``)."""
    s1, s2 = nll_split(len(ids))
    return logits_two_step(model, state, ids[:s1 + s2], s1)


def answer_predictions(model, state: PagedState | None, ids: list[int], s1: int) -> list[int]:
    """Argmax at the answer positions ``[s1, len(ids) - 1)`` of ``ids`` (``[BOS] + prompt +
    answer``, ``s1 = len(ids) - len(answer) - 1``): the scored queries (last prompt byte +
    answer[:-1]) run as step 2."""
    pos = torch.arange(s1, len(ids) - 1)
    return logits_two_step(model, state, ids[:-1], s1, pos).argmax(-1).tolist()
