"""Shared fixtures: every distributed test runs under both Horovod controllers."""
import os
import pathlib
import sys

import pytest

from horovod_squeeze.testing import CONTROLLERS

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Tests measure through the benchmarks' own code (benchmarks.gpu_check, ...), run from any directory.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


@pytest.fixture(params=CONTROLLERS)
def controller(request):
    """Horovod controller for a multi-rank test: ``"gloo"`` or ``"mpi"``."""
    return request.param
