#!/usr/bin/env bash
# Gradient exchanges on a multi-host cluster built from network namespaces (needs root).
# Writes benchmarks/results/cluster_*.json and, without --quick, docs/benchmarks.md and its plots
# (with --suite decentralized: docs/decentralized_cluster.md). Arguments go to
# benchmarks/cluster/run.py, e.g. scripts/cluster_benchmark.sh --quick
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ $EUID -ne 0 ]]; then
  echo "needs root: network namespaces, veth pairs and tc qdiscs require CAP_SYS_ADMIN/CAP_NET_ADMIN" >&2
  exit 1
fi
export TF_USE_LEGACY_KERAS=1 TF_CPP_MIN_LOG_LEVEL=2 OMP_NUM_THREADS=1
cd "$REPO"
exec "${PYTHON:-$REPO/.venv/bin/python}" -m benchmarks.cluster.run "$@"
