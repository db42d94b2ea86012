#!/usr/bin/env bash
# SmolLM2-135M-Instruct quality runs on a GPU machine (issue 17). A device call carries at most
# 64 MiB, the repository included, and the GGUF is 98 MB: it travels in two parts over two
# consecutive calls on the same warm machine, like scripts/device_vllm26.sh.
#
#   here:    bash scripts/device_smollm2.sh split        # -> .carry/smol.part0, .part1, wheels
#   call 1:  carry [".carry/smol.part0"]:                  bash scripts/device_smollm2.sh stage0
#   call 2:  carry [".carry/smol.part1", ".carry/wheels"]: bash scripts/device_smollm2.sh stage1 [ARGS]
#   later:   bash scripts/device_smollm2.sh run [ARGS]     # same machine, model already converted
# ARGS go to `python -m thrift_vllm.quality.real_model` (default: the issue's grid below, 8 min
# per call; results accumulate in $OUT/smol, rerun to continue).
set -euo pipefail
phase=${1:?split|stage0|stage1|run}
shift || true
park=/tmp/smol-parts
model=/tmp/smollm2-135m-instruct
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

grid() {
    local m=fp16,fp4/nvfp4,fp4/mxfp4
    for b in 1 2.5 5 10 25; do m+=",thrift/nvfp4/block_mean/$b%"; done
    m+=",thrift/nvfp4/quest/5%,thrift/nvfp4/local/5%,fp4-kv4/nvfp4,fp16-kv4/nvfp4"
    m+=",thrift-kv4/nvfp4/block_mean/5%,store/nvfp4,store/nvfp4/smooth-first"
    m+=",store/nvfp4/hadamard,store/nvfp4/smooth-first+hadamard,store-auto/nvfp4/block_mean/5%"
    echo "--lengths 8192,4096 --samples 48 --text pydoc+docstrings --methods $m --max-minutes 8"
}

evaluate() {
    local args=("$@")
    ((${#args[@]})) || read -r -a args <<<"$(grid)"
    python3 -m thrift_vllm.quality.real_model --model "$model" --out "${OUT:-/tmp}/smol" "${args[@]}"
}

case $phase in
split)
    gguf=$(python3 -c "from thrift_vllm.quality.smollm2 import find_gguf; print(find_gguf())")
    mkdir -p .carry/wheels
    split -n 2 -d -a 1 "$gguf" .carry/smol.part
    pip download -q --no-deps -d .carry/wheels gguf accelerate
    ls -la .carry/smol.part* .carry/wheels
    ;;
stage0)
    mkdir -p "$park" && cp .carry/smol.part0 "$park/" && echo "parked part0 in $park"
    ;;
stage1)
    [[ -f $park/smol.part0 ]] || { echo "part0 missing: run stage0 first, on this machine"; exit 3; }
    cat "$park/smol.part0" .carry/smol.part1 >"$park/SmolLM2-135M-Instruct.Q4_1.gguf"
    got=$(sha256sum "$park/SmolLM2-135M-Instruct.Q4_1.gguf" | cut -d' ' -f1)
    [[ $got == "$sha" ]] || { echo "GGUF sha256 $got != $sha"; exit 4; }
    pip install -q --no-deps .carry/wheels/*.whl
    python3 -m thrift_vllm.server.cli convert-smollm2 "$model" --overwrite \
        --gguf "$park/SmolLM2-135M-Instruct.Q4_1.gguf"
    evaluate "$@"
    ;;
run)
    evaluate "$@"
    ;;
*)
    echo "unknown phase $phase"; exit 2
    ;;
esac
