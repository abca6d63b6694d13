"""horovod_squeeze.tensorflow on 2 and 4 ranks against the NumPy simulation the PyTorch tests use:
eagerly, inside tf.function and under Keras ``fit``; Keras callbacks; payloads across frameworks."""
import numpy as np
import pytest

import horovod_squeeze as hs
from horovod_squeeze.algorithms import MODEL_INCREMENT
from horovod_squeeze.buckets import Bucket
from horovod_squeeze.exchange import PassBytes, fp32_allreduce_bytes, make_exchange
from horovod_squeeze.reference.simulate import init_state, simulate_step
from horovod_squeeze.testing import run_on_ranks
from simulation_cases import (
    CONFIGS, SHAPES, STEPS, assert_close, check_against_simulation, gradient,
)

DS_SIGN = hs.DoubleSqueeze(hs.ScaledSign())
MODES = ["eager", "function", "fit"]


def _variables(dtype="float32"):
    import tensorflow as tf

    return [tf.Variable(tf.zeros(shape, dtype), name=name) for name, shape in SHAPES.items()]


def _gradients(rank, step):
    return [gradient(name, rank, step) for name in SHAPES]


def _snapshot(engine, names):
    return {"state": {i: {n: v.numpy().copy() for n, v in s.items()}
                      for i, s in engine.state.items()},
            "stats": engine.last_stats}


def _buckets(engine):
    return [(b.index, [n.split(":")[0] for n in b.names],
             b.exchange.name if b.compressed else "uncompressed", b.numel)
            for b in engine.buckets]


def _run_steps(configs, mode):
    """Rank body: STEPS steps whose gradients are exactly gradient(...), per config, on variables
    in the config's precision (the wrappers pick their own from the variables)."""
    import horovod.tensorflow as hvd
    import tensorflow as tf

    import horovod_squeeze.tensorflow as hstf

    hvd.init()
    results = []
    for config in configs:
        precision = config.get("precision", "float32")
        variables = _variables(precision)
        config = {k: v for k, v in config.items() if k != "precision"}
        names = list(SHAPES)
        steps = []
        if mode in ("eager", "function"):
            wrappers = []
            # An algorithm that takes the model step reads the rate of the optimizer that applies
            # the tape's result.
            lender = ({"optimizer": tf.keras.optimizers.SGD(1.0)}
                      if config["compression"].output == MODEL_INCREMENT else {})

            def exchange(grads):
                with tf.GradientTape() as tape:
                    # d/dv sum(v * G) = G: the exchange sees exactly the simulation's gradients.
                    loss = tf.add_n([tf.reduce_sum(v * g) for v, g in zip(variables, grads)])
                tape = hstf.DistributedGradientTape(tape, **config, **lender)
                wrappers.append(tape.squeeze)
                return tape.gradient(loss, variables)

            if mode == "function":
                exchange = tf.function(exchange)
            for step in range(STEPS):
                applied = exchange([tf.constant(g, precision)
                                    for g in _gradients(hvd.rank(), step)])
                squeeze = wrappers[-1]
                steps.append({"applied": dict(zip(names, (a.numpy() for a in applied))),
                              **_snapshot(squeeze.engine, names)})
            engine = squeeze.engine
            wrappers_alike = all(w is squeeze for w in wrappers)
        else:
            model, optimizer = _keras_known_gradients(variables, config, dtype=precision)
            x = np.stack([np.concatenate([g.reshape(-1) for g in _gradients(hvd.rank(), step)])
                          for step in range(STEPS)]).astype(precision)
            recorder = _Recorder(variables, names)
            model.fit(x, np.zeros(STEPS), batch_size=1, epochs=1, shuffle=False, verbose=0,
                      callbacks=[recorder])
            engine = optimizer.squeeze_engine
            steps = recorder.steps
            wrappers_alike = True
        num_engines = len(squeeze.engines) if mode != "fit" else len(optimizer._squeeze.engines)
        results.append({"steps": steps, "buckets": _buckets(engine),
                        "wrappers_alike": wrappers_alike, "num_engines": num_engines})
    return results


