"""An algorithm whose output is a model increment: the PyTorch DistributedOptimizer, the Keras
DistributedOptimizer and DistributedGradientTape apply it (the wrapped optimizer's own step does
not run) and its stages see the learning rate; every binding refuses any optimizer but plain SGD.

``SGDIncrement``'s increment is exactly ``-lr * mean_i(g_i)``, so every run is plain SGD, checked
against NumPy."""
import dataclasses
import re

import numpy as np
import pytest

import horovod_squeeze as hs
from horovod_squeeze.algorithms import MODEL, SERVER, ServerOut, StateSpec
from horovod_squeeze.testing import run_on_ranks
from model_increment_algorithm import SGDIncrement

INCREMENT = SGDIncrement(hs.Identity())


@dataclasses.dataclass(frozen=True, repr=False)
class RateRecordingIncrement(SGDIncrement):
    """SGDIncrement that also keeps, as server state, the learning rate its last step saw: the
    tape divides the increment by the rate, so SGDIncrement's own weights cannot tell a wrong
    one."""

    def state(self):
        return (StateSpec("rate", SERVER, MODEL),)

    def server_stage(self, codec, pieces, state, ctx):
        out = super().server_stage(codec, pieces, state, ctx)
        return ServerOut(out.payload, out.decoded,
                         {"rate": state["rate"] * 0.0 + ctx.learning_rate})


# --- PyTorch -------------------------------------------------------------------------------------


def _train_torch(steps, lr, configs):
    """Rank body: for each config (SGD's weight_decay, the wrapper's options), ``steps`` steps of
    SGDIncrement on known gradients from the same nonzero start; the final parameters."""
    import horovod.torch as hvd
    import torch

    import horovod_squeeze.torch as hst

    hvd.init()
    results = []
    for weight_decay, options in configs:
        start = torch.from_numpy(_torch_start())
        # 3000 entries through the algorithm, 10 through the plain bucket (below
        # min_compress_numel), the first step warm.
        big = torch.nn.Parameter(start[:3000].clone())
        small = torch.nn.Parameter(start[3000:].clone())
        optimizer = hst.DistributedOptimizer(
            torch.optim.SGD([big, small], lr=lr, weight_decay=weight_decay),
            named_parameters=[("big", big), ("small", small)], compression=INCREMENT,
            warmup_steps=1, **options)
        for step in range(steps):
            optimizer.zero_grad()
            grad = torch.from_numpy(_torch_gradient(step, hvd.rank()))
            ((big * grad[:3000]).sum() + (small * grad[3000:]).sum()).backward()
            optimizer.step()
        results.append(torch.cat([big.detach(), small.detach()]).numpy())
    return results


def _torch_start():
    return np.random.default_rng(7).standard_normal(3010).astype(np.float32)


def _torch_gradient(step, rank):
    return np.random.default_rng(100 * step + rank).standard_normal(3010).astype(np.float32)


def _torch_reference(steps, lr, weight_decay, num_proc):
    """``x -= lr * (mean_i g_i + wd * x)``: SGD with the L2 term in the gradient."""
    x = _torch_start().astype(np.float64)
    for step in range(steps):
        mean = sum(_torch_gradient(step, r).astype(np.float64) for r in range(num_proc)) / num_proc
        x = x - lr * (mean + weight_decay * x)
    return x


