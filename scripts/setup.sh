#!/usr/bin/env bash
# Idempotent set-up: system packages, the .venv virtual environment, PyTorch and TensorFlow (CPU),
# Horovod 0.28.1 built for both with Gloo and MPI (wheel cached outside the repository), and this
# package in editable mode. Safe to run again: each step checks what is already there.
#
#   scripts/setup.sh            set up (or verify) everything
#   HOROVOD_SQUEEZE_CACHE=DIR   where built Horovod wheels are kept (default ~/.cache/horovod-squeeze)
#   HOROVOD_SQUEEZE_REBUILD=1   rebuild the Horovod wheel even if a cached one exists
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
PY="$VENV/bin/python"
HOROVOD_VERSION=0.28.1
TORCH_VERSION=2.13.0
TF_SERIES=2.21
CACHE="${HOROVOD_SQUEEZE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/horovod-squeeze}"
export TF_USE_LEGACY_KERAS=1 TF_CPP_MIN_LOG_LEVEL=2 PIP_DISABLE_PIP_VERSION_CHECK=1

current_step="starting"
started=$SECONDS
step() { current_step="$1"; printf '[setup %4ds] %s\n' "$((SECONDS - started))" "$1"; }
trap 'rc=$?; [ $rc -eq 0 ] || printf "[setup] FAILED at step: %s (exit %d)\n" "$current_step" "$rc" >&2' EXIT

# The local registry mirror makes pip warn about every package it does not hold; keep the real errors.
pip_check() { "$PY" -m pip install --quiet "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

step "system packages (OpenMPI, compilers, cmake)"
need=()
for pkg in libopenmpi-dev openmpi-bin g++ cmake make; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need[@]}" >/dev/null
fi

step "virtual environment at $VENV"
[ -x "$PY" ] || python3 -m venv "$VENV"

step "Python packages: torch $TORCH_VERSION (CPU), tensorflow-cpu $TF_SERIES, tf_keras, tensorboard, numpy, mpi4py, pytest"
if ! "$PY" - <<PYEOF 2>/dev/null
import importlib.metadata as md, sys
want = {"torch": "$TORCH_VERSION", "tensorflow-cpu": "$TF_SERIES.", "tf_keras": "$TF_SERIES.",
        "tensorboard": "$TF_SERIES.",
        "numpy": "", "mpi4py": "", "pytest": "", "scikit-learn": "", "tqdm": "", "matplotlib": ""}
for name, prefix in want.items():
    if not md.version(name).startswith(prefix):
        sys.exit(1)
PYEOF
then
  # torch==X takes the local CPU wheel; a looser pin would pull the CUDA build.
  pip_check "torch==$TORCH_VERSION" numpy mpi4py pytest scikit-learn tqdm matplotlib \
    "tensorflow-cpu==$TF_SERIES.*" "tf_keras==$TF_SERIES.*" "tensorboard==$TF_SERIES.*" cloudpickle psutil pyyaml packaging
fi

TF_VERSION="$("$PY" -c 'import importlib.metadata as m; print(m.version("tensorflow-cpu"))')"
PY_TAG="$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
WHEEL_DIR="$CACHE/wheels/horovod-$HOROVOD_VERSION-torch-$TORCH_VERSION-tf-$TF_VERSION-$PY_TAG"

horovod_ok() {
  "$PY" - <<'PYEOF' >/dev/null 2>&1
import horovod, horovod.torch, horovod.tensorflow
from horovod.common.util import gloo_built, mpi_built
import horovod.torch as ht
assert ht.gloo_built() and ht.mpi_built()
PYEOF
}

if [ "${HOROVOD_SQUEEZE_REBUILD:-0}" = 1 ] || ! horovod_ok; then
  wheel="$(ls "$WHEEL_DIR"/horovod-*.whl 2>/dev/null | head -n1 || true)"
  if [ "${HOROVOD_SQUEEZE_REBUILD:-0}" = 1 ] || [ -z "$wheel" ]; then
    step "building Horovod $HOROVOD_VERSION wheel (PyTorch + TensorFlow, Gloo + MPI; ~5 min on 2 cores)"
    build_tmp="$(mktemp -d)"
    tf_include="$("$PY" -c 'import tensorflow as tf; print(tf.sysconfig.get_include())' 2>/dev/null)"
    # TF 2.21 moved xla_builder.h; Horovod's XLA op still includes the old path.
    mkdir -p "$build_tmp/compat/tensorflow/compiler/xla/client"
    echo '#include "xla/hlo/builder/xla_builder.h"' \
      > "$build_tmp/compat/tensorflow/compiler/xla/client/xla_builder.h"
    mkdir -p "$WHEEL_DIR"
    log="$CACHE/horovod-build.log"
    if ! env CXX="$REPO/scripts/horovod-cxx" \
        HOROVOD_SQUEEZE_EXTRA_INCLUDES="$tf_include/external/highwayhash $tf_include/external/farmhash_archive/src $build_tmp/compat" \
        HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
        HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 HOROVOD_GPU_OPERATIONS= \
        PATH="$VENV/bin:$PATH" \
        "$PY" -m pip wheel --no-build-isolation --no-deps --no-cache-dir \
          -w "$build_tmp/wheel" "horovod==$HOROVOD_VERSION" >"$log" 2>&1; then
      tail -n 40 "$log" >&2
      echo "[setup] Horovod build failed; full log: $log" >&2
      exit 1
    fi
    rm -f "$WHEEL_DIR"/horovod-*.whl
    mv "$build_tmp"/wheel/horovod-*.whl "$WHEEL_DIR/"
    rm -rf "$build_tmp"
    wheel="$(ls "$WHEEL_DIR"/horovod-*.whl | head -n1)"
  else
    step "using cached Horovod wheel $wheel"
  fi
  step "installing Horovod from $wheel"
  pip_check --force-reinstall --no-deps "$wheel"
  horovod_ok || { echo "[setup] Horovod installed but does not import with torch, TF, Gloo and MPI" >&2; exit 1; }
fi

step "horovod-squeeze (editable)"
# Checked through pip's metadata: an import from the repository root would succeed uninstalled.
"$PY" -c 'import importlib.metadata as m; m.version("horovod-squeeze")' 2>/dev/null \
  || pip_check --no-deps -e "$REPO"

step "done in $((SECONDS - started)) s; activate with: source .venv/bin/activate"
