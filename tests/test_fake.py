"""The in-process fake collectives (horovod_squeeze.fake): results, rank order, types and devices,
name matching, and errors instead of hangs."""
import threading
import time

import numpy as np
import pytest
import torch

from horovod_squeeze.driver import InFlight, run_to_end
from horovod_squeeze.exchange import Collective
from horovod_squeeze.fake import FakeTimeout, FakeWorld


def test_run_returns_results_in_rank_order():
    assert FakeWorld(4).run(lambda comm: (comm.rank, comm.size)) == [(r, 4) for r in range(4)]


def test_allgather_concatenates_in_rank_order():
    def body(comm):
        mine = torch.arange(comm.rank + 1, dtype=torch.float32) + 10 * comm.rank  # ragged sizes
        return comm.wait(comm.launch("allgather", mine, "x"))

    for out in FakeWorld(3).run(body):
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
        assert out.tolist() == [0, 10, 11, 20, 21, 22]


def test_allgather_keeps_uint8_payloads_and_numpy_inputs():
    def body(comm):
        payload = torch.full((3,), comm.rank + 250, dtype=torch.uint8)
        gathered = comm.wait(comm.launch("allgather", payload, "bytes"))
        array = comm.wait(comm.launch("allgather", np.array([comm.rank], np.int64), "numpy"))
        return gathered, array

    for gathered, array in FakeWorld(2).run(body):
        assert gathered.dtype == torch.uint8 and gathered.tolist() == [250] * 3 + [251] * 3
        assert isinstance(array, np.ndarray) and array.dtype == np.int64
        assert array.tolist() == [0, 1]


def test_alltoall_sends_piece_j_to_rank_j():
    n = 4

    def body(comm):
        # Rank r sends [100 r + j, 100 r + j + 0.5] to rank j.
        pieces = [[100 * comm.rank + j, 100 * comm.rank + j + 0.5] for j in range(n)]
        return comm.wait(comm.launch("alltoall", torch.tensor(pieces).reshape(-1), "a2a"))

    for rank, out in enumerate(FakeWorld(n).run(body)):
        expected = [v for sender in range(n)
                    for v in (100 * sender + rank, 100 * sender + rank + 0.5)]
        assert out.tolist() == expected


def test_alltoall_on_numpy_arrays():
    def body(comm):
        return comm.wait(comm.launch("alltoall", np.arange(6) + 10 * comm.rank, "a2a"))

    out = FakeWorld(3).run(body)
    assert [o.tolist() for o in out] == [[0, 1, 10, 11, 20, 21], [2, 3, 12, 13, 22, 23],
                                         [4, 5, 14, 15, 24, 25]]


def test_alltoall_with_splits_sends_uneven_pieces():
    # splits[j]: what every rank sends rank j (the same list everywhere), as the sharded exchange
    # sends shard j's payload, whose size depends on the shard's segments.
    splits = (1, 3, 0, 2)

    def body(comm):
        pieces = [[50 * comm.rank + 10 * j + e for e in range(size)]
                  for j, size in enumerate(splits)]
        flat = torch.tensor([v for piece in pieces for v in piece], dtype=torch.uint8)
        return comm.wait(comm.launch("alltoall", flat, "a2a", splits=splits))

    for rank, out in enumerate(FakeWorld(4).run(body)):
        assert out.dtype == torch.uint8
        assert out.tolist() == [50 * sender + 10 * rank + e for sender in range(4)
                                for e in range(splits[rank])]


def test_allgather_with_splits_concatenates_uneven_pieces():
    splits = (2, 0, 3)

    def body(comm):
        mine = torch.full((splits[comm.rank],), comm.rank, dtype=torch.uint8)
        return comm.wait(comm.launch("allgather", mine, "ag", splits=splits))

    for out in FakeWorld(3).run(body):
        assert out.tolist() == [0, 0, 2, 2, 2]


