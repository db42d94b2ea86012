#!/usr/bin/env bash
# The project's test command (README): CPU suite, Triton kernels under the interpreter.
# Slow tests (Blackwell ahead-of-time compiles) run too unless SKIP_SLOW=1.
set -euo pipefail
cd "$(dirname "$0")/.."
marks=()
if [ "${SKIP_SLOW:-0}" = "1" ]; then marks=(-m "not slow"); fi
exec python3 -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile "${marks[@]}" tests "$@"
