"""Checkpoints the way Horovod programs take them (horovod_squeeze.resume): state_dict() on rank 0
alone, load on rank 0 and hvd.broadcast_optimizer_state; a file per rank; every rank's state; and
ranks built differently. Every multi-rank test runs under a timeout that turns a hang into a
failure naming the stuck ranks."""
import numpy as np
import pytest

import horovod_squeeze as hs
from horovod_squeeze import resume
from horovod_squeeze.fake import FakeWorld
from horovod_squeeze.testing import RankFailed, run_on_ranks
from horovod_squeeze.torch.engine import SqueezeEngine

ALGORITHM = hs.DoubleSqueeze(hs.ScaledSign())
SHAPES = {"w": (40, 30), "v": (200,)}


# --- the decision, on in-process ranks ------------------------------------------------------------


def _engine(comm, algorithm=ALGORITHM):
    return SqueezeEngine(algorithm, list(SHAPES.items()), collectives=comm, min_compress_numel=0)


def _steps(engine, comm, steps):
    import torch

    for step in range(steps):
        for name, shape in SHAPES.items():
            seed = 17 * comm.rank + 1000 * (engine.step + step) + len(name)
            engine.submit(name, torch.from_numpy(
                np.random.default_rng(seed).standard_normal(shape).astype(np.float32)))
        for name in SHAPES:
            engine.result(name)


def _live(engine):
    return {i: {n: t.numpy().copy() for n, t in s.items()} for i, s in engine.state.items()}


def test_each_rank_restores_its_own_state_exactly():
    def body(comm):
        engine = _engine(comm)
        _steps(engine, comm, 3)
        saved, live = engine.local_state(), _live(engine)
        fresh = _engine(comm)
        fresh.load_later(saved)
        assert fresh.step == 0  # nothing is applied before the agreement
        fresh.agree()
        return live, _live(fresh), fresh.step

    for live, restored, step in FakeWorld(3).run(body):
        assert step == 3
        for index, tensors in live.items():
            for name, value in tensors.items():
                assert np.any(value != 0)
                np.testing.assert_array_equal(restored[index][name], value)


@pytest.mark.parametrize("loaders", [[0], [0, 1]], ids=["rank 0 alone", "ranks 0 and 1"])
def test_one_ranks_state_resets_every_rank_at_the_saved_step(loaders, caplog):
    # Rank 0's file loaded by rank 0 alone, or by ranks 0 and 1: no rank may take rank 0's
    # residuals, so every rank starts from zero state, at the saved step.
    def body(comm):
        engine = _engine(comm)
        _steps(engine, comm, 2)
        return engine.local_state()

    saved = FakeWorld(3).run(body)[0]

    def resumed(comm):
        engine = _engine(comm)
        if comm.rank in loaders:
            engine.load_later(saved)
        engine.agree()
        return engine.step, _live(engine)

    with caplog.at_level("WARNING", logger="horovod_squeeze"):
        results = FakeWorld(3).run(resumed)
    for step, live in results:
        assert step == 2
        assert all(not np.any(v) for tensors in live.values() for v in tensors.values())
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "every rank starts from zero state at step 2" in message
    assert "rank 0 loaded its own state of step 2" in message
    assert "rank 2 loaded none" in message


def test_ranks_that_loaded_different_steps_reset_at_the_latest():
    def body(comm):
        engine = _engine(comm)
        _steps(engine, comm, 2)
        saved = engine.local_state()
        fresh = _engine(comm)
        fresh.load_later({**saved, "step": 2 + comm.rank})  # rank r saved at step 2 + r
        fresh.agree()
        return fresh.step, _live(fresh)

    for step, live in FakeWorld(2).run(body):
        assert step == 3
        assert all(not np.any(v) for tensors in live.values() for v in tensors.values())