@pytest.mark.parametrize("op, splits, tensor, match", [
    ("alltoall", (1, 2), torch.zeros(4), r"rank 0 sends 4 entries, its splits \(1, 2\) say 3"),
    ("allgather", (2, 2), torch.zeros(3), r"rank 0 sends 3 entries, its splits \(2, 2\) say 2"),
    ("alltoall", (4,), torch.zeros(4), r"expected 2 non-negative piece sizes"),
    ("allreduce_average", (2, 2), torch.zeros(2), "expected 2 non-negative piece sizes"),
])
def test_splits_that_do_not_describe_the_tensor_are_refused(op, splits, tensor, match):
    with pytest.raises(ValueError, match=match):
        FakeWorld(2, timeout=0.2).collectives(0).launch(op, tensor, "x", splits=splits)


def test_ranks_that_disagree_on_splits_raise():
    def body(comm):
        if comm.rank == 0:
            time.sleep(0.2)  # rank 1 registers the name first
            return comm.launch("alltoall", torch.zeros(3), "x", splits=(1, 2))
        return comm.launch("alltoall", torch.zeros(3), "x", splits=(2, 1))

    with pytest.raises(RuntimeError, match=r"rank 0 failed") as raised:
        FakeWorld(2, timeout=1.0).run(body)
    assert "rank 0 gives splits (1, 2), another rank (2, 1)" in str(raised.value.__cause__)


def test_allreduce_average_sums_in_rank_order_in_float32():
    # Column 0: float32 accumulation (1e8 + 1 rounds to 1e8; float64 would give 1/3).
    # Column 1: rank order (1e8 - 1e8 + 1; summed from the last rank it would give 0).
    columns = [[1e8, 1.0, -1e8], [1e8, -1e8, 1.0]]

    def body(comm):
        return comm.wait(comm.launch("allreduce_average",
                                     torch.tensor([c[comm.rank] for c in columns]), "avg"))

    for out in FakeWorld(3).run(body):
        assert out.dtype == torch.float32
        assert out.tolist() == [0.0, np.float32(1) / np.float32(3)]


def test_allreduce_average_keeps_float16_and_numpy():
    def body(comm):
        half = torch.tensor([1.0, 2.0 ** -14], dtype=torch.float16) * (comm.rank + 1)
        array = np.array([comm.rank, 1.0], np.float32)
        return (comm.wait(comm.launch("allreduce_average", half, "half")),
                comm.wait(comm.launch("allreduce_average", array, "array")))

    for half, array in FakeWorld(2).run(body):
        assert half.dtype == torch.float16 and half.tolist() == [1.5, 1.5 * 2.0 ** -14]
        assert isinstance(array, np.ndarray) and array.tolist() == [0.5, 1.0]


def test_results_are_tensors_on_the_input_device():
    def body(comm):
        mine = torch.ones(2)
        return mine, comm.wait(comm.launch("allreduce_average", mine, "x"))

    for mine, out in FakeWorld(2).run(body):
        assert out.device == mine.device and out.tolist() == [1, 1]
        assert out.data_ptr() != mine.data_ptr()


@pytest.mark.parametrize("op", ["allgather", "allreduce_average"])
def test_each_rank_gets_its_own_result(op):
    # As with Horovod, where each process owns its output: writing one rank's result in place
    # (an optimizer updating a gradient) must not change another rank's.
    barrier = threading.Barrier(2)

    def body(comm):
        out = comm.wait(comm.launch(op, torch.ones(2), "x"))
        barrier.wait()
        if comm.rank == 0:
            out.add_(1)
        barrier.wait()
        return out.tolist()

    assert FakeWorld(2).run(body)[1] == [1, 1] * (2 if op == "allgather" else 1)


def test_a_name_may_be_reused_each_step():
    def body(comm):
        return [comm.wait(comm.launch("allgather", torch.tensor([step * 10 + comm.rank]), "same"))
                .tolist() for step in range(3)]

    for out in FakeWorld(2).run(body):
        assert out == [[0, 1], [10, 11], [20, 21]]