def _keras_known_gradients(variables, config, horovod_optimizer=False, dtype="float32"):
    """A tf_keras model whose loss on input G is sum(v * G): the gradients are the inputs."""
    import horovod.tensorflow.keras as hvd_keras
    import tensorflow as tf

    import horovod_squeeze.tensorflow.keras as hsk

    class KnownGradients(tf.keras.layers.Layer):
        def __init__(self, dtype):
            super().__init__(dtype=dtype)
            self.known = variables  # tracked: model.trainable_variables, in this order

        def call(self, x):
            total, offset = 0.0, 0
            for v in self.known:
                numel = int(np.prod(v.shape))
                total += tf.reduce_sum(v * tf.reshape(x[0, offset:offset + numel], v.shape))
                offset += numel
            return tf.reshape(total, [1, 1])

    model = tf.keras.Sequential([KnownGradients(dtype=dtype)])
    wrap = hvd_keras.DistributedOptimizer if horovod_optimizer else hsk.DistributedOptimizer
    optimizer = wrap(tf.keras.optimizers.SGD(1.0), **config)
    model.compile(optimizer=optimizer, loss=lambda y, p: tf.reduce_sum(p))
    return model, optimizer


def _recorder_class():
    import tensorflow as tf

    class Recorder(tf.keras.callbacks.Callback):
        """Applied gradient of each step: weights before minus after (SGD, learning rate 1)."""

        def __init__(self, variables, names):
            super().__init__()
            self.variables, self.names, self.steps = variables, names, []

        def on_train_batch_begin(self, batch, logs=None):
            self.before = [v.numpy().copy() for v in self.variables]

        def on_train_batch_end(self, batch, logs=None):
            engine = self.model.optimizer.squeeze_engine
            self.steps.append({"weights": dict(zip(self.names, (v.numpy() for v in self.variables))),
                               **_snapshot(engine, self.names)})

    return Recorder


def _Recorder(variables, names):
    return _recorder_class()(variables, names)


def _check(config, results, num_proc, mode):
    # SGD with learning rate 1: a model increment is added to the weights, and the tape returns
    # it negated (-increment / lr) for apply_gradients to add.
    sign = 1.0 if config["compression"].output == MODEL_INCREMENT else -1.0
    if mode == "fit":  # the weights after each step: the simulated steps applied one by one
        from simulation_cases import simulate
        buckets = results[0]["buckets"]
        simulated = simulate({"learning_rate": 1.0, **config}, buckets, num_proc)
        for rank, result in enumerate(results):
            weights = {n: np.zeros(s, config.get("precision", "float32"))
                       for n, s in SHAPES.items()}
            for step, (got, want) in enumerate(zip(result["steps"], simulated)):
                for name in SHAPES:
                    weights[name] = weights[name] + sign * want["applied"][name]
                    assert_close(got["weights"][name], weights[name],
                                 f"rank {rank} step {step} weights {name}")
        converted = [{"buckets": r["buckets"],
                      "steps": [{"applied": w["applied"], "state": s["state"]}
                                for s, w in zip(r["steps"], simulated)]} for r in results]
        check_against_simulation({"learning_rate": 1.0, **config}, converted, num_proc)
    elif sign > 0:
        negated = [{**r, "steps": [{**step, "applied": {n: -a for n, a in step["applied"].items()}}
                                   for step in r["steps"]]} for r in results]
        check_against_simulation({"learning_rate": 1.0, **config}, negated, num_proc)
    else:
        check_against_simulation(config, results, num_proc)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("num_proc", [2, 4])
def test_double_squeeze_matches_simulation(num_proc, mode):
    config = {"compression": DS_SIGN, "bucket_cap_mb": 0.005, "min_compress_numel": 100}
    results = run_on_ranks(_run_steps, num_proc, "gloo", args=([config], mode), timeout=240)
    per_rank = [r[0] for r in results]
    assert len(per_rank[0]["buckets"]) >= 3
    _check(config, per_rank, num_proc, mode)
    # A new tape every step (and every retrace) reuses the same engine and residuals.
    assert per_rank[0]["num_engines"] == 1 and per_rank[0]["wrappers_alike"]




