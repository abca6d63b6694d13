"""Algorithm state in checkpoints (horovod_squeeze.checkpoint, through horovod_squeeze.torch.state)
on in-process ranks: gathered whole, restored exactly at the same world size, redistributed (worker
sums preserved, server state re-sharded) at another, serialized, and refused when incomplete."""
import numpy as np
import pytest
import torch

import horovod_squeeze as hs
from horovod_squeeze import checkpoint
from horovod_squeeze.fake import FakeWorld
from horovod_squeeze.torch import state as squeeze_state
from horovod_squeeze.torch.engine import SqueezeEngine

# Names as frameworks write them: TensorFlow's "scope/var:0", nested modules.
SHAPES = {"encoder/dense:0/kernel": (37, 11), "encoder/dense:0/bias": (37,),
          "decoder:1/w": (5, 37), "head/out:0": (64, 33)}
# Three buckets: head/out:0 alone, then decoder:1/w with encoder/dense:0/kernel, the bias plain.
LAYOUT = {"bucket_cap_mb": 0.005, "min_compress_numel": 100}
ALGORITHM = hs.DoubleSqueeze(hs.TopK(0.1))  # worker and server state


def gradient(name, rank, step):
    seed = sum(map(ord, name)) * 31 + rank * 7907 + step * 104_729
    return np.random.default_rng(seed).standard_normal(SHAPES[name]).astype(np.float32)


def _numpy(saved):
    """A gathered checkpoint with NumPy arrays (what horovod_squeeze.checkpoint works on)."""
    return {**saved, "state": {name: {**entry, "tensors": {
        p: t.numpy() if isinstance(t, torch.Tensor) else t for p, t in entry["tensors"].items()}}
        for name, entry in saved["state"].items()}}


def train(num_ranks, *, steps, start=0, saved=None, algorithm=ALGORITHM, exchange="sharded",
          learning_rate=None, precision="float32"):
    """Per rank: ``(records, gathered)`` after restoring ``saved`` (if given) and running steps
    ``start .. start + steps - 1`` (gradients in ``precision``); each record has the applied
    gradients and the live state."""

    def body(comm):
        engine = SqueezeEngine(algorithm, list(SHAPES.items()), collectives=comm,
                               exchange=exchange, learning_rate=learning_rate,
                               precision=precision, **LAYOUT)
        if saved is not None:
            assert squeeze_state.restore(engine, saved)
        records = [{"applied": None, "state": _live(engine)}]  # what was restored
        for step in range(start, start + steps):
            assert engine.step == step
            for name in reversed(list(SHAPES)):
                grad = gradient(name, comm.rank, step).astype(precision)
                engine.submit(name, torch.from_numpy(grad))
            records.append({"applied": {n: engine.result(n).numpy().copy() for n in SHAPES},
                            "state": _live(engine)})
        return records, _numpy(squeeze_state.gather(engine))

    return FakeWorld(num_ranks, timeout=60).run(body)


def _live(engine):
    return {i: {n: t.numpy().copy() for n, t in s.items()} for i, s in engine.state.items()}


def _assert_same_records(got, want):
    assert len(got) == len(want)
    for step, (a, b) in enumerate(zip(got, want)):
        for name in SHAPES if a["applied"] is not None and b["applied"] is not None else ():
            np.testing.assert_array_equal(a["applied"][name], b["applied"][name],
                                          err_msg=f"step {step} {name}")
        assert a["state"].keys() == b["state"].keys()
        for index in a["state"]:
            assert a["state"][index].keys() == b["state"][index].keys()
            for name in a["state"][index]:
                np.testing.assert_array_equal(a["state"][index][name], b["state"][index][name])


def _plan(num_ranks, exchange="sharded"):
    engine = SqueezeEngine(ALGORITHM, list(SHAPES.items()),
                           collectives=FakeWorld(num_ranks).collectives(0), exchange=exchange,
                           **LAYOUT)
    return engine.plan


