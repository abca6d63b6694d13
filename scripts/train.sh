#!/usr/bin/env bash
# The main job: set up (idempotent), then a 4-rank data-parallel training run under horovodrun.
# Extra arguments go to the training script, e.g. scripts/train.sh --epochs 5
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$REPO/scripts/setup.sh"
export TF_USE_LEGACY_KERAS=1 TF_CPP_MIN_LOG_LEVEL=2 OMP_NUM_THREADS=1
cd "$REPO"
exec "$REPO/.venv/bin/horovodrun" -np "${NUM_PROC:-4}" -H "localhost:${NUM_PROC:-4}" --gloo \
  "$REPO/.venv/bin/python" examples/pytorch_digits.py "$@"
