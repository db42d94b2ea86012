#!/usr/bin/env bash
# Train the embedded model and run the quality harness on a GPU machine, in < 10 minute calls.
#
#   bash scripts/device_quality.sh train OUT_DIR FIT_MINUTES   # starts training detached (setsid),
#                                                              # follows its log for WATCH_S seconds
#   bash scripts/device_quality.sh eval  OUT_DIR EVAL_MINUTES  # waits for the training to finish,
#                                                              # exports, runs the harness
# State lives in RUN_DIR (default /tmp/thrift_quality) on the machine; what should come back is
# copied to OUT_DIR. The detached training outlives the first call as long as the machine is held.
set -uo pipefail
phase=$1 out=$2 minutes=$3
run=${RUN_DIR:-/tmp/thrift_quality}
mkdir -p "$run" "$out"
export PYTHONUNBUFFERED=1

if [[ $phase == train ]]; then
    nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
    setsid nohup python3 -m thrift_vllm.quality.train --out "$run/embedded" \
        --fit-minutes "$minutes" --minutes "$(python3 -c "print($minutes + 4)")" \
        --data-workers "${DATA_WORKERS:-8}" --log-every 50 \
        >"$run/train.log" 2>&1 </dev/null &
    end=$((SECONDS + ${WATCH_S:-540}))
    while ((SECONDS < end)); do
        sleep 30
        tail -n 1 "$run/train.log"
        grep -q "chunk done\|Traceback" "$run/train.log" && break
    done
    cp "$run/train.log" "$out/train.log"
    grep -q Traceback "$run/train.log" && { cat "$run/train.log"; exit 1; }
    exit 0
fi

if [[ $phase == eval ]]; then
    until grep -q "chunk done\|Traceback" "$run/train.log"; do
        pgrep -f thrift_vllm.quality.train >/dev/null || { echo "training is not running"; break; }
        sleep 5
    done
    cp "$run/train.log" "$out/train.log"
    grep -q Traceback "$run/train.log" && { tail -n 40 "$run/train.log"; exit 1; }
    tail -n 3 "$run/train.log"
    mkdir -p "$out/model"
    cp "$run/embedded/model/"* "$out/model/"
    cp "$run/embedded/train_log.json" "$out/train_log.json"
    python3 -m thrift_vllm.quality --model "$run/embedded/model" --out "$run/quality" \
        --lengths "${LENGTHS:-32768,16384,4096}" --samples "${SAMPLES:-32}" \
        --bulk-maths "${BULK_MATHS:-bf16}" --max-minutes "$minutes" 2>&1 |
        tr '\r' '\n' | grep -v "%|" | tail -n 80
    cp "$run/quality/"{results.json,table.md,pareto.png} "$out/" 2>/dev/null
    exit 0
fi
echo "unknown phase $phase" >&2
exit 2