@pytest.mark.parametrize("exchange", ["sharded", "allgather"])
def test_gathered_state_is_every_ranks_state_by_parameter(exchange):
    num_ranks, steps = 3, 2
    results = train(num_ranks, steps=steps, exchange=exchange)
    plan = _plan(num_ranks, exchange)
    saved = results[0][1]
    assert {k: v for k, v in saved.items() if k != "state"} == {
        "version": checkpoint.FORMAT_VERSION, "step": steps, "world_size": num_ranks,
        "learning_rate": None, "algorithm": repr(ALGORITHM), "exchange": exchange,
        "parameters": [(n, s) for b in plan.buckets if b.compressed
                       for n, s in zip(b.names, b.shapes)]}
    assert {n: (e["placement"], e["units"]) for n, e in saved["state"].items()} == {
        "worker_residual": ("worker", "gradient"), "server_residual": ("server", "gradient")}
    # Every rank gathers the same dict.
    for _, other in results[1:]:
        for name, entry in saved["state"].items():
            for param, array in entry["tensors"].items():
                np.testing.assert_array_equal(other["state"][name]["tensors"][param], array)
    compressed = [b for b in plan.buckets if b.compressed]
    assert len(compressed) == 2
    for name in ("worker_residual", "server_residual"):  # the plain bucket's bias has no state
        assert set(saved["state"][name]["tensors"]) == set(SHAPES) - {"encoder/dense:0/bias"}
    for bucket in compressed:
        for param, shape, start, stop in bucket.spans():
            workers = saved["state"]["worker_residual"]["tensors"][param]
            assert workers.shape == (num_ranks, *shape) and workers.dtype == np.float32
            for rank in range(num_ranks):
                live = results[rank][0][-1]["state"][bucket.index]["worker_residual"]
                np.testing.assert_array_equal(workers[rank].reshape(-1), live[start:stop])
            assert np.any(workers[0] != workers[1])  # ranks differ
            server = saved["state"]["server_residual"]["tensors"][param]
            assert server.shape == shape
            if exchange == "sharded":  # the shards, reassembled
                whole = np.concatenate([results[r][0][-1]["state"][bucket.index]["server_residual"]
                                        for r in range(num_ranks)])
            else:  # one replicated copy
                whole = results[0][0][-1]["state"][bucket.index]["server_residual"]
            np.testing.assert_array_equal(server.reshape(-1), whole[start:stop])
            assert np.any(server != 0)


@pytest.mark.parametrize("exchange", ["sharded", "allgather"])
def test_restore_at_the_same_size_continues_bitwise_identically(exchange):
    num_ranks = 3
    uninterrupted = train(num_ranks, steps=6, exchange=exchange)
    first = train(num_ranks, steps=3, exchange=exchange)
    saved = first[0][1]
    resumed = train(num_ranks, steps=3, start=3, saved=saved, exchange=exchange)
    for rank in range(num_ranks):
        records = uninterrupted[rank][0]
        _assert_same_records(first[rank][0], records[:4])  # the same run up to the checkpoint
        # Restored: the state at step 3 bit for bit, then the same steps.
        _assert_same_records(resumed[rank][0], records[3:])
        assert len(resumed[rank][0]) == 4


@pytest.mark.parametrize("exchange", ["sharded", "allgather"])
@pytest.mark.parametrize("old, new", [(4, 2), (2, 3)])
def test_restore_at_another_size_preserves_worker_sums_and_server_state(old, new, exchange):
    saved = train(old, steps=3, exchange=exchange)[0][1]
    moved = train(new, steps=0, saved=saved, exchange=exchange)
    again = moved[0][1]  # gathered from the new ranks, nothing run since
    assert again["world_size"] == new and again["step"] == 3
    for param, before in saved["state"]["worker_residual"]["tensors"].items():
        after = again["state"]["worker_residual"]["tensors"][param]
        assert before.shape[0] == old and after.shape == (new, *before.shape[1:])
        assert np.any(before != 0)
        np.testing.assert_allclose(after.sum(axis=0), before.sum(axis=0), rtol=1e-5, atol=1e-6)
        for rank in range(new):  # the old ranks' sum, divided evenly
            np.testing.assert_array_equal(after[rank], before.sum(axis=0) / np.float32(new))
    for param, before in saved["state"]["server_residual"]["tensors"].items():
        np.testing.assert_array_equal(again["state"]["server_residual"]["tensors"][param], before)
    # The live tensors: zero padding past the bucket, each sharded rank its own shard.
    plan = _plan(new, exchange)
    for rank in range(new):
        live = moved[rank][0][0]["state"]
        for bucket in plan.buckets:
            if not bucket.compressed:
                assert live[bucket.index] == {}
                continue
            worker = live[bucket.index]["worker_residual"]
            assert not np.any(worker[bucket.numel:])
            spec = ALGORITHM.state()[1]
            start, stop = plan.state_span(bucket, spec, rank)
            server = live[bucket.index]["server_residual"]
            assert not np.any(server[stop - start:])
    # Training goes on at the new size.
    continued = train(new, steps=2, start=3, saved=saved, exchange=exchange)
    assert all(np.all(np.isfinite(r[0][-1]["applied"]["head/out:0"])) for r in continued)


