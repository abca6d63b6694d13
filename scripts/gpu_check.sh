#!/usr/bin/env bash
# CUDA check of the PyTorch engine: every algorithm x exchange on CUDA tensors against the same run
# on CPU tensors (2 and 4 simulated ranks; float32, float16, bfloat16), plus a horovodrun job where
# Horovod has NCCL and there is more than one GPU. Writes benchmarks/results/gpu_check.json.
# Without CUDA it prints "no CUDA device: skipped" and exits 0. Arguments go to
# benchmarks/gpu_check.py, e.g. scripts/gpu_check.sh --ranks 2 --dtypes float32
#   or, to check the check on any machine: scripts/gpu_check.sh --device cpu
# It does not run scripts/setup.sh, which installs CPU-only PyTorch: it uses .venv if there is one,
# else $PYTHON (default python3), which must have a CUDA build of PyTorch and this package.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
export TF_USE_LEGACY_KERAS=1 TF_CPP_MIN_LOG_LEVEL=2 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$(dirname "$PYTHON"):$PATH"  # horovodrun beside the interpreter
cd "$REPO"
exec "$PYTHON" benchmarks/gpu_check.py "$@"