def test_model_increment_is_added_to_the_parameters():
    steps, lr, num_proc = 4, 0.25, 2
    [results] = zip(*run_on_ranks(_train_torch, num_proc, "gloo",
                                  args=(steps, lr, [(0.0, {})]), timeout=120))
    # The algorithm, its plain bucket and its warm-up step all take the SGD step -lr * mean; the
    # wrapped SGD's step, if it ran too, would move the parameters a second time.
    want = _torch_reference(steps, lr, 0.0, num_proc)
    for weights in results:
        np.testing.assert_allclose(weights, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(results[0], results[1])


def test_torch_weight_decay_is_part_of_the_compressed_gradient():
    """SGD's L2 term joins the gradient before the exchange, once, whatever the postscale."""
    steps, lr, wd, num_proc = 4, 0.25, 0.1, 2
    configs = [(wd, {}), (wd, {"gradient_predivide_factor": 2.0})]
    runs = list(zip(*run_on_ranks(_train_torch, num_proc, "gloo", args=(steps, lr, configs),
                                  timeout=120)))
    want = _torch_reference(steps, lr, wd, num_proc)
    assert not np.allclose(want, _torch_reference(steps, lr, 0.0, num_proc), rtol=1e-3)
    for results in runs:
        for weights in results:
            np.testing.assert_allclose(weights, want, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(results[0], results[1])


# --- TensorFlow: a linear model, its mean squared error on per-rank data -------------------------

FEATURES, UNITS, BATCH, STEPS = 8, 4, 5, 4
# The kernel (32 entries) goes through the algorithm, the bias (4) through the plain bucket.
MIN_COMPRESS_NUMEL = 16
# A rate that changes every step, not monotonically: a rate one step late gives other weights.
BOUNDARIES, RATES = [0, 1, 2], [0.1, 0.05, 0.2, 0.02]


def _data(rank):
    rng = np.random.default_rng(10 + rank)
    x = rng.standard_normal((STEPS * BATCH, FEATURES)).astype(np.float32)
    y = rng.standard_normal((STEPS * BATCH, UNITS)).astype(np.float32)
    return x, y


def _sgd_reference(rates, num_proc):
    """Plain SGD on the mean over ranks of each rank's batch gradient, in float64."""
    kernel, bias = np.zeros((FEATURES, UNITS)), np.zeros(UNITS)
    data = [_data(rank) for rank in range(num_proc)]
    for step, lr in enumerate(rates):
        grad_kernel, grad_bias = np.zeros_like(kernel), np.zeros_like(bias)
        for x, y in data:
            x = x[step * BATCH:(step + 1) * BATCH].astype(np.float64)
            y = y[step * BATCH:(step + 1) * BATCH].astype(np.float64)
            # The mean squared error averages over the batch and the units.
            residual = 2.0 * (x @ kernel + bias - y) / (BATCH * UNITS)
            grad_kernel += x.T @ residual / num_proc
            grad_bias += residual.sum(axis=0) / num_proc
        kernel, bias = kernel - lr * grad_kernel, bias - lr * grad_bias
    return [kernel, bias]


def _assert_close(got, want):
    """Within 1e-6 relative, entries near zero relative to the tensor's largest (float32 rounds
    the forward and backward passes, the reference is float64)."""
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def _float32(rates):
    """The rates as TensorFlow holds them."""
    return [float(np.float32(rate)) for rate in rates]


def _keras_fit():
    """Rank body: ``model.fit`` with the Keras DistributedOptimizer and a per-step schedule, in a
    tf.function and eagerly; the final weights of each."""
    import os
    os.environ["TF_USE_LEGACY_KERAS"] = "1"

    import horovod.tensorflow.keras as hvd
    import tensorflow as tf

    import horovod_squeeze.tensorflow.keras as hsk

    hvd.init()
    x, y = _data(hvd.rank())
    results = {}
    for run_eagerly in (False, True):
        model = tf.keras.Sequential([tf.keras.layers.Dense(
            UNITS, kernel_initializer="zeros", input_shape=(FEATURES,))])
        schedule = tf.keras.optimizers.schedules.PiecewiseConstantDecay(BOUNDARIES, RATES)
        optimizer = hsk.DistributedOptimizer(
            tf.keras.optimizers.SGD(schedule), compression=INCREMENT,
            min_compress_numel=MIN_COMPRESS_NUMEL, warmup_steps=1)
        model.compile(optimizer=optimizer, loss="mse", run_eagerly=run_eagerly)
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        engine = optimizer.squeeze_engine
        results[run_eagerly] = {
            "weights": model.get_weights(), "iterations": int(optimizer.iterations.numpy()),
            "compressed": [b.compressed for b in engine.buckets],
            "last_compressed": bool(engine.last_compressed.numpy())}
    return results


def test_keras_optimizer_adds_the_increment_with_a_learning_rate_schedule():
    num_proc = 2
    results = run_on_ranks(_keras_fit, num_proc, "gloo", timeout=180)
    want = _sgd_reference(_float32(RATES), num_proc)
    for run_eagerly in (False, True):
        runs = [result[run_eagerly] for result in results]
        for run in runs:
            assert run["iterations"] == STEPS
            assert sorted(run["compressed"]) == [False, True] and run["last_compressed"]
            for got, expected in zip(run["weights"], want):
                _assert_close(got, expected)
        for got, other in zip(runs[0]["weights"], runs[1]["weights"]):
            np.testing.assert_array_equal(got, other)


def _tape_loop(rate):
    """Rank body: a plain loop of DistributedGradientTape with a plain Keras SGD, eagerly with a
    constant rate and in a tf.function with the per-step schedule; the final weights of each."""
    import os
    os.environ["TF_USE_LEGACY_KERAS"] = "1"

    import horovod.tensorflow as hvd
    import tensorflow as tf

    import horovod_squeeze.tensorflow as hstf

    hvd.init()
    x, y = _data(hvd.rank())
    results = {}
    for mode in ("eager", "function"):
        kernel = tf.Variable(tf.zeros((FEATURES, UNITS)), name="kernel")
        bias = tf.Variable(tf.zeros(UNITS), name="bias")
        variables = [kernel, bias]
        optimizer = tf.keras.optimizers.SGD(
            rate if mode == "eager"
            else tf.keras.optimizers.schedules.PiecewiseConstantDecay(BOUNDARIES, RATES))

        wrappers = []

        def train_step(xs, ys):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(tf.matmul(xs, kernel) + bias - ys))
            tape = hstf.DistributedGradientTape(
                tape, compression=RateRecordingIncrement(hs.Identity()), optimizer=optimizer,
                min_compress_numel=MIN_COMPRESS_NUMEL, warmup_steps=1)
            wrappers.append(tape.squeeze)
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))

        if mode == "function":
            train_step = tf.function(train_step)
        for step in range(STEPS):
            rows = slice(step * BATCH, (step + 1) * BATCH)
            train_step(tf.constant(x[rows]), tf.constant(y[rows]))
        assert all(squeeze is wrappers[0] for squeeze in wrappers)
        engine = wrappers[0].engine
        [compressed] = [b.index for b in engine.buckets if b.compressed]
        results[mode] = {"weights": [v.numpy() for v in variables],
                         "rate": engine.state[compressed]["rate"].numpy()}
    return results


