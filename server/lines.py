"""What ``thrift-vllm serve`` says about itself: the startup and KV-capacity lines and the
resolved routes for ``/v1/thrift/config`` (plain functions of the parsed arguments and the
engine; vLLM and torch are imported inside them, as in ``cli``)."""

from __future__ import annotations


def routes_info(backend, kv_layout: str) -> dict:
    """The routes the engine will resolve on this machine's first device and what the budget
    changes there (``/v1/thrift/config``; the engine logs the same at start)."""
    import torch

    from thrift_vllm.backend.routes import resolve_routes

    device = "cuda" if torch.cuda.is_available() else "cpu"
    r = resolve_routes(backend, device)
    effect, text = r.budget_effect(kv_layout)
    return {"decode_math_resolved": r.decode_math, "prefill_resolved": r.prefill,
            "fp16_budget_has_effect": effect, "fp16_budget_effect": text}


def startup_line(args, info) -> str:
    try:
        from vllm.platforms import current_platform

        device = current_platform.device_type or "unknown"
        if device == "cuda":
            import torch

            device = f"cuda ({torch.cuda.get_device_name(0)})"
    except Exception as e:  # pragma: no cover
        device = f"unknown ({e})"
    b, be = info["budget"], info["backend"]
    model = args.model + (" [UNTRAINED PLACEHOLDER: random weights, output is noise]"
                          if info["placeholder"] else "")
    return (f"thrift-vllm serve: model={model} device={device} backend=ThriftAttention "
            f"(CUSTOM; impl={be.impl}, selection={be.selection}, {be.quant_format}, "
            f"block {be.block_size}, prefill {be.prefill}, bulk {be.bulk_math}, decode_math "
            f"{be.decode_math}) kv_layout={info['kv_layout']} "
            f"fp16_budget default={b.default} cap={b.cap} over_cap={b.over_cap}")


def kv_bytes_per_token(model_config, page_size: int, kv_layout: str, backend) -> dict:
    """KV bytes per token of the whole model in the backend's page layout (the backend's own
    ``kv_pages.layout_for``) and vLLM's stock layout, for the capacity line and ``/metrics``."""
    from thrift_vllm.backend.kv_pages import layout_for

    layers = model_config.hf_text_config.num_hidden_layers  # whole model (every PP stage)
    heads = model_config.get_total_num_kv_heads()
    lay = layout_for(kv_layout, model_config.get_head_size(), page_size, backend,
                     model_config.dtype)
    return {"kv_bytes_per_token": layers * lay.bytes_per_token(heads),
            "kv_bytes_per_token_stock": layers * lay.stock_bytes_per_token(heads)}


def capacity_line(engine_client, info) -> str:
    """After the engine started: the KV capacity vLLM computed from the backend's page bytes."""
    cc = engine_client.vllm_config.cache_config
    tokens = (cc.num_gpu_blocks or 0) * (cc.block_size or 0)
    info["kv_capacity_tokens"] = tokens
    try:
        info.update(kv_bytes_per_token(engine_client.model_config, cc.block_size,
                                       info["kv_layout"], info["backend"]))
        per = (f"; {info['kv_bytes_per_token']} B/token vs stock "
               f"{info['kv_bytes_per_token_stock']}")
    except Exception as e:  # reporting must never stop the server
        per = f"; bytes/token unknown ({type(e).__name__}: {e})"
    return (f"thrift-vllm serve: KV cache {cc.num_gpu_blocks} pages x {cc.block_size} tokens = "
            f"{tokens} tokens (kv_layout={info['kv_layout']}{per})")
