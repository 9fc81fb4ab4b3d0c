#!/usr/bin/env bash
# The prepared GPU check of docs/performance.md (scripts/gpu_check.py does the work).
#   scripts/gpu_check.sh              on a GPU host: DeepLabV3+ R101 at crop 321 and 513, writes
#                                     docs/gpu_check.json (GPU_CHECK_JSON=... to write elsewhere)
#   scripts/gpu_check.sh --tiny [F]   on CPU with tiny shapes, writes F (default /tmp/gpu_check_tiny.json)
# PYTHON=... picks the interpreter (default: the project's .venv, else python3). The whole check is
# held to 5 minutes (GPU_CHECK_TIMEOUT seconds), the budget the issue gives it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"
if [ "${1:-}" = "--tiny" ]; then
    OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" exec "$PY" scripts/gpu_check.py --tiny --json "${2:-/tmp/gpu_check_tiny.json}"
fi
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
fi
exec timeout "${GPU_CHECK_TIMEOUT:-300}" "$PY" scripts/gpu_check.py --json "${GPU_CHECK_JSON:-docs/gpu_check.json}" "$@"