def test_ranks_built_differently_fail_together_at_the_first_step():
    def body(comm):
        algorithm = ALGORITHM if comm.rank == 0 else hs.DoubleSqueeze(hs.TopK(0.1))
        engine = _engine(comm, algorithm)
        with pytest.raises(ValueError, match=r"ranks \[1\] were built with another algorithm "
                                              r"than rank 0"):
            _steps(engine, comm, 1)
        return True

    assert FakeWorld(2, timeout=30).run(body) == [True, True]


def test_load_checks_what_it_is_given_before_anything_changes():
    def body(comm):
        engine = _engine(comm)
        _steps(engine, comm, 1)
        saved = engine.local_state()
        other = _engine(comm, hs.DoubleSqueeze(hs.TopK(0.1)))
        with pytest.raises(ValueError, match=r"comes from algorithm DoubleSqueeze\(ScaledSign"):
            other.load_later(saved)
        wrong = {**saved, "parameters": [("w", (30, 40)), ("v", (200,))]}
        with pytest.raises(ValueError, match="comes from another model"):
            _engine(comm).load_later(wrong)
        # After the agreement, another rank's state is refused rather than half-applied.
        late = _engine(comm)
        _steps(late, comm, 1)
        foreign = {**saved, "rank": 1 - comm.rank}
        with pytest.raises(ValueError, match="load it before the first step"):
            late.load_later(foreign)
        return late.step

    assert FakeWorld(2).run(body) == [1, 1]


def test_decide_is_a_pure_function_of_the_rows():
    config = [11, 22, 33, 44]
    keep = resume.decide([[resume.NOTHING, 5, *config]] * 2, 0)
    assert keep.action == "keep"
    restore = resume.decide([[resume.EVERY_RANK, 7, *config]] * 3, 1)
    assert restore == resume.Decision("restore", 7)
    mixed = resume.decide([[resume.OWN, 7, *config], [resume.EVERY_RANK, 7, *config]], 0)
    assert mixed.action == "reset" and mixed.step == 7
    with pytest.raises(ValueError, match=r"ranks \[2\] were built with another options"):
        resume.decide([[0, 0, *config], [0, 0, *config], [0, 0, 11, 22, 33, 45]], 0)


# --- Horovod's idioms, under horovodrun -------------------------------------------------------------


def _train(steps, *, save_at=None, path=None, idiom=None):
    """Rank body: a small classifier, SGD with momentum, DoubleSqueeze(ScaledSign()), built the
    Horovod way (broadcast_parameters, broadcast_optimizer_state). At ``save_at`` a checkpoint is
    taken and fresh objects restore it, per ``idiom``: ``"rank0"``: rank 0 alone saves
    state_dict() and alone loads it before the broadcasts; ``"per_rank"``: every rank saves and
    loads its own file; ``"all_ranks"``: every rank calls state_dict(all_ranks=True), rank 0
    saves it, every rank loads it. Returns the weights, the final loss, the engine's step (and
    before any step) and what was logged."""
    import logging

    import horovod.torch as hvd
    import torch

    import horovod_squeeze.torch as hst

    hvd.init()
    logged = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    logging.getLogger("horovod_squeeze").addHandler(handler)
    data = torch.randn(64 * hvd.size(), 20, generator=torch.Generator().manual_seed(3))
    target = (data[:, 0] + data[:, 1] > 0).long()
    x, y = data[hvd.rank()::hvd.size()], target[hvd.rank()::hvd.size()]
    rank0_only = idiom == "rank0"
    file = f"{path}.{hvd.rank()}" if idiom == "per_rank" else path

    def build(load=False):
        torch.manual_seed(3)
        model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(),
                                    torch.nn.Linear(64, 2))
        optimizer = hst.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
            named_parameters=model.named_parameters(), compression=ALGORITHM,
            min_compress_numel=0)
        if load and (hvd.rank() == 0 or not rank0_only):
            saved = torch.load(file, weights_only=False)
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        hvd.broadcast_optimizer_state(optimizer, root_rank=0)
        return model, optimizer

    def full_loss():
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(model(x), y))

    model, optimizer = build()
    fresh_step = optimizer.squeeze_engine.step  # broadcast_optimizer_state ran no exchange
    losses = {}
    for step in range(steps):
        if step == save_at:
            losses["at_save"] = full_loss()
            state = optimizer.state_dict(all_ranks=True) if idiom == "all_ranks" else None
            if hvd.rank() == 0 or idiom == "per_rank":
                if state is None:
                    state = optimizer.state_dict()  # rank 0 alone: never waits for the others
                torch.save({"model": model.state_dict(), "optimizer": state}, file)
            hvd.allreduce(torch.zeros(1), name="saved")  # the file exists before anyone reads it
            model, optimizer = build(load=True)
        batch = slice((step * 16) % 64, (step * 16) % 64 + 16)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
    return {"weights": {n: p.detach().numpy().copy() for n, p in model.named_parameters()},
            "loss": full_loss(), **losses, "step": optimizer.squeeze_engine.step, "fresh_step": fresh_step,
            "logged": logged}


