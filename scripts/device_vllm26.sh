#!/usr/bin/env bash
# CUDA vLLM 0.26 on the device machine (issue 6), from the offline bundle in ../shared/gpu-vllm.
#
# The bundle (56 MB) plus the repository (~17 MB, the embedded model included) is more than the
# device tool carries in one call (64 MiB), so the bundle travels in two halves over two calls
# made back to back (the machine keeps /tmp while it is held):
#
#   here:    bash scripts/device_vllm26.sh split                 # -> .carry/vllm26.part0, .part1
#   call 1:  carry [".carry/vllm26.part0"]:  bash scripts/device_vllm26.sh stage0 [CMD ...]
#   call 2:  carry [".carry/vllm26.part1"]:  bash scripts/device_vllm26.sh stage1 [CMD ...]
#   later:   bash scripts/device_vllm26.sh run CMD ...           # same machine, still warm
#
# stage0 parks its half in /tmp and runs CMD (any GPU work that needs no vLLM, e.g. the quality
# harness); stage1 joins the halves, checks the sha256, unpacks to /tmp/site, installs this
# checkout (no deps) and runs CMD with vLLM importable. `.carry/` is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
phase=${1:?split|stage0|stage1|run}
shift || true
bundle=../shared/gpu-vllm/vllm26-sm90-site.tar.xz
sha=afde1014e7e00da771116d4233b8e69b0f443c4c87d47ce4a14faf68d12e6c71
park=/tmp/vllm26-parts

install_repo() {  # thrift_vllm (kernels/ and server/ map into it only when installed)
    python3 -m pip install --no-build-isolation --no-deps -e . -q 2>&1 | tail -n 1 || true
}

env_setup() {
    export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 \
        VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
    install_repo
}

case $phase in
split)
    mkdir -p .carry
    split -n 2 -d -a 1 "$bundle" .carry/vllm26.part
    ls -la .carry/vllm26.part*
    ;;
stage0)
    mkdir -p "$park"
    cp .carry/vllm26.part0 "$park/"
    echo "parked $(du -h "$park/vllm26.part0" | cut -f1) in $park"
    export PYTHONUNBUFFERED=1
    install_repo
    if (($#)); then "$@"; fi
    ;;
stage1)
    [[ -f $park/vllm26.part0 ]] || { echo "part0 missing: run stage0 first, on this machine"; exit 3; }
    got=$(cat "$park/vllm26.part0" .carry/vllm26.part1 | sha256sum | cut -d' ' -f1)
    [[ $got == "$sha" ]] || { echo "bundle sha256 mismatch: $got"; exit 4; }
    mkdir -p /tmp/site
    cat "$park/vllm26.part0" .carry/vllm26.part1 | xz -dc | tar -x -C /tmp/site
    env_setup
    python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
    if (($#)); then "$@"; fi
    ;;
run)
    [[ -d /tmp/site/vllm ]] || { echo "/tmp/site has no vLLM: run stage0 + stage1 first"; exit 3; }
    env_setup
    "$@"
    ;;
*)
    echo "unknown phase $phase" >&2
    exit 2
    ;;
esac