def test_concurrent_collectives_match_by_name_not_by_order():
    # Rank 0 launches a then b, rank 1 b then a: names pair them up (threads do not block each
    # other here because each launch waits only for its own name's peers).
    order = {0: ["a", "b"], 1: ["b", "a"]}
    results = {}

    def launch(comm, name):
        results[comm.rank, name] = comm.wait(comm.launch(
            "allgather", torch.tensor([comm.rank + (0.5 if name == "b" else 0)]), name)).tolist()

    def body(comm):
        threads = [threading.Thread(target=launch, args=(comm, name)) for name in order[comm.rank]]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    FakeWorld(2, timeout=10).run(body)
    assert results[0, "a"] == results[1, "a"] == [0, 1]
    assert results[0, "b"] == results[1, "b"] == [0.5, 1.5]


def test_a_rank_that_never_joins_times_out():
    def body(comm):
        if comm.rank == 1:
            return "skipped"
        return comm.wait(comm.launch("allgather", torch.zeros(1), "lonely"))

    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 0 failed") as raised:
        FakeWorld(3, timeout=0.3).run(body)
    assert time.monotonic() - start < 10
    cause = raised.value.__cause__
    assert isinstance(cause, FakeTimeout)
    assert "'lonely'" in str(cause) and "never joined within 0.3 s" in str(cause)
    # Rank 2 joined, rank 1 did not: only rank 1 is named.
    assert "ranks [1]" in str(cause)


def test_mismatched_ops_under_one_name_raise():
    def body(comm):
        if comm.rank == 0:
            time.sleep(0.2)  # rank 1 registers the name first
            return comm.launch("alltoall", torch.zeros(2), "x")
        return comm.launch("allgather", torch.zeros(2), "x")

    with pytest.raises(RuntimeError, match=r"rank 0 failed") as raised:
        FakeWorld(2, timeout=1.0).run(body)
    assert "collective ('x', 0): rank 0 calls alltoall, another rank allgather" in str(
        raised.value.__cause__)


def test_unknown_op_and_empty_world_are_refused():
    with pytest.raises(ValueError, match=r"unknown collective 'broadcast'; expected one of"):
        FakeWorld(1).collectives(0).launch("broadcast", torch.zeros(1), "x")
    with pytest.raises(ValueError, match="at least one rank"):
        FakeWorld(0)


def test_exceptions_name_their_rank():
    def body(comm):
        if comm.rank == 2:
            raise KeyError("boom")
        return comm.rank

    with pytest.raises(RuntimeError, match=r"rank 2 failed: KeyError\('boom'\)"):
        FakeWorld(3).run(body)


def test_engines_get_distinct_scopes_per_rank():
    world = FakeWorld(2)
    first, second = world.collectives(0), world.collectives(1)
    assert [first.new_scope(), first.new_scope()] == ["squeeze0", "squeeze1"]
    assert second.new_scope() == "squeeze0"  # each rank counts its own, as processes do


def test_driver_runs_a_generator_over_the_fake():
    def exchange(rank):
        gathered = yield Collective("allgather", torch.tensor([float(rank)]), "one")
        averaged = yield Collective("allreduce_average", gathered * (rank + 1), "two")
        return averaged.tolist()

    def body(comm):
        flight = InFlight(comm, exchange(comm.rank), "job")
        assert not flight.done  # started: its first collective is in flight
        flight.resume()
        flight.resume()
        assert flight.done
        with pytest.raises(RuntimeError, match="has finished"):
            flight.resume()
        again = run_to_end(comm, exchange(comm.rank), "job")  # reuses the names
        return flight.result, again

    for result, again in FakeWorld(2).run(body):
        assert result == again == [0.0, 1.5]  # mean of [0, 1] and [0, 2]


def test_driver_passes_the_splits_on():
    def exchange(rank):
        sent = torch.arange(3, dtype=torch.float32) + 10 * rank  # 1 entry to rank 0, 2 to rank 1
        received = yield Collective("alltoall", sent, "uneven", splits=(1, 2))
        return received.tolist()

    assert FakeWorld(2).run(lambda comm: run_to_end(comm, exchange(comm.rank), "job")) == [
        [0.0, 10.0], [1.0, 2.0, 11.0, 12.0]]
