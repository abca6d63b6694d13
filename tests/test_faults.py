"""A worker that dies mid-run outside elastic mode: the job ends with a clear error well within
the timeout, never a hang."""
import time

import pytest

import horovod_squeeze as hs
from horovod_squeeze.testing import RankFailed, run_on_ranks


def _dies_at_step(step_of_death):
    import os

    import horovod.torch as hvd
    import torch

    import horovod_squeeze.torch as hst

    hvd.init()
    model = torch.nn.Linear(50, 40)
    optimizer = hst.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters(),
        compression=hs.DoubleSqueeze(hs.ScaledSign()), min_compress_numel=0)
    for step in range(100):
        if step == step_of_death and hvd.rank() == 1:
            os._exit(3)
        optimizer.zero_grad()
        model(torch.ones(2, 50)).sum().backward()
        optimizer.step()
    return "finished"


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_a_dead_worker_ends_the_job_with_an_error_naming_it(controller):
    started = time.monotonic()
    # Either the survivor's error (Horovod's, raised through the exchange) or the launcher's
    # report of the rank that never answered.
    with pytest.raises(RankFailed, match=r"HorovodInternalError: Horovod has been shut down|"
                                         r"before ranks \[(0, )?1\] reported"):
        run_on_ranks(_dies_at_step, 2, controller, args=(2,), timeout=120)
    assert time.monotonic() - started < 60
