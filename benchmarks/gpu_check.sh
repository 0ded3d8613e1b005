#!/usr/bin/env bash
# One GPU check (issue 35): the paper preset trained in bf16 (img/s, MFU, peak memory) eager and with
# torch.compile, the loader's share of GPU idle time, edit latency and a short faithfulness run, as
# one table; writes benchmarks/gpu_check.json. Designed for <= 8 minutes on one H100.
#
#   bash benchmarks/gpu_check.sh                  # on a GPU machine, from anywhere
#   bash benchmarks/gpu_check.sh --cpu-smoke      # toy sizes on CPU (what tests/test_gpu_check.py runs)
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --steps 600
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # this checkout's patronus, whatever is installed
export PYTHONUNBUFFERED=1
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec timeout "${GPU_CHECK_TIMEOUT_S:-480}" "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
