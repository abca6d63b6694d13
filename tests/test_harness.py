"""The multi-rank harness itself: results come back per rank, failures and hangs become errors."""
import time

import pytest

from horovod_squeeze.testing import RankFailed, RankTimeout, run_on_ranks


def _rank_and_sum(offset):
    import horovod.torch as hvd
    import torch

    hvd.init()
    total = hvd.allreduce(torch.tensor([hvd.rank() + offset], dtype=torch.float64), op=hvd.Sum)
    return hvd.rank(), hvd.size(), total.item()


@pytest.mark.parametrize("num_proc", [2, 4])
def test_results_return_in_rank_order(controller, num_proc):
    results = run_on_ranks(_rank_and_sum, num_proc, controller, args=(10,), timeout=90)
    expected_sum = sum(range(num_proc)) + 10 * num_proc
    assert results == [(r, num_proc, expected_sum) for r in range(num_proc)]


def _rank_one_raises():
    import horovod.torch as hvd
    import torch

    hvd.init()
    if hvd.rank() == 1:
        raise ValueError("deliberate failure on rank one")
    # The other ranks block in a collective that rank 1 never joins.
    hvd.allreduce(torch.ones(1))


def test_rank_that_raises_fails_with_its_traceback(controller):
    start = time.monotonic()
    with pytest.raises(RankFailed) as info:
        run_on_ranks(_rank_one_raises, 2, controller, timeout=60)
    message = str(info.value)
    assert "rank 1 of 2 raised" in message
    assert "ValueError: deliberate failure on rank one" in message
    assert "_rank_one_raises" in message
    assert time.monotonic() - start < 60


def _rank_one_hangs():
    import horovod.torch as hvd

    hvd.init()
    if hvd.rank() == 1:
        time.sleep(3600)
    return "finished"


def test_rank_that_hangs_times_out_with_its_stack(controller):
    timeout = 40  # generous: under load, starting the ranks alone can take 20 s
    start = time.monotonic()
    with pytest.raises(RankTimeout) as info:
        run_on_ranks(_rank_one_hangs, 2, controller, timeout=timeout)
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert f"ranks [1] of 2 did not finish within {timeout} s" in message
    assert "_rank_one_hangs" in message  # the stack shows where rank 1 was stuck
    assert elapsed < timeout + 10


def test_unpicklable_result_is_reported():
    with pytest.raises(RankFailed, match="not picklable"):
        run_on_ranks(_returns_a_lock, 2, "gloo", timeout=60)


def _returns_a_lock():
    import threading

    return threading.Lock()


def test_rejects_unknown_controller():
    with pytest.raises(ValueError, match="controller must be one of"):
        run_on_ranks(_returns_a_lock, 2, "tcp")