def test_tape_gradients_make_plain_sgd_add_the_increment():
    num_proc, rate = 2, 0.15
    results = run_on_ranks(_tape_loop, num_proc, "gloo", args=(rate,), timeout=180)
    for mode, rates in (("eager", [rate] * STEPS), ("function", RATES)):
        want = _sgd_reference(_float32(rates), num_proc)
        runs = [result[mode] for result in results]
        for run in runs:
            # The rate of the last step, which the optimizer's apply_gradients then stepped with.
            np.testing.assert_array_equal(run["rate"], np.float32(rates[-1]))
            for got, expected in zip(run["weights"], want):
                _assert_close(got, expected)
        for got, other in zip(runs[0]["weights"], runs[1]["weights"]):
            np.testing.assert_array_equal(got, other)


# --- refusals (no Horovod job: the wrappers check before they need one) --------------------------


def _refused(make, got):
    """``make()`` raises the plain-SGD rule naming the algorithm and what it got."""
    with pytest.raises(ValueError) as refusal:
        make()
    message = str(refusal.value)
    assert message.startswith(f"{INCREMENT!r} takes the model step itself "
                              "(it outputs a model increment), so it supports plain SGD only: ")
    assert re.search(f"; got {got}$", message), message
    return message


def test_torch_refuses_optimizers_other_than_plain_sgd():
    import torch

    import horovod_squeeze.torch as hst

    def wrap(optimizer_class, **settings):
        params = [torch.nn.Parameter(torch.zeros(2))]
        return lambda: hst.DistributedOptimizer(optimizer_class(params, lr=0.1, **settings),
                                                compression=INCREMENT)

    message = _refused(wrap(torch.optim.Adam), r"torch\.optim\.adam\.Adam")
    assert "torch.optim.SGD with momentum=0, nesterov=False and maximize=False" in message
    _refused(wrap(torch.optim.SGD, momentum=0.9), r"SGD with momentum=0\.9")
    _refused(wrap(torch.optim.SGD, momentum=0.9, nesterov=True),
             r"SGD with momentum=0\.9, nesterov=True")
    _refused(wrap(torch.optim.SGD, maximize=True), r"SGD with maximize=True")


def test_keras_refuses_optimizers_other_than_plain_sgd():
    import tensorflow as tf

    import horovod_squeeze.tensorflow as hstf
    import horovod_squeeze.tensorflow.keras as hsk

    def wrap(optimizer):
        return lambda: hsk.DistributedOptimizer(optimizer, compression=INCREMENT)

    def tape(optimizer):
        return lambda: hstf.DistributedGradientTape(tf.GradientTape(), compression=INCREMENT,
                                                    optimizer=optimizer)

    for make in (wrap, tape):
        message = _refused(make(tf.keras.optimizers.Adam(0.1)), r"tf_keras\..*\.Adam")
        assert "tf.keras.optimizers.SGD with momentum=0, nesterov=False, no weight_decay" in message
        _refused(make(tf.keras.optimizers.SGD(0.1, momentum=0.9)), r"SGD with momentum=0\.9")
        message = _refused(make(tf.keras.optimizers.SGD(0.1, weight_decay=1e-4)),
                           r"SGD with weight_decay=0\.0001")
        assert "put an L2 term in the loss" in message
        _refused(make(tf.keras.optimizers.SGD(0.1, clipnorm=1.0)), r"SGD with clipnorm=1\.0")
    with pytest.raises(ValueError, match=re.escape(
            f"{INCREMENT!r} takes the model step itself (it outputs a model increment) and needs "
            "the learning rate of the optimizer that applies the gradients: pass optimizer=")):
        hstf.DistributedGradientTape(tf.GradientTape(), compression=INCREMENT)