def test_rank0_checkpoint_and_broadcast_resume_without_hanging(tmp_path):
    steps, save_at = 30, 12
    path = str(tmp_path / "checkpoint.pt")
    uninterrupted = run_on_ranks(_train, 2, "gloo", args=(steps,), timeout=180)
    resumed = run_on_ranks(_train, 2, "gloo", args=(steps,),
                           kwargs={"save_at": save_at, "path": path, "idiom": "rank0"},
                           timeout=180)
    for rank in range(2):
        assert resumed[rank]["fresh_step"] == 0
        assert resumed[rank]["step"] == uninterrupted[rank]["step"] == steps
        for name, value in resumed[0]["weights"].items():  # the ranks agree
            np.testing.assert_array_equal(resumed[rank]["weights"][name], value)
    # Residuals restart from zero: another trajectory, which goes on converging.
    assert any(np.any(resumed[0]["weights"][n] != w) for n, w in uninterrupted[0]["weights"].items())
    assert resumed[0]["loss"] < 0.5 * resumed[0]["at_save"]
    assert uninterrupted[0]["loss"] < 0.5 * resumed[0]["at_save"]
    assert any(f"zero state at step {save_at}" in line for line in resumed[0]["logged"])
    assert not resumed[1]["logged"]  # rank 0 reports it


@pytest.mark.parametrize("idiom", ["per_rank", "all_ranks"])
def test_exact_paths_resume_bit_for_bit(tmp_path, idiom):
    steps, save_at = 16, 7
    path = str(tmp_path / "checkpoint.pt")
    uninterrupted = run_on_ranks(_train, 2, "gloo", args=(steps,), timeout=180)
    resumed = run_on_ranks(_train, 2, "gloo", args=(steps,),
                           kwargs={"save_at": save_at, "path": path, "idiom": idiom},
                           timeout=180)
    for rank in range(2):
        assert not resumed[rank]["logged"]
        for name, value in uninterrupted[rank]["weights"].items():
            np.testing.assert_array_equal(resumed[rank]["weights"][name], value)


def _mismatched():
    import horovod.torch as hvd
    import torch

    import horovod_squeeze.torch as hst

    hvd.init()
    model = torch.nn.Linear(50, 40)
    compression = ALGORITHM if hvd.rank() == 0 else hs.ErrorFeedback(hs.ScaledSign())
    optimizer = hst.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                         named_parameters=model.named_parameters(),
                                         compression=compression, min_compress_numel=0)
    model(torch.ones(1, 50)).sum().backward()
    optimizer.step()


def test_ranks_built_differently_fail_with_a_clear_error_under_horovodrun():
    with pytest.raises(RankFailed, match="were built with another algorithm than rank 0"):
        run_on_ranks(_mismatched, 2, "gloo", timeout=120)