@pytest.mark.parametrize("num_proc", [2, 4])
def test_algorithms_and_exchanges_match_simulation_in_tf_function(num_proc):
    configs = [{**c, "min_compress_numel": 0} for c in CONFIGS]
    results = run_on_ranks(_run_steps, num_proc, "gloo", args=(configs, "function"), timeout=300)
    for i, config in enumerate(configs):
        _check(config, [r[i] for r in results], num_proc, "function")


@pytest.mark.parametrize("mode", ["function", "fit"])
@pytest.mark.parametrize("num_proc", [2, 4])
def test_model_update_algorithms_match_simulation(num_proc, mode):
    configs = [{"compression": hs.DORE(hs.Ternary(block_size=64)), "bucket_cap_mb": 0.005,
                "min_compress_numel": 100},
               {"compression": hs.DoubleQuantization(b=4, b_x=8), "exchange": "allgather"},
               {"compression": hs.DORE(hs.QSGD(4), alpha=0.05), "exchange": "allgather",
                "precision": "float64"}]
    results = run_on_ranks(_run_steps, num_proc, "gloo", args=(configs, mode), timeout=300)
    for i, config in enumerate(configs):
        per_rank = [r[i] for r in results]
        _check(config, per_rank, num_proc, mode)
        if mode == "fit":  # every rank's model, bit for bit, after every step
            for rank in per_rank[1:]:
                for got, want in zip(rank["steps"], per_rank[0]["steps"]):
                    for name in SHAPES:
                        np.testing.assert_array_equal(got["weights"][name], want["weights"][name])


def test_model_update_algorithms_match_simulation_over_mpi():
    config = {"compression": hs.DORE(hs.Ternary(block_size=64)), "bucket_cap_mb": 0.005,
              "min_compress_numel": 100}
    results = run_on_ranks(_run_steps, 2, "mpi", args=([config], "function"), timeout=240)
    _check(config, [r[0] for r in results], 2, "function")


def test_mpi_controller_matches_simulation():
    config = {"compression": DS_SIGN, "min_compress_numel": 100}
    results = run_on_ranks(_run_steps, 2, "mpi", args=([config], "function"), timeout=240)
    _check(config, [r[0] for r in results], 2, "function")


def test_telemetry_bytes_equal_the_wire_format():
    num_proc = 2
    config = {"compression": DS_SIGN, "min_compress_numel": 100}
    result = run_on_ranks(_run_steps, num_proc, "gloo", args=([config], "eager"), timeout=120)[0][0]
    expected = PassBytes(0, 0, 0, 0)
    for index, names, kind, numel in result["buckets"]:
        if kind == "uncompressed":
            ring = fp32_allreduce_bytes(numel, num_proc)
            expected += PassBytes(ring, ring, 0, 0)
        else:
            bucket = Bucket(index, names, [SHAPES[n] for n in names], make_exchange(kind))
            expected += make_exchange(kind).pass_bytes(config["compression"], bucket, num_proc)
    total = sum(numel for *_, numel in result["buckets"])
    for step, record in enumerate(result["steps"]):
        assert record["stats"].step == step
        assert record["stats"].bytes == expected
        assert record["stats"].fp32_allreduce_bytes == fp32_allreduce_bytes(total, num_proc)


def _stock_steps(algorithm):
    """Rank body: Horovod's own tape with StockCompression; STEPS known-gradient steps."""
    import horovod.tensorflow as hvd
    import tensorflow as tf

    import horovod_squeeze.tensorflow as hstf

    hvd.init()
    variables = _variables()
    compression = hstf.StockCompression(algorithm, variables)

    @tf.function
    def exchange(grads):
        with tf.GradientTape() as tape:
            loss = tf.add_n([tf.reduce_sum(v * g) for v, g in zip(variables, grads)])
        return hvd.DistributedGradientTape(tape, compression=compression).gradient(loss, variables)

    return [dict(zip(SHAPES, (a.numpy() for a in exchange(_gradients(hvd.rank(), step)))))
            for step in range(STEPS)]


