#!/usr/bin/env bash
# The test suite: set up (idempotent), then pytest. Extra arguments go to pytest.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$REPO/scripts/setup.sh"
export TF_USE_LEGACY_KERAS=1 TF_CPP_MIN_LOG_LEVEL=2
cd "$REPO"
exec "$REPO/.venv/bin/python" -m pytest "$@"
