"""``hst.DecentralizedOptimizer`` on 4 MPI ranks (ring): every rank's model after every gossip step
against the NumPy reference fed the same local steps, plus the checks that keep a job from hanging:
a rank built differently, a rank with bad gradients, and a Gloo launch (no MPI to share)."""
import numpy as np
import pytest

import horovod_squeeze as hs
from horovod_squeeze import topology as T
from horovod_squeeze.reference.gossip import init_state, simulate_gossip
from horovod_squeeze.testing import RankFailed, run_on_ranks

ALGORITHMS = [hs.DPSGD(), hs.DeepSqueeze(hs.ScaledSign(), consensus_step=0.3),
              hs.ChocoSGD(hs.TopK(0.25), consensus_step=0.3)]
STEPS = 8


def _train(algorithms, steps):
    return _gossip_runs(algorithms, steps), _bad_gradients_on_rank_1(), _checkpoints()


def _gossip_runs(algorithms, steps):
    """Each algorithm in turn: a small network on this rank's own data; what every step sent
    (the parameters after the local step) and what the gossip step made of them."""
    import horovod.torch as hvd
    import torch

    import horovod_squeeze.torch as hst

    hvd.init()
    sent = []

    class RecordingSGD(torch.optim.SGD):
        def step(self, closure=None):  # the local step: record what gossip will send
            super().step(closure)
            sent.append(torch.cat([p.detach().reshape(-1) for p in self.param_groups[0]["params"]])
                        .numpy())

    out = []
    for algorithm in algorithms:
        sent = []
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
        optimizer = hst.DecentralizedOptimizer(
            RecordingSGD(model.parameters(), lr=0.1), model.named_parameters(),
            algorithm=algorithm, topology="ring")
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        flat = lambda: torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()
        generator = torch.Generator().manual_seed(hvd.rank())
        mixed = []
        for _ in range(steps):
            x = torch.randn(16, 6, generator=generator) + hvd.rank()   # each rank its own data
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), x[:, :2]).backward()
            optimizer.step()
            mixed.append(flat())
        out.append({"sent": sent, "mixed": mixed, "nbytes": optimizer.bytes_sent_per_step,
                    "sizes": [p.numel() for p in model.parameters()],
                    "distance": optimizer.consensus_distance(), "norms": optimizer.state_norms()})
    return out


def _checkpoints():
    """CHOCO-SGD for 3 steps, saved; (a) a copy loaded from this rank's own checkpoint steps
    exactly like the original; (b) one loaded from rank 0's restarts from zero state."""
    import copy

    import horovod.torch as hvd
    import torch

    import horovod_squeeze.torch as hst

    algorithm = hs.ChocoSGD(hs.TopK(0.25), consensus_step=0.3)

    def build():
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 3)
        return model, hst.DecentralizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                                 algorithm=algorithm, consensus_every=2)

    def train(model, optimizer, steps, seed):
        generator = torch.Generator().manual_seed(seed + hvd.rank())
        for _ in range(steps):
            optimizer.zero_grad()
            x = torch.randn(8, 6, generator=generator) + hvd.rank()
            torch.nn.functional.mse_loss(model(x), x[:, :3]).backward()
            optimizer.step()

    model, optimizer = build()
    train(model, optimizer, 3, seed=1)
    saved = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    train(model, optimizer, 2, seed=2)
    results = {"original": torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
               "distance": optimizer.last_consensus_distance}
    for case, checkpoint in (("own", saved), ("rank 0's", hvd.broadcast_object(saved, 0))):
        copy, copy_optimizer = build()
        copy.load_state_dict(checkpoint["model"])
        copy_optimizer.load_state_dict(checkpoint["optimizer"])
        train(copy, copy_optimizer, 2, seed=2)
        results[case] = torch.cat([p.detach().reshape(-1) for p in copy.parameters()])
        results[case + " step"] = copy_optimizer._gossip_step_count
    return results


def _bad_gradients_on_rank_1():
    """One step where rank 1's gradients are not finite, set directly and through AMP's
    GradScaler (which would skip step() on that rank alone): skip counts and weights."""
    import horovod.torch as hvd
    import torch

    import horovod_squeeze.torch as hst

    def build():
        model = torch.nn.Linear(3, 1, bias=False)
        with torch.no_grad():
            model.weight.fill_(float(hvd.rank()))
        return model, hst.DecentralizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.5),
                                                 algorithm=hs.DPSGD(), topology="ring")

    model, optimizer = build()
    model.weight.grad = torch.full((1, 3), float("nan") if hvd.rank() == 1 else 1.0)
    optimizer.step()
    out = {"plain": (optimizer.skipped_steps, model.weight.detach().reshape(-1).tolist())}

    model, optimizer = build()
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    loss = model(torch.ones(1, 3)).sum() * (float("inf") if hvd.rank() == 1 else 1.0)
    scaler.scale(loss).backward()            # gradients 4 x 1 (inf on rank 1), left scaled
    scaler.step(optimizer)
    scaler.update()
    out["scaler"] = (optimizer.skipped_steps, model.weight.detach().reshape(-1).tolist(),
                     scaler.get_scale())

    model, optimizer = build()
    model.weight.grad = torch.ones(1, 3)   # stale and finite: the closure's must be checked

    def closure():
        optimizer.zero_grad()
        loss = model(torch.ones(1, 3)).sum() * (float("nan") if hvd.rank() == 1 else 1.0)
        loss.backward()                      # gradients 1 (NaN on rank 1)
        return loss

    loss = optimizer.step(closure)
    out["closure"] = (optimizer.skipped_steps, model.weight.detach().reshape(-1).tolist(),
                      float(loss))
    return out