def _stock_keras_steps(algorithm):
    """Rank body: Horovod's own Keras optimizer with StockCompression under fit; weights per step."""
    import horovod.tensorflow as hvd

    import horovod_squeeze.tensorflow as hstf

    hvd.init()
    variables = _variables()
    model, _ = _keras_known_gradients(
        variables, {"compression": hstf.StockCompression(algorithm, variables)},
        horovod_optimizer=True)
    x = np.stack([np.concatenate([g.reshape(-1) for g in _gradients(hvd.rank(), step)])
                  for step in range(STEPS)])
    weights = []

    class Record(tf_callback()):
        def on_train_batch_end(self, batch, logs=None):
            weights.append({n: v.numpy().copy() for n, v in zip(SHAPES, variables)})

    model.fit(x, np.zeros(STEPS), batch_size=1, epochs=1, shuffle=False, verbose=0,
              callbacks=[Record()])
    # SGD with learning rate 1 from zeros: each step's applied gradient is the weights' change.
    previous = {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}
    applied = []
    for current in weights:
        applied.append({n: previous[n] - current[n] for n in SHAPES})
        previous = current
    return applied


def tf_callback():
    import tensorflow as tf

    return tf.keras.callbacks.Callback


@pytest.mark.parametrize("keras", [False, True], ids=["tape", "keras"])
@pytest.mark.parametrize("algorithm", [hs.ErrorFeedback(hs.RandK(0.2, seed=4)),
                                       hs.DoubleSqueeze(hs.RandK(0.3, unbiased=True))], ids=repr)
def test_stock_horovod_path_matches_simulation(algorithm, keras):
    from horovod_squeeze.tensorflow.stock import stream_id

    num_proc = 2
    body = _stock_keras_steps if keras else _stock_steps
    results = run_on_ranks(body, num_proc, "gloo", args=(algorithm,), timeout=120)
    states = {n: init_state(algorithm, "allreduce", int(np.prod(s)), num_proc)
              for n, s in SHAPES.items()}
    for step in range(STEPS):
        for name in SHAPES:
            grads = [gradient(name, r, step).reshape(-1) for r in range(num_proc)]
            want, states[name] = simulate_step(algorithm, "allreduce", grads, states[name],
                                               step=step, bucket=stream_id(f"{name}:0"))
            for rank in range(num_proc):
                got = results[rank][step][name].reshape(-1)
                if keras:  # recovered from float32 weights: w_before - w_after
                    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
                else:
                    assert_close(got, want, f"rank {rank} step {step} {name}")


@pytest.mark.parametrize("spec", [hs.ScaledSign(), hs.TopK(0.05), hs.QSGD(4, seed=3),
                                  hs.RandK(0.1, seed=1), hs.FP16(), hs.Ternary(block_size=32)],
                         ids=repr)
def test_payloads_cross_between_tensorflow_and_pytorch(spec):
    import tensorflow as tf
    import torch

    from horovod_squeeze.tensorflow import codecs as tf_codecs
    from horovod_squeeze.torch import codecs as torch_codecs

    x = np.random.default_rng(7).standard_normal(1001).astype(np.float32)
    from_tf = tf_codecs.compress(spec, tf.constant(x), nonce=11).numpy()
    from_torch = torch_codecs.compress(spec, torch.from_numpy(x), nonce=11).numpy()
    np.testing.assert_array_equal(from_tf, from_torch)
    in_torch = torch_codecs.decompress(spec, torch.from_numpy(from_tf), x.size).numpy()
    in_tf = tf_codecs.decompress(spec, tf.constant(from_torch), x.size).numpy()
    np.testing.assert_array_equal(in_torch, in_tf)
    assert np.any(in_tf != 0)


def test_bad_configurations_are_refused():
    import tensorflow as tf

    import horovod_squeeze.tensorflow as hstf
    import horovod_squeeze.tensorflow.keras as hsk

    with pytest.raises(TypeError, match="wrap it in an algorithm"):
        hstf.DistributedGradientTape(tf.GradientTape(), compression=hs.ScaledSign())
    with pytest.raises(TypeError, match="wrap it in an algorithm"):
        hsk.DistributedOptimizer(tf.keras.optimizers.SGD(0.1), compression=hs.TopK(0.1))
    with pytest.raises(ValueError, match="use bucket_cap_mb"):
        hstf.DistributedGradientTape(tf.GradientTape(), compression=DS_SIGN, groups=2)
    with pytest.raises(ValueError, match="only correct for linear compressors"):
        hstf.StockCompression(DS_SIGN, _variables())


