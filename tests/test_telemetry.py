"""Framework-neutral telemetry: per-parameter state norms and per-step bytes, against direct
computations and against what the collectives actually carried."""
import numpy as np
import pytest
import torch

import horovod_squeeze as hs
from horovod_squeeze.buckets import Bucket
from horovod_squeeze.exchange import PLAIN, PassBytes, fp32_allreduce_bytes, shard_numel
from horovod_squeeze.fake import FakeWorld
from horovod_squeeze.plan import EngineOptions, Plan
from horovod_squeeze.telemetry import StepStats, state_norms
from horovod_squeeze.torch.engine import SqueezeEngine


def test_state_norms_place_the_server_shard_at_its_offset():
    plan = Plan(hs.DoubleSqueeze(hs.ScaledSign()), [("a", (5, 3)), ("b", (9,))], 2,
                EngineOptions(min_compress_numel=0))
    (bucket,) = plan.buckets  # reversed registration order: b at offset 0, a at offset 9
    assert bucket.names == ["b", "a"] and bucket.numel == 24
    layout = plan.state_layout(bucket)
    assert layout == {"worker_residual": 2 * 16, "server_residual": 16}  # shards of 16 entries
    rng = np.random.default_rng(3)
    worker = rng.standard_normal(layout["worker_residual"]).astype(np.float32)
    shard = rng.standard_normal(layout["server_residual"]).astype(np.float32)
    shard[8:] = 0  # rank 1 owns entries 16..31 of which 16..23 are real
    norms = state_norms(plan, {0: {"worker_residual": worker, "server_residual": shard}}, rank=1)
    placed = np.concatenate([np.zeros(16, np.float32), shard])
    assert norms == {
        "b": {"worker_residual": float(np.linalg.norm(worker[0:9])),
              "server_residual": float(np.linalg.norm(placed[0:9]))},
        "a": {"worker_residual": float(np.linalg.norm(worker[9:24])),
              "server_residual": float(np.linalg.norm(placed[9:24]))}}
    assert norms["b"]["server_residual"] == 0.0 and norms["a"]["server_residual"] > 0
    # Rank 0 owns entries 0..15: b whole and the first 7 of a.
    norms0 = state_norms(plan, {0: {"worker_residual": worker, "server_residual": shard}}, rank=0)
    np.testing.assert_allclose(norms0["a"]["server_residual"], np.linalg.norm(shard[9:16]),
                               rtol=1e-6)


def test_state_norms_cover_every_parameter_and_state_name():
    plan = Plan(hs.ErrorFeedback(hs.TopK(0.1)), [("big", (2000,)), ("bias", (10,))], 4,
                EngineOptions(exchange="allgather"))
    state = {0: {"worker_residual": np.full(2000, 2.0, np.float32)}, 1: {}}
    # The uncompressed parameter has no state; ErrorFeedback has no server state.
    assert state_norms(plan, state, rank=3) == {
        "big": {"worker_residual": pytest.approx(2.0 * np.sqrt(2000))}, "bias": {}}
    no_state = Plan(hs.NoFeedback(hs.TopK(0.1)), [("big", (2000,))], 4)
    assert state_norms(no_state, {0: {}}, rank=0) == {"big": {}}


def test_dore_reports_the_norms_of_its_shifts_and_model_error():
    plan = Plan(hs.DORE(hs.Ternary()), [("big", (2000,))], 4, EngineOptions(exchange="sharded"))
    layout = plan.state_layout(plan.buckets[0])
    # Shards of 504 (whole bytes of bits); the worker's covers every shard.
    assert layout == {"worker_shift": 2016, "server_shift": 504, "model_error": 504}
    state = {0: {"worker_shift": np.full(2016, 1.0, np.float32),
                 "server_shift": np.full(504, 2.0, np.float32),
                 "model_error": np.full(504, 3.0, np.float32)}}
    # Rank 1 owns entries 504..1007: h and e over that part only; h_i over the real entries.
    assert state_norms(plan, state, rank=1) == {"big": {
        "worker_shift": pytest.approx(np.sqrt(2000)),
        "server_shift": pytest.approx(2 * np.sqrt(504)),
        "model_error": pytest.approx(3 * np.sqrt(504))}}