@pytest.fixture(scope="module")
def four_ranks():
    """One job of 4 MPI ranks for the tests that pass (each launch costs seconds of start-up)."""
    return run_on_ranks(_train, 4, "mpi", args=(ALGORITHMS, STEPS), timeout=240)


def test_every_rank_matches_the_reference_after_every_step(four_ranks):
    _check_against_the_reference([trained for trained, _, _ in four_ranks], ALGORITHMS, STEPS)


def test_eight_ranks_match_the_reference_after_every_step():
    algorithms = ALGORITHMS[1:]  # D-PSGD is DeepSqueeze's special case, checked on 4 ranks
    results = run_on_ranks(_gossip_runs, 8, "mpi", args=(algorithms, 4), timeout=300)
    _check_against_the_reference(results, algorithms, 4)


def _check_against_the_reference(results, algorithms, steps):
    """Every rank's model after every step of each algorithm against ``simulate_gossip`` on the
    ring, fed what the ranks sent; then the telemetry."""
    topology = T.ring(len(results))
    for index, algorithm in enumerate(algorithms):
        runs = [rank_results[index] for rank_results in results]
        sizes = runs[0]["sizes"]
        state = init_state(algorithm, sum(sizes), topology.size)
        for step in range(steps):
            expected, state = simulate_gossip(algorithm, topology.weights,
                                              [run["sent"][step] for run in runs], state,
                                              step=step, sizes=sizes)
            for rank, run in enumerate(runs):
                if isinstance(algorithm, hs.ChocoSGD):  # the same math, rounded differently
                    assert np.linalg.norm(run["mixed"][step] - expected[rank]) <= \
                        1e-6 * np.linalg.norm(expected[rank]), (algorithm, step, rank)
                    expected[rank] = run["mixed"][step]
                else:
                    np.testing.assert_array_equal(run["mixed"][step], expected[rank],
                                                  err_msg=f"{algorithm!r} step {step} rank {rank}")
        # Telemetry: two neighbours, a flag byte and the payload each; the distance is the
        # models' mean squared distance to their average.
        payload = algorithm.compressor.payload_nbytes(sum(sizes), tuple(sizes))
        assert all(run["nbytes"] == 2 * (1 + payload) for run in runs)
        models = np.stack([run["mixed"][-1] for run in runs]).astype(np.float64)
        distance = np.mean(np.sum((models - models.mean(axis=0)) ** 2, axis=1))
        assert runs[0]["distance"] == pytest.approx(distance, rel=1e-6)
        assert set(runs[0]["norms"]) == set(algorithm.state_names())


def test_each_ranks_own_checkpoint_restores_exactly_and_rank_0s_restarts_from_zero(four_ranks):
    for rank, (_, _, results) in enumerate(four_ranks):
        assert results["own step"] == results["rank 0's step"] == 5
        assert np.array_equal(results["own"].numpy(), results["original"].numpy()), rank
        # Rank 0's CHOCO state on every rank would break what neighbours believe of each other:
        # every rank restarts from zero public copies instead, so training goes another way.
        assert not np.array_equal(results["rank 0's"].numpy(), results["original"].numpy())
    # consensus_every=2: measured at step 4, the same on every rank.
    distances = {results["distance"] for _, _, results in four_ranks}
    assert len(distances) == 1 and distances.pop() > 0


def _misconfigured():
    import horovod.torch as hvd
    import torch

    import horovod_squeeze.torch as hst

    hvd.init()
    model = torch.nn.Linear(4 if hvd.rank() != 2 else 5, 1)   # rank 2 built another model
    hst.DecentralizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                               model.named_parameters(), algorithm=hs.DPSGD())
    return "built"


def test_a_rank_built_differently_is_an_error_on_every_rank():
    with pytest.raises(RankFailed, match=r"rank \d and its neighbour rank \d disagree on "
                                         r"(message_nbytes|sizes)"):
        run_on_ranks(_misconfigured, 4, "mpi", timeout=120)


