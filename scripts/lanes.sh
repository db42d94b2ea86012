#!/usr/bin/env bash
# Run independent GPU jobs side by side in one device call, one per GPU (nvidia-h200-x2 holds
# two): device time is counted per machine held, so two engines at once cost what one does.
#
#   bash scripts/lanes.sh "CMD0" "CMD1" ...
#
# Lane i runs `bash -c CMDi` with CUDA_VISIBLE_DEVICES=i, LANE=i, its own VLLM_CACHE_ROOT (two
# engines compiling the same model at once must not share torch.compile's cache), a wall-clock
# limit of $LANE_TIMEOUT seconds (default 560) and its log in $OUT/lane<i>.log. With fewer
# GPUs than lanes the lanes run one after the other on GPU 0. Prints each lane's rc and the
# tail of its log; exits non-zero if any lane failed.
set -uo pipefail
out=${OUT:-/tmp}
limit=${LANE_TIMEOUT:-560}
tail_n=${LANE_TAIL:-40}
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
((ngpu > 0)) || ngpu=1

lane() {  # lane index, GPU, command
    (export CUDA_VISIBLE_DEVICES=$2 LANE=$1 VLLM_CACHE_ROOT=/tmp/vllm_cache_lane$1
     timeout -k 20 "$limit" bash -c "$3") >"$out/lane$1.log" 2>&1
}

pids=()
rc=0
i=0
for cmd in "$@"; do
    if (($# <= ngpu)); then
        lane "$i" "$i" "$cmd" &
        pids+=($!)
    else
        lane "$i" 0 "$cmd"
        r=$?
        echo "lane $i (sequential on GPU 0): rc $r"
        ((r == 0)) || rc=$r
    fi
    i=$((i + 1))
done
for j in "${!pids[@]}"; do
    wait "${pids[$j]}"
    r=$?
    echo "lane $j: rc $r"
    ((r == 0)) || rc=$r
done
for j in $(seq 0 $(($# - 1))); do
    echo "===== lane $j: last $tail_n lines of $out/lane$j.log"
    grep -v "it/s\]$" "$out/lane$j.log" | tail -n "$tail_n"
done
exit $rc
