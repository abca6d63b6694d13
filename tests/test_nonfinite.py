"""NaN or Inf gradients on some ranks: every rank skips the step, the state is unchanged, AMP's
GradScaler keeps working; never an error on one rank while the others wait."""
import numpy as np
import pytest

import horovod_squeeze as hs
from horovod_squeeze.fake import FakeWorld
from horovod_squeeze.testing import run_on_ranks
from horovod_squeeze.torch.engine import SqueezeEngine

SHAPES = {"w": (40, 30), "v": (300,), "b": (7,)}  # b: the uncompressed bucket


def _gradient(name, rank, step):
    seed = 31 * len(name) + 7 * rank + 1000 * step
    return np.random.default_rng(seed).standard_normal(SHAPES[name]).astype(np.float32)


@pytest.mark.parametrize("algorithm, exchange", [
    (hs.DoubleSqueeze(hs.ScaledSign()), "sharded"),
    (hs.ErrorFeedback(hs.TopK(0.1)), "allgather"),
    (hs.DORE(hs.Ternary()), "sharded"),
    (hs.DoubleSqueeze(hs.RandK(0.2, seed=1)), "allreduce"),
], ids=str)
@pytest.mark.parametrize("poison", [np.nan, np.inf], ids=["nan", "inf"])
def test_a_non_finite_step_is_skipped_on_every_rank_as_if_it_never_happened(
        algorithm, exchange, poison, caplog):
    import torch

    bad_step, bad_rank = 2, 1

    def body(comm, poisoned):  # the clean run skips the bad step's data
        engine = SqueezeEngine(algorithm, list(SHAPES.items()), collectives=comm,
                               exchange=exchange, learning_rate=lambda: 0.1,
                               min_compress_numel=100)
        applied, skipped = [], []
        for step in range(5) if poisoned else (0, 1, 3, 4):
            for name in reversed(list(SHAPES)):
                grad = _gradient(name, comm.rank, step)
                if poisoned and step == bad_step and comm.rank == bad_rank and name == "w":
                    grad[3, 4] = poison
                engine.submit(name, torch.from_numpy(grad))
            applied.append({n: engine.result(n).numpy().copy() for n in SHAPES})
            skipped.append(engine.skipped_last_step)
        state = {i: {n: t.numpy().copy() for n, t in s.items()} for i, s in engine.state.items()}
        return applied, skipped, state, engine.step, engine.skipped_steps

    with caplog.at_level("WARNING", logger="horovod_squeeze"):
        poisoned = FakeWorld(3).run(lambda comm: body(comm, True))
    clean = FakeWorld(3).run(lambda comm: body(comm, False))
    for rank in range(3):
        applied, skipped, state, step, count = poisoned[rank]
        assert skipped == [False, False, True, False, False] and count == 1 and step == 4
        assert all(np.all(np.isnan(a)) for a in applied[bad_step].values())
        # Everything else is what a run without the bad step's data gives, bit for bit.
        reference, _, clean_state, clean_step, _ = clean[rank]
        assert step == clean_step
        for got, want in zip(applied[:bad_step] + applied[bad_step + 1:], reference):
            for name in SHAPES:
                np.testing.assert_array_equal(got[name], want[name])
        for index, tensors in clean_state.items():
            for name, value in tensors.items():
                np.testing.assert_array_equal(state[index][name], value)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("NaN or Inf in the gradients of rank(s) [1]" in m for m in messages) == 1


def _train_amp(steps, bad_step, scaler_kind):
    """Rank body: a classifier under AMP's GradScaler (CPU) or plain SGD; rank 0's loss is Inf at
    ``bad_step``. Returns per step the scale and whether the weights changed, and the weights."""
    import horovod.torch as hvd
    import torch

    import horovod_squeeze.torch as hst

    hvd.init()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
    optimizer = hst.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        named_parameters=model.named_parameters(), compression=hs.DoubleSqueeze(hs.ScaledSign()),
        min_compress_numel=0)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if scaler_kind == "amp" else None
    data = torch.randn(64, 20, generator=torch.Generator().manual_seed(hvd.rank()))
    target = (data[:, 0] > 0).long()
    record = []
    for step in range(steps):
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(data), target)
        if step == bad_step and hvd.rank() == 0:
            loss = loss * float("inf")
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            optimizer.synchronize()
            scaler.unscale_(optimizer)
            with optimizer.skip_synchronize():
                scaler.step(optimizer)
            scaler.update()
        changed = any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
        record.append((None if scaler is None else scaler.get_scale(), changed))
    weights = [p.detach().numpy().copy() for p in model.parameters()]
    return record, weights, optimizer.squeeze_engine.skipped_steps