DORE = hs.DORE(hs.Ternary(block_size=64))


@pytest.mark.parametrize("exchange", ["sharded", "allgather"])
def test_dore_state_restores_bitwise_and_keeps_the_mean_shift_at_another_size(exchange):
    run = {"algorithm": DORE, "exchange": exchange, "learning_rate": lambda: 0.05}
    uninterrupted = train(3, steps=5, **run)
    saved = train(3, steps=3, **run)[0][1]
    assert {n: (e["placement"], e["units"]) for n, e in saved["state"].items()} == {
        "worker_shift": ("worker", "moment"), "server_shift": ("server", "moment"),
        "model_error": ("server", "model")}
    resumed = train(3, steps=2, start=3, saved=saved, **run)
    for rank in range(3):
        _assert_same_records(resumed[rank][0], uninterrupted[rank][0][3:])
    # At another size every rank starts from the mean shift, which is the server's shift h
    # (h = mean_i h_i holds at every step), and the server state is re-sharded unchanged.
    again = train(2, steps=0, saved=saved, **run)[0][1]
    for param, shifts in saved["state"]["worker_shift"]["tensors"].items():
        server = saved["state"]["server_shift"]["tensors"][param]
        np.testing.assert_allclose(shifts.mean(axis=0), server, rtol=1e-5, atol=1e-6)
        assert np.any(shifts[0] != shifts[1])
        for rank in range(2):
            np.testing.assert_array_equal(again["state"]["worker_shift"]["tensors"][param][rank],
                                          shifts.mean(axis=0))
    for name in ("server_shift", "model_error"):
        for param, before in saved["state"][name]["tensors"].items():
            assert np.any(before != 0)
            np.testing.assert_array_equal(again["state"][name]["tensors"][param], before)


@pytest.mark.parametrize("exchange", ["sharded", "allgather"])
def test_float64_state_restores_bitwise_through_serialization(exchange):
    run = {"algorithm": DORE, "exchange": exchange, "learning_rate": lambda: 0.05,
           "precision": "float64"}
    uninterrupted = train(2, steps=4, **run)
    saved = train(2, steps=2, **run)[0][1]
    for entry in saved["state"].values():
        for array in entry["tensors"].values():
            assert array.dtype == np.float64
    stored = checkpoint.deserialize(checkpoint.serialize(saved))
    assert stored["state"]["model_error"]["tensors"]["head/out:0"].dtype == np.float64
    resumed = train(2, steps=2, start=2, saved=stored, **run)
    for rank in range(2):
        _assert_same_records(resumed[rank][0], uninterrupted[rank][0][2:])
        assert resumed[rank][0][0]["state"][0]["worker_shift"].dtype == np.float64
    # A float32 checkpoint continues in a float64 run from exactly its values.
    saved32 = train(2, steps=2, **{**run, "precision": "float32"})[0][1]
    widened = train(2, steps=0, saved=saved32, **run)[0][1]
    for name, entry in saved32["state"].items():
        for param, array in entry["tensors"].items():
            restored = widened["state"][name]["tensors"][param]
            assert restored.dtype == np.float64
            np.testing.assert_array_equal(restored, array)


def test_serialize_round_trip_keeps_names_with_slashes_and_colons():
    saved = train(2, steps=2)[0][1]
    blob = checkpoint.serialize(saved)
    assert isinstance(blob, bytes)
    loaded = checkpoint.deserialize(blob)
    assert {k: v for k, v in loaded.items() if k != "state"} == {
        k: v for k, v in saved.items() if k != "state"}
    assert loaded["state"].keys() == saved["state"].keys()
    for name, entry in saved["state"].items():
        assert loaded["state"][name]["placement"] == entry["placement"]
        assert loaded["state"][name]["units"] == entry["units"]
        assert loaded["state"][name]["tensors"].keys() == entry["tensors"].keys()
        assert "encoder/dense:0/kernel" in entry["tensors"]
        for param, array in entry["tensors"].items():
            assert loaded["state"][name]["tensors"][param].dtype == array.dtype
            np.testing.assert_array_equal(loaded["state"][name]["tensors"][param], array)
    # What was serialized restores as the original does.
    direct = train(2, steps=1, start=2, saved=saved)
    via_bytes = train(2, steps=1, start=2, saved=loaded)
    for rank in range(2):
        _assert_same_records(via_bytes[rank][0], direct[rank][0])