def _keras_training(epochs, checkpoint_dir, resume_at=None, optimizer_kind="sgd"):
    """Rank body: a small MLP under fit; with resume_at, stop there, rebuild and resume from the
    checkpoint that rank 0 saved (every rank loads it)."""
    import os

    import horovod.tensorflow as hvd
    import tensorflow as tf

    import horovod_squeeze.tensorflow.keras as hsk

    hvd.init()
    data = np.random.default_rng(0).standard_normal((64 * hvd.size(), 20)).astype(np.float32)
    target = (data[:, 0] > 0).astype(np.int64)
    x, y = data[hvd.rank()::hvd.size()], target[hvd.rank()::hvd.size()]

    def build():
        tf.keras.utils.set_random_seed(1)
        model = tf.keras.Sequential([tf.keras.layers.Dense(32, "relu", input_shape=(20,)),
                                     tf.keras.layers.Dense(2)])
        if optimizer_kind == "sgd":
            wrapped, options = tf.keras.optimizers.SGD(0.1, momentum=0.9), {}
        else:  # exact Adam for 3 of the 4 steps of epoch 0, then the frozen variance
            wrapped, options = tf.keras.optimizers.Adam(0.01), {"warmup_steps": 3}
        optimizer = hsk.DistributedOptimizer(wrapped, compression=DS_SIGN, min_compress_numel=0,
                                             **options)
        model.compile(optimizer=optimizer,
                      loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    def fit(model, initial_epoch, last_epoch, save):
        resumed = hsk.callbacks.ResidualCheckpointCallback()
        callbacks = [hsk.callbacks.BroadcastGlobalVariablesCallback(0), resumed]
        if save and hvd.rank() == 0:
            callbacks.append(tf.keras.callbacks.ModelCheckpoint(
                os.path.join(checkpoint_dir, "epoch{epoch}"), save_weights_only=True))
        model.fit(x, y, batch_size=16, epochs=last_epoch, initial_epoch=initial_epoch,
                  shuffle=False, verbose=0, callbacks=callbacks)
        return resumed.restored

    model = build()
    if resume_at is None:
        restored = fit(model, 0, epochs, save=False)
    else:
        fit(model, 0, resume_at, save=True)
        hvd.allreduce(tf.constant(0.0), name="checkpoint_written")  # a barrier
        model = build()  # what a new process builds
        model.load_weights(os.path.join(checkpoint_dir, f"epoch{resume_at}"))
        restored = fit(model, resume_at, epochs, save=False)
    return {"restored": restored, "weights": [w.copy() for w in model.get_weights()],
            "state_norms": model.optimizer.state_norms()}


@pytest.mark.parametrize("optimizer_kind", ["sgd", "adam"])
def test_keras_checkpoint_resumes_identically(tmp_path, optimizer_kind):
    """With worker momentum: SGD momentum from the start, Adam's after its warm-up."""
    uninterrupted = run_on_ranks(_keras_training, 2, "gloo", args=(4, str(tmp_path)),
                                 kwargs={"optimizer_kind": optimizer_kind}, timeout=180)
    resumed = run_on_ranks(_keras_training, 2, "gloo", args=(4, str(tmp_path)),
                           kwargs={"resume_at": 2, "optimizer_kind": optimizer_kind}, timeout=180)
    for rank in range(2):
        assert resumed[rank]["restored"] and not uninterrupted[rank]["restored"]
        assert any(n["worker_residual"] > 0 for n in resumed[rank]["state_norms"].values())
        assert any(n["momentum"] > 0 for n in resumed[rank]["state_norms"].values())
        for got, want in zip(resumed[rank]["weights"], uninterrupted[rank]["weights"]):
            np.testing.assert_array_equal(got, want)
        # Layer names differ between the two models; the residuals, in order, do not.
        assert (list(resumed[rank]["state_norms"].values())
                == list(uninterrupted[rank]["state_norms"].values()))


def _worker_residual(engine):
    return engine.state[0]["worker_residual"].numpy().copy()


def _all_state(engine):
    return [v.numpy().copy() for s in engine.state.values() for v in s.values()]


def _callbacks_body(log_dir):
    """Rank body: warm-up, metric averaging, statistics and learning-rate rescaling under fit."""
    import horovod.tensorflow as hvd
    import tensorflow as tf

    import horovod_squeeze.tensorflow.keras as hsk

    hvd.init()
    variables = _variables()
    model, optimizer = _keras_known_gradients(
        variables, {"compression": DS_SIGN, "min_compress_numel": 0})
    x = np.stack([np.concatenate([g.reshape(-1) for g in _gradients(hvd.rank(), step)])
                  for step in range(4)])
    recorder = _Recorder(variables, list(SHAPES))

    class Probe(tf.keras.callbacks.Callback):
        """Injects a per-rank metric; records the residual before the first batch of epoch 1."""

        def on_epoch_end(self, epoch, logs=None):
            logs["rank_metric"] = float(hvd.rank())
            if epoch == 0:
                self.residual_at_end = _worker_residual(optimizer.squeeze_engine)

        def on_train_batch_begin(self, batch, logs=None):
            if not hasattr(self, "after_rescale") and hasattr(self, "residual_at_end"):
                self.after_rescale = _worker_residual(optimizer.squeeze_engine)

    probe = Probe()
    history = model.fit(
        x, np.zeros(4), batch_size=1, epochs=2, steps_per_epoch=2, shuffle=False, verbose=0,
        callbacks=[recorder, hsk.callbacks.WarmupCallback(warmup_steps=1),
                   tf.keras.callbacks.LearningRateScheduler(lambda epoch, lr: 1.0 / (1 + epoch)),
                   hsk.callbacks.ResidualRescaleCallback(), probe,
                   hsk.callbacks.MetricAverageCallback(), hsk.callbacks.CompressionStatsCallback(log_dir)])
    return {"steps": recorder.steps, "history": history.history,
            "residual_at_end": probe.residual_at_end, "after_rescale": probe.after_rescale}


def test_keras_callbacks(tmp_path):
    import tensorflow as tf

    num_proc = 2
    results = run_on_ranks(_callbacks_body, num_proc, "gloo", args=(str(tmp_path),), timeout=180)
    tags = {value.tag for path in tmp_path.glob("events.out.tfevents.*")
            for event in tf.compat.v1.train.summary_iterator(str(path))
            for value in event.summary.value}
    assert {"squeeze_bytes", "squeeze_ratio", "squeeze_worker_residual_norm"} <= tags
    for rank, result in enumerate(results):
        history = result["history"]
        assert history["rank_metric"] == [0.5, 0.5]  # averaged over ranks
        assert all(r > 8 for r in history["squeeze_ratio"])
        assert all(n > 0 for n in history["squeeze_worker_residual_norm"])
        # Warm-up: step 0 is the exact mean (to float rounding) with zero residuals.
        first = result["steps"][0]
        for name in SHAPES:
            mean = np.mean([gradient(name, r, 0) for r in range(num_proc)], axis=0)
            assert_close(-first["weights"][name], mean, f"rank {rank} warm-up step {name}")
        assert all(not np.any(s["worker_residual"]) for s in first["state"].values())
        assert any(np.any(s["worker_residual"]) for s in result["steps"][1]["state"].values())
        # The learning rate halves at epoch 1: residuals double, so lr * residual is unchanged.
        np.testing.assert_allclose(result["after_rescale"], 2 * result["residual_at_end"],
                                   rtol=1e-6)


def _nan_step():
    """Rank body: one good step, a NaN gradient on rank 0 only, a good step; report the results,
    the state around the bad step and the engine's counters."""
    import horovod.tensorflow as hvd
    import tensorflow as tf

    import horovod_squeeze.tensorflow as hstf

    hvd.init()
    variables = _variables()

    def step(grads):
        with tf.GradientTape() as tape:
            loss = tf.add_n([tf.reduce_sum(v * g) for v, g in zip(variables, grads)])
        tape = hstf.DistributedGradientTape(tape, compression=DS_SIGN, min_compress_numel=0)
        return tape.gradient(loss, variables), tape.squeeze

    _, squeeze = step(_gradients(hvd.rank(), 0))
    before = _all_state(squeeze.engine)
    bad = _gradients(hvd.rank(), 1)
    if hvd.rank() == 0:
        bad[2][1, 3] = np.nan
    skipped, _ = step(bad)
    after = _all_state(squeeze.engine)
    engine = squeeze.engine
    record = {"skipped_nan": all(np.all(np.isnan(g.numpy())) for g in skipped),
              "last_skipped": bool(engine.last_skipped.numpy()),
              "unchanged": all(np.array_equal(a, b) for a, b in zip(before, after)),
              "step_after_bad": int(engine.step.numpy())}
    good, _ = step(_gradients(hvd.rank(), 2))
    return {**record, "good_finite": all(np.all(np.isfinite(g.numpy())) for g in good),
            "step": int(engine.step.numpy()), "skipped_steps": int(engine.skipped_steps.numpy())}


def test_nan_gradient_on_one_rank_skips_the_step_on_every_rank():
    for result in run_on_ranks(_nan_step, 2, "gloo", timeout=120):
        assert result["skipped_nan"] and result["last_skipped"] and result["unchanged"]
        assert result["step_after_bad"] == 1
        assert result["good_finite"] and result["step"] == 2 and result["skipped_steps"] == 1


def _tf_save(prefix, steps):
    """Rank body: a few known-gradient steps, state gathered on every rank, saved by rank 0."""
    import horovod.tensorflow as hvd
    import tensorflow as tf

    import horovod_squeeze.tensorflow as hstf

    hvd.init()
    variables = _variables()
    squeeze = None
    for step in range(steps):
        with tf.GradientTape() as tape:
            loss = tf.add_n([tf.reduce_sum(v * g)
                             for v, g in zip(variables, _gradients(hvd.rank(), step))])
        tape = hstf.DistributedGradientTape(tape, compression=DS_SIGN, min_compress_numel=0)
        tape.gradient(loss, variables)
        squeeze = tape.squeeze
    saved = hstf.state.gather(squeeze.engine)
    if hvd.rank() == 0:
        tf.train.Checkpoint(squeeze=squeeze.engine).write(prefix)
    hvd.allreduce(tf.constant(0.0), name="saved")  # a barrier
    return saved


def _tf_restore_and_continue(prefix):
    """Rank body: a fresh engine restores the checkpoint, then takes one more step."""
    import horovod.tensorflow as hvd
    import tensorflow as tf

    import horovod_squeeze.tensorflow as hstf

    hvd.init()
    variables = _variables()
    squeeze = hstf.DistributedGradientTape(tf.GradientTape(), compression=DS_SIGN,
                                           min_compress_numel=0).squeeze
    engine = squeeze.build(variables)
    tf.train.Checkpoint(squeeze=engine).read(prefix).assert_consumed()
    restored = hstf.state.restore(engine)
    after_restore = hstf.state.gather(engine)
    with tf.GradientTape() as tape:
        loss = tf.add_n([tf.reduce_sum(v * g) for v, g in zip(variables, _gradients(hvd.rank(), 9))])
    tape = hstf.DistributedGradientTape(tape, compression=DS_SIGN, min_compress_numel=0)
    applied = tape.gradient(loss, variables)
    return {"restored": restored, "state": after_restore, "step": int(engine.step.numpy()),
            "finite": all(bool(np.all(np.isfinite(a.numpy()))) for a in applied)}


def test_checkpoint_restored_at_another_world_size(tmp_path):
    prefix = str(tmp_path / "squeeze")
    saved = run_on_ranks(_tf_save, 4, "gloo", args=(prefix, 3), timeout=180)[0]
    results = run_on_ranks(_tf_restore_and_continue, 2, "gloo", args=(prefix,), timeout=180)
    for result in results:
        assert result["restored"] and result["step"] == 4 and result["finite"]
        loaded = result["state"]
        assert saved["world_size"] == 4 and loaded["world_size"] == 2 and loaded["step"] == 3
        for name in SHAPES:
            old = saved["state"]["worker_residual"]["tensors"][f"{name}:0"]
            new = loaded["state"]["worker_residual"]["tensors"][f"{name}:0"]
            assert old.shape[0] == 4 and new.shape[0] == 2 and np.any(old != 0)
            np.testing.assert_allclose(new.sum(axis=0), old.sum(axis=0), rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(
                loaded["state"]["server_residual"]["tensors"][f"{name}:0"],
                saved["state"]["server_residual"]["tensors"][f"{name}:0"])