def test_step_bytes_plain_or_compressed():
    algorithm = hs.DoubleSqueeze(hs.ScaledSign())
    plan = Plan(algorithm, [("w", (4000,)), ("bias", (10,))], 4)
    big, small = plan.buckets
    assert big.compressed and not small.compressed and small.exchange is PLAIN
    ring = PassBytes(fp32_allreduce_bytes(4000, 4), fp32_allreduce_bytes(4000, 4), 0, 0)
    small_ring = PassBytes(fp32_allreduce_bytes(10, 4), fp32_allreduce_bytes(10, 4), 0, 0)
    # Warming up: everything is a plain fp32 allreduce.
    assert plan.step_bytes(warm=True) == ring + small_ring
    assert PLAIN.pass_bytes(algorithm, big, 4) == ring
    # Compressed: 1 bit per entry of each 1000-entry shard plus a float32 scale, both ways.
    shard = shard_numel(4000, 4)
    assert shard == 1000
    one_way = 3 * (shard // 8 + 4)
    assert plan.step_bytes(warm=False) == PassBytes(one_way, one_way, one_way, one_way) + small_ring
    assert plan.fp32_bytes == fp32_allreduce_bytes(4010, 4)


def test_pass_bytes_of_each_exchange():
    n, numel = 4, 100_000
    sign = hs.ScaledSign()
    shard = shard_numel(numel, n)
    bucket = Bucket(0, ["w"], [(numel,)], hs.Sharded())
    # ErrorFeedback's average comes back exactly: float32 in pass 2 of the sharded exchange.
    assert hs.Sharded().pass_bytes(hs.ErrorFeedback(sign), bucket, n) == PassBytes(
        3 * (shard // 8 + 4), 3 * (shard // 8 + 4), 3 * 4 * shard, 3 * 4 * shard)
    assert hs.Sharded().pass_bytes(hs.ErrorFeedback(sign, server=sign), bucket, n) == \
        hs.Sharded().pass_bytes(hs.DoubleSqueeze(sign), bucket, n)
    # One pass: every rank's whole payload to the n - 1 others; nothing comes back.
    assert hs.Allgather().pass_bytes(hs.DoubleSqueeze(sign), bucket, n) == PassBytes(
        3 * (numel // 8 + 4), 3 * (numel // 8 + 4), 0, 0)
    # An allreduce moves only the summed values: RandK's 4-byte stream key stays home.
    assert hs.Allreduce().pass_bytes(hs.ErrorFeedback(hs.RandK(0.01)), bucket, n).pass1_sent \
        == 2 * 3 * 4000 // 4


def test_sharded_pass_bytes_count_each_shards_segments_per_rank():
    # Tensors of 10 and 20 entries on 2 ranks: shards of 16, rank 0's holds both tensors (two
    # scales), rank 1's the rest of the second (one scale, 14 real entries, 2 of padding).
    bucket = Bucket(0, ["a", "b"], [(10,), (20,)], hs.Sharded())
    algorithm = hs.DoubleSqueeze(hs.ScaledSign())
    shard0, shard1 = 2 * 4 + 2, 4 + 2  # scales + ceil(16 / 8) and ceil(14 / 8) sign bytes
    assert hs.Sharded().pass_bytes(algorithm, bucket, 2, rank=0) == PassBytes(
        shard1, shard0, shard0, shard1)
    assert hs.Sharded().pass_bytes(algorithm, bucket, 2, rank=1) == PassBytes(
        shard0, shard1, shard1, shard0)
    # With one scale per shard (the old layout) both ranks would send 2 * (4 + 2) bytes.
    assert hs.Allgather().pass_bytes(algorithm, bucket, 2) == PassBytes(2 * 4 + 4, 12, 0, 0)


class _Counting:
    """FakeWorld collectives that count the bytes this rank sends and receives per pass."""

    def __init__(self, comm):
        self._comm, self.rank, self.size = comm, comm.rank, comm.size
        self.sent, self.received = {}, {}

    def new_scope(self):
        return self._comm.new_scope()

    def launch(self, op, tensor, name, splits=None):
        output = self._comm.launch(op, tensor, name, splits=splits)
        n, nbytes = self.size, tensor.numel() * tensor.element_size()
        out_bytes = output.numel() * output.element_size()
        if op == "alltoall":  # my piece for myself does not travel; I receive n equal pieces
            mine = nbytes // n if splits is None else splits[self.rank] * tensor.element_size()
            sent, received = nbytes - mine, out_bytes - out_bytes // n
        elif op == "allgather":
            sent, received = (n - 1) * nbytes, out_bytes - nbytes
        else:  # a ring allreduce
            sent = received = 2 * (n - 1) * nbytes // n
        # The control collectives (the first step's agreement, every step's non-finite flags)
        # carry a few bytes outside the exchange's accounting.
        kind = ("control" if name.endswith((".agree.rows", ".finite.flags")) else
                "pass2" if name.endswith("pass2") else "pass1")
        self.sent[kind] = self.sent.get(kind, 0) + sent
        self.received[kind] = self.received.get(kind, 0) + received
        return output

    def wait(self, handle):
        return self._comm.wait(handle)


@pytest.mark.parametrize("algorithm, exchange", [
    (hs.DoubleSqueeze(hs.ScaledSign()), "sharded"),
    (hs.ErrorFeedback(hs.TopK(0.05)), "sharded"),
    (hs.ErrorFeedback(hs.ScaledSign(), server=hs.TopK(0.1)), "sharded"),
    (hs.NoFeedback(hs.QSGD(4)), "allgather"),
    (hs.DoubleSqueeze(hs.RandK(0.1)), "allreduce"),
    (hs.DORE(hs.Ternary()), "sharded"),
    (hs.DoubleQuantization(b=4, b_x=8), "sharded"),
], ids=str)
def test_step_stats_bytes_are_what_the_collectives_carried(algorithm, exchange):
    shapes = [("w1", (300, 7)), ("w2", (999,)), ("bias", (30,))]
    warmup = 1

    def body(comm):
        counting = _Counting(comm)
        engine = SqueezeEngine(algorithm, shapes, collectives=counting, exchange=exchange,
                               bucket_cap_mb=0.005, min_compress_numel=100, warmup_steps=warmup,
                               learning_rate=lambda: 0.1)  # read by model-increment algorithms
        stats = []
        for step in range(2):
            counting.sent, counting.received = {}, {}
            for name, shape in reversed(shapes):
                engine.submit(name, torch.randn(shape, generator=torch.Generator().manual_seed(
                    step * 10 + comm.rank)))
            for name, _ in shapes:
                engine.result(name)
            carried = PassBytes(counting.sent.get("pass1", 0), counting.received.get("pass1", 0),
                                counting.sent.get("pass2", 0), counting.received.get("pass2", 0))
            stats.append((engine.last_stats, carried, counting.sent.get("control", 0)))
        return stats

    for rank_stats in FakeWorld(3).run(body):
        for step, (stats, carried, control) in enumerate(rank_stats):
            assert isinstance(stats, StepStats) and stats.step == step
            assert stats.bytes == carried, f"step {step}"
            # A float32 flag to each other rank, and at the first step the agreement's row.
            flag = 2 * 4
            assert control == (flag + 2 * 8 * 6 if step == 0 else flag), f"step {step}"
            assert stats.fp32_allreduce_bytes == fp32_allreduce_bytes(2100 + 999 + 30, 3)
            assert stats.compress_seconds >= 0 and stats.communicate_seconds >= 0
        warm, compressed = rank_stats[0][0], rank_stats[1][0]
        assert warm.bytes.sent == warm.fp32_allreduce_bytes  # plain during warm-up
        # Even ErrorFeedback's fp32 pass 2 sends less than the ring's two fp32 passes.
        assert compressed.bytes.sent < warm.bytes.sent and compressed.compression_ratio > 1.5
