"""Horovod as installed by scripts/setup.sh: both frameworks, both controllers, the collectives we use."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from horovod_squeeze.testing import rank_environment, run_on_ranks


def test_check_build_lists_frameworks_and_controllers():
    horovodrun = shutil.which("horovodrun", path=os.path.dirname(sys.executable))
    assert horovodrun, "horovodrun is not installed next to this Python"
    out = subprocess.run([horovodrun, "--check-build"], capture_output=True, text=True, check=True,
                         env={**os.environ, **rank_environment()}, timeout=300).stdout
    for feature in ("PyTorch", "TensorFlow", "MPI", "Gloo"):
        assert f"[X] {feature}" in out, f"{feature} missing from:\n{out}"


def _expected(rank_values):
    """What allreduce (sum), allgather and alltoall return on each rank, computed with NumPy."""
    size = len(rank_values)
    total = np.sum(rank_values, axis=0)
    gathered = np.concatenate(rank_values)
    # Rank r sends row block j to rank j: rank j receives block j of every rank, in rank order.
    per_rank_alltoall = [np.concatenate([np.array_split(v, size)[j] for v in rank_values])
                         for j in range(size)]
    return total, gathered, per_rank_alltoall


def _rank_data(rank, size):
    rng = np.random.default_rng(1234 + rank)
    return rng.standard_normal((2 * size, 3)).astype(np.float32)


def _torch_collectives():
    import horovod.torch as hvd
    import torch

    hvd.init()
    x = torch.from_numpy(_rank_data(hvd.rank(), hvd.size()))
    packed = (x > 0).to(torch.uint8)  # payloads travel as uint8
    return (hvd.allreduce(x, op=hvd.Sum).numpy(), hvd.allgather(x).numpy(),
            hvd.alltoall(x).numpy(), hvd.allgather(packed).numpy())


def _tf_collectives():
    import horovod.tensorflow as hvd
    import tensorflow as tf

    hvd.init()
    x = tf.constant(_rank_data(hvd.rank(), hvd.size()))
    packed = tf.cast(x > 0, tf.uint8)
    return (hvd.allreduce(x, op=hvd.Sum).numpy(), hvd.allgather(x).numpy(),
            hvd.alltoall(x).numpy(), hvd.allgather(packed).numpy())


@pytest.mark.parametrize("body", [_torch_collectives, _tf_collectives], ids=["torch", "tensorflow"])
def test_collectives_match_numpy(controller, body):
    size = 2
    results = run_on_ranks(body, size, controller, timeout=120)
    rank_values = [_rank_data(r, size) for r in range(size)]
    total, gathered, alltoall = _expected(rank_values)
    packed = np.concatenate([(v > 0).astype(np.uint8) for v in rank_values])
    for rank, (got_sum, got_gather, got_alltoall, got_packed) in enumerate(results):
        np.testing.assert_allclose(got_sum, total, rtol=1e-6)
        np.testing.assert_array_equal(got_gather, gathered)
        np.testing.assert_array_equal(got_alltoall, alltoall[rank])
        np.testing.assert_array_equal(got_packed, packed)