@pytest.mark.parametrize("case", ["plain", "scaler", "closure"])
def test_bad_gradients_skip_that_ranks_local_step_and_it_still_gossips(four_ranks, case):
    results = [bad[case] for _, bad, _ in four_ranks]
    assert [result[0] for result in results] == [1 if rank == 1 else 0 for rank in range(4)]
    # After the local steps x_half = rank - 0.5 (GradScaler's scale of 4 divided out), except rank
    # 1 (kept 1.0); ring weights 1/3.
    x_half = [-0.5, 1.0, 1.5, 2.5]
    for rank, result in enumerate(results):
        expected = np.float32(sum(x_half[j] for j in (rank - 1, rank, (rank + 1) % 4)) / 3)
        np.testing.assert_allclose(result[1], [expected] * 3, rtol=1e-6)
    if case == "scaler":  # the overflowing rank backs its scale off, as GradScaler does
        assert [result[2] for result in results] == [4.0, 2.0, 4.0, 4.0]
    if case == "closure":  # step(closure) returns the closure's loss: 3 * rank before the step
        losses = [result[2] for result in results]
        assert losses[0] == 0.0 and np.isnan(losses[1]) and losses[2:] == [6.0, 9.0]


def _under_gloo():
    import horovod.torch as hvd
    import torch

    import horovod_squeeze.torch as hst

    hvd.init()
    model = torch.nn.Linear(3, 1)
    hst.DecentralizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), algorithm=hs.DPSGD())


def test_gloo_is_refused_with_the_launch_to_use():
    with pytest.raises(RankFailed, match=r"horovodrun --mpi -np 2"):
        run_on_ranks(_under_gloo, 2, "gloo", timeout=120)


def _keras_fit(algorithm, steps):
    """``model.fit`` with DecentralizedCallback; what each batch's local step left (recorded by a
    callback placed before it) and what gossip made of it."""
    import os

    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import horovod.tensorflow as hvd
    import numpy as np
    import tensorflow as tf

    import horovod_squeeze.tensorflow.keras as hsk

    hvd.init()
    tf.random.set_seed(0)
    model = tf.keras.Sequential([tf.keras.Input((6,)), tf.keras.layers.Dense(5, activation="tanh"),
                                 tf.keras.layers.Dense(2)])
    model.compile(optimizer=tf.keras.optimizers.SGD(0.1), loss="mse")
    flat = lambda: np.concatenate([v.numpy().reshape(-1) for v in model.trainable_variables])
    sent, mixed = [], []
    record = tf.keras.callbacks.LambdaCallback(on_train_batch_end=lambda *_: sent.append(flat()))
    after = tf.keras.callbacks.LambdaCallback(on_train_batch_end=lambda *_: mixed.append(flat()))
    gossip = hsk.callbacks.DecentralizedCallback(algorithm, topology="ring")
    x = np.random.default_rng(hvd.rank()).standard_normal((16 * steps, 6)).astype(np.float32)
    model.fit(x + hvd.rank(), x[:, :2], batch_size=16, epochs=1, shuffle=False, verbose=0,
              callbacks=[hsk.callbacks.BroadcastGlobalVariablesCallback(0), record, gossip, after])
    # A checkpoint: Gossip over a copy of the weights, loaded from it, steps as the original.
    from horovod_squeeze.tensorflow import Gossip

    copies = [tf.Variable(v) for v in model.trainable_variables]
    restored = Gossip(copies, algorithm, "ring")
    restored.load_state_dict(gossip.gossip.state_dict())
    gossip.gossip()
    restored()
    return {"sent": sent, "mixed": mixed, "sizes": [int(np.prod(v.shape))
                                                    for v in model.trainable_variables],
            "nbytes": gossip.gossip.bytes_sent_per_step, "restored_step": restored.step,
            "restored_equal": all(np.array_equal(a.numpy(), b.numpy())
                                  for a, b in zip(model.trainable_variables, copies))}


def test_keras_fit_gossips_like_the_reference():
    algorithm = hs.DeepSqueeze(hs.ScaledSign(), consensus_step=0.3)
    runs = run_on_ranks(_keras_fit, 4, "mpi", args=(algorithm, STEPS), timeout=240)
    sizes = runs[0]["sizes"]
    state = init_state(algorithm, sum(sizes), 4)
    for step in range(STEPS):
        expected, state = simulate_gossip(algorithm, T.ring(4).weights,
                                          [run["sent"][step] for run in runs], state, step=step,
                                          sizes=sizes)
        for rank, run in enumerate(runs):
            np.testing.assert_array_equal(run["mixed"][step], expected[rank],
                                          err_msg=f"step {step} rank {rank}")
    payload = algorithm.compressor.payload_nbytes(sum(sizes), tuple(sizes))
    assert all(run["nbytes"] == 2 * (1 + payload) for run in runs)
    assert all(run["restored_equal"] and run["restored_step"] == STEPS + 1 for run in runs)


def test_lbfgs_is_refused_since_its_closure_is_evaluated_once():
    import torch

    import horovod_squeeze.torch as hst

    model = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match="LBFGS re-evaluates its closure"):
        hst.DecentralizedOptimizer(torch.optim.LBFGS(model.parameters()), algorithm=hs.DPSGD())