@pytest.mark.parametrize("scaler_kind", ["amp", "plain"])
def test_an_overflow_on_one_rank_skips_the_step_everywhere_under_horovodrun(scaler_kind):
    steps, bad_step = 6, 3
    results = run_on_ranks(_train_amp, 2, "gloo", args=(steps, bad_step, scaler_kind),
                           timeout=180)
    for record, weights, skipped in results:
        assert skipped == 1
        assert [changed for _, changed in record] == [i != bad_step for i in range(steps)]
        if scaler_kind == "amp":  # halved once, at the overflow
            scales = [scale for scale, _ in record]
            assert scales == [1024.0] * bad_step + [512.0] * (steps - bad_step)
        assert all(np.all(np.isfinite(w)) for w in weights)
        for mine, theirs in zip(weights, results[0][1]):
            np.testing.assert_array_equal(mine, theirs)


@pytest.mark.parametrize("algorithm, exchange", [
    (hs.DoubleSqueeze(hs.ScaledSign()), "sharded"),
    (hs.DORE(hs.Ternary()), "allgather"),
], ids=str)
def test_tensorflow_skips_a_non_finite_step_on_every_rank(algorithm, exchange):
    import tensorflow as tf

    from horovod_squeeze.tensorflow.engine import SqueezeEngine as TFEngine

    bad_step, names = 1, list(SHAPES)

    def body(comm, poisoned):
        engine = TFEngine(algorithm, list(SHAPES.items()), collectives=comm, exchange=exchange,
                          learning_rate=lambda: 0.1, min_compress_numel=100)
        applied, skipped = [], []
        for step in range(4) if poisoned else (0, 2, 3):
            grads = [_gradient(n, comm.rank, step) for n in names]
            if poisoned and step == bad_step and comm.rank == 0:
                grads[0][0, 0] = np.inf
            applied.append([a.numpy() for a in engine([tf.constant(g) for g in grads])])
            skipped.append(bool(engine.last_skipped.numpy()))
        state = {i: {n: v.numpy() for n, v in s.items()} for i, s in engine.state.items()}
        return applied, skipped, state, int(engine.step.numpy()), int(engine.skipped_steps.numpy())

    poisoned = FakeWorld(2, timeout=120).run(lambda comm: body(comm, True))
    clean = FakeWorld(2, timeout=120).run(lambda comm: body(comm, False))
    for rank in range(2):
        applied, skipped, state, step, count = poisoned[rank]
        assert skipped == [False, True, False, False] and count == 1 and step == 3
        assert all(np.all(np.isnan(a)) for a in applied[bad_step])
        reference, _, clean_state, _, _ = clean[rank]
        for got, want in zip(applied[:bad_step] + applied[bad_step + 1:], reference):
            for a, b in zip(got, want):
                np.testing.assert_array_equal(a, b)
        for index, tensors in clean_state.items():
            for name, value in tensors.items():
                np.testing.assert_array_equal(state[index][name], value)


def _keras_fit_with_inf(batches, bad_batch):
    """Rank body: Keras fit, SGD with momentum, DoubleSqueeze; rank 0's input is Inf in one
    batch. Returns whether the weights changed per batch, the final weights, skipped steps."""
    import os

    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import horovod.tensorflow.keras as hvd
    import tensorflow as tf

    import horovod_squeeze.tensorflow.keras as hsk

    hvd.init()
    tf.keras.utils.set_random_seed(0)
    x = np.random.default_rng(hvd.rank()).standard_normal((batches * 8, 20)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    if hvd.rank() == 0:
        x[bad_batch * 8, 3] = np.inf
    model = tf.keras.Sequential([tf.keras.layers.Dense(64, activation="relu"),
                                 tf.keras.layers.Dense(2)])
    model.build((None, 20))
    optimizer = hsk.DistributedOptimizer(tf.keras.optimizers.SGD(0.1, momentum=0.9),
                                         compression=hs.DoubleSqueeze(hs.ScaledSign()),
                                         min_compress_numel=0)
    model.compile(optimizer=optimizer, loss=tf.keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    changed = []

    class Watch(tf.keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.before = [w.copy() for w in model.get_weights()]

        def on_train_batch_end(self, batch, logs=None):
            changed.append(any(not np.array_equal(a, b)
                               for a, b in zip(self.before, model.get_weights())))

    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[hsk.callbacks.BroadcastGlobalVariablesCallback(0), Watch()])
    return changed, model.get_weights(), int(optimizer.squeeze_engine.skipped_steps.numpy())


def test_keras_fit_skips_an_inf_batch_on_every_rank():
    batches, bad_batch = 5, 2
    results = run_on_ranks(_keras_fit_with_inf, 2, "gloo", args=(batches, bad_batch), timeout=180)
    for changed, weights, skipped in results:
        assert changed == [i != bad_batch for i in range(batches)] and skipped == 1
        assert all(np.all(np.isfinite(w)) for w in weights)
        for mine, theirs in zip(weights, results[0][1]):
            np.testing.assert_array_equal(mine, theirs)