def _fresh_engine(num_ranks=2, algorithm=ALGORITHM, rank=0, shapes=SHAPES):
    """An engine of one rank, for restoring (which needs no collectives)."""
    return SqueezeEngine(algorithm, list(shapes.items()),
                         collectives=FakeWorld(num_ranks).collectives(rank), **LAYOUT)


@pytest.fixture(scope="module")
def saved():
    return train(2, steps=2)[0][1]


def _without(saved, state=None, param=None):
    copy = {**saved, "state": {n: {**e, "tensors": dict(e["tensors"])}
                               for n, e in saved["state"].items()}}
    if param is None:
        del copy["state"][state]
    else:
        del copy["state"][state]["tensors"][param]
    return copy


def test_restore_refuses_a_checkpoint_without_a_state_name(saved):
    engine = _fresh_engine()
    with pytest.raises(ValueError, match=r"the checkpoint has no \['server_residual'\] state for "
                                         r"DoubleSqueeze\(.*\): it was saved by DoubleSqueeze"):
        squeeze_state.restore(engine, _without(saved, "server_residual"))
    assert engine.step == 0
    assert all(not torch.any(t) for s in engine.state.values() for t in s.values())


def test_restore_refuses_a_checkpoint_without_a_parameter(saved):
    with pytest.raises(ValueError, match=r"the checkpoint's worker_residual state has no "
                                         r"parameters \['decoder:1/w'\]"):
        squeeze_state.restore(_fresh_engine(), _without(saved, "worker_residual", "decoder:1/w"))


def test_restore_refuses_a_checkpoint_of_another_model(saved):
    other = {**saved, "parameters": [p for p in saved["parameters"] if p[0] != "decoder:1/w"]}
    other = _without(_without(other, "worker_residual", "decoder:1/w"), "server_residual",
                     "decoder:1/w")
    with pytest.raises(ValueError, match=r"the checkpoint has no state for parameters "
                                         r"\['decoder:1/w'\].* it comes from another model"):
        squeeze_state.restore(_fresh_engine(), other)


def test_restore_matches_renamed_parameters_by_position(saved):
    # A rebuilt model may name its parameters anew (Keras); the same shapes in the same order
    # restore by position.
    renamed = {f"renamed{i}": shape for i, shape in enumerate(SHAPES.values())}
    engine = _fresh_engine(rank=1, shapes=renamed)
    squeeze_state.restore(engine, saved)
    reference = _fresh_engine(rank=1)
    squeeze_state.restore(reference, saved)
    for index, tensors in reference.state.items():
        for name, tensor in tensors.items():
            assert torch.any(tensor != 0)
            torch.testing.assert_close(engine.state[index][name], tensor, rtol=0, atol=0)


def test_restore_refuses_wrong_shapes_and_versions(saved):
    bad = _without(saved, "server_residual", "head/out:0")
    bad["state"]["server_residual"]["tensors"]["head/out:0"] = np.zeros((33, 64), np.float32)
    with pytest.raises(ValueError, match=r"server_residual of 'head/out:0' has shape \(33, 64\), "
                                         r"expected \(64, 33\)"):
        squeeze_state.restore(_fresh_engine(), bad)
    with pytest.raises(ValueError, match="unsupported horovod_squeeze state version 1"):
        squeeze_state.restore(_fresh_engine(), {**saved, "version": 1})
    with pytest.raises(ValueError, match="unsupported horovod_squeeze state version None"):
        squeeze_state.restore(_fresh_engine(), {"state": {}})


def test_restore_drops_state_the_algorithm_does_not_use(saved):
    engine = _fresh_engine(algorithm=hs.ErrorFeedback(hs.TopK(0.1)))
    with pytest.warns(UserWarning, match=r"checkpoint state \['server_residual'\] .* is not used"):
        squeeze_state.restore(engine, saved)
    assert engine.step == 2
    kernel = saved["state"]["worker_residual"]["tensors"]["head/out:0"][0]
    np.testing.assert_array_equal(engine.state[0]["worker_residual"][:kernel.size].numpy(),
                                  kernel.reshape(-1))
