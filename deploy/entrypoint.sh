#!/bin/sh
# Container entry point: environment -> `thrift-vllm serve` flags (exec'd, so signals reach it).
#   THRIFT_MODEL            Hugging Face id or model directory; empty: the embedded model
#                           (trained if shipped in the image, else the untrained placeholder)
#   THRIFT_FP16_BUDGET      server default share of FP16 blocks (empty: the server's, 0.05)
#   THRIFT_MAX_FP16_BUDGET  cap on per-request budgets (empty: the server's, 1.0)
#   THRIFT_KV_LAYOUT        KV pages: auto (model-dtype K/V + FP4 copy) or nvfp4 (FP4 only,
#                           ~3x the tokens per GiB); empty: auto
#   HOST, PORT              bind address (0.0.0.0, 8000)
# Arguments are appended after these flags, so they win (argparse keeps the last value).
# A first argument that is not a flag is exec'd as a command (ray start ..., bash, ...).
set -eu

if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then
    exec "$@"
fi

if [ -n "${THRIFT_MAX_FP16_BUDGET:-}" ]; then
    set -- --max-fp16-budget "$THRIFT_MAX_FP16_BUDGET" "$@"
fi
if [ -n "${THRIFT_KV_LAYOUT:-}" ]; then
    set -- --kv-layout "$THRIFT_KV_LAYOUT" "$@"
fi
if [ -n "${THRIFT_FP16_BUDGET:-}" ]; then
    set -- --fp16-budget "$THRIFT_FP16_BUDGET" "$@"
fi
set -- --host "${HOST:-0.0.0.0}" --port "${PORT:-8000}" "$@"
if [ -n "${THRIFT_MODEL:-}" ]; then
    set -- "$THRIFT_MODEL" "$@"
fi

exec thrift-vllm serve "$@"
