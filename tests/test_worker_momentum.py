"""Worker-side momentum (horovod_squeeze.momentum) through the PyTorch DistributedOptimizer.

- Without compression loss (``NoFeedback(Identity())``), SGD momentum (Nesterov, L2) and Adam/AdamW
  after the worker momentum takes over match the fp32 optimizers on the averaged gradient.
- With 1-bit DoubleSqueeze, the exchanged momentum is bit-identical to a NumPy reference written
  from the update rule (``m_i = beta m_i + g_i``, then the simulated exchange).
- A checkpoint taken mid-run (with a learning-rate schedule) resumes bit-identically.
- Settings the scheme cannot honour are refused by name.
"""
import numpy as np
import pytest

import horovod_squeeze as hs
from horovod_squeeze.reference.simulate import init_state, simulate_step
from horovod_squeeze.testing import run_on_ranks

BIG, SMALL = 3000, 10  # one compressed bucket (bucket 0) and the plain bucket of small tensors
NUM_PROC = 2
QUIET = 64


def _gradient(step, rank, config=None):
    """Random gradients; with ``quiet_until`` in ``config``, the first QUIET entries are 0 before
    that step (units that come alive after warm-up: their frozen variance is 0)."""
    gradient = np.random.default_rng(100 * step + rank).standard_normal(BIG + SMALL)
    if config is not None and step < config.get("quiet_until", 0):
        gradient[:QUIET] = 0.0
    return gradient.astype(np.float32)


def _optimizer(config, params):
    import torch

    kind, hyper = config["optimizer"]
    return getattr(torch.optim, kind)(params, **hyper)


def _train(configs, steps):
    """Per config: each step's applied gradients and the parameters after it."""
    import horovod.torch as hvd
    import torch

    import horovod_squeeze.torch as hst

    hvd.init()
    out = []
    for config in configs:
        big = torch.nn.Parameter(torch.linspace(-1, 1, BIG))
        small = torch.nn.Parameter(torch.linspace(0, 1, SMALL))
        optimizer = hst.DistributedOptimizer(
            _optimizer(config, [big, small]), named_parameters=[("big", big), ("small", small)],
            compression=config["compression"], **config.get("options", {}))
        records = []
        for step in range(steps):
            optimizer.zero_grad()
            grad = torch.from_numpy(_gradient(step, hvd.rank(), config))
            ((big * grad[:BIG]).sum() + (small * grad[BIG:]).sum()).backward()
            optimizer.step()
            records.append({"applied": torch.cat([big.grad, small.grad]).numpy().copy(),
                            "params": torch.cat([big.detach(), small.detach()]).numpy().copy()})
        out.append(records)
    return out


def _fp32_params(config, steps):
    """The wrapped optimizer itself, in one process, on the averaged gradients."""
    import torch

    big = torch.nn.Parameter(torch.linspace(-1, 1, BIG))
    small = torch.nn.Parameter(torch.linspace(0, 1, SMALL))
    optimizer = _optimizer(config, [big, small])
    params = []
    for step in range(steps):
        average = (sum(_gradient(step, r, config) for r in range(NUM_PROC))
                   / np.float32(NUM_PROC))
        big.grad, small.grad = (torch.from_numpy(average[:BIG].copy()),
                                torch.from_numpy(average[BIG:].copy()))
        optimizer.step()
        params.append(torch.cat([big.detach(), small.detach()]).numpy().copy())
    return params


EXACT = hs.NoFeedback(hs.Identity())
FP32_CASES = [
    {"optimizer": ("SGD", {"lr": 0.05, "momentum": 0.9}), "compression": EXACT},
    {"optimizer": ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
     "compression": EXACT, "options": {"warmup_steps": 2}},
    {"optimizer": ("AdamW", {"lr": 0.01, "weight_decay": 0.1}), "compression": EXACT,
     "options": {"warmup_steps": 3}, "quiet_until": 3},
    {"optimizer": ("Adam", {"lr": 0.01, "weight_decay": 0.1}), "compression": EXACT,
     "options": {"warmup_steps": 3}},
]


def test_worker_momentum_matches_the_fp32_optimizers():
    steps = 8
    results = run_on_ranks(_train, NUM_PROC, "gloo", args=(FP32_CASES, steps), timeout=180)
    for index, config in enumerate(FP32_CASES):
        kind, hyper = config["optimizer"]
        warmup = config.get("options", {}).get("warmup_steps", 0)
        want = _fp32_params(config, steps) if kind == "SGD" else _frozen_adam(config, steps,
                                                                               warmup)
        for step in range(steps):
            np.testing.assert_allclose(results[0][index][step]["params"], want[step],
                                       rtol=2e-5, atol=2e-6, err_msg=f"{kind} {hyper} step {step}")
            np.testing.assert_array_equal(results[0][index][step]["params"],
                                          results[1][index][step]["params"])


def _frozen_adam(config, steps, warmup):
    """Adam's reference: exact (torch) for the warm-up steps, then the frozen-variance update
    written from its definition, with m = beta1 m + (1 - beta1) g on each worker, whose
    preconditioned m is clipped to the bound exact Adam's direction never exceeds; then every
    worker's m becomes the exchanged direction over the preconditioner (1-bit Adam's consensus)."""
    import torch

    kind, hyper = config["optimizer"]
    exact = _fp32_params(config, warmup)
    beta1, beta2, lr, wd = 0.9, 0.999, hyper["lr"], hyper["weight_decay"]
    eps = hyper.get("eps", 1e-8)
    # |m_t| <= (1 - b1) sqrt(sum (b1^2/b2)^k) sqrt(v_t / (1 - b2)) by Cauchy-Schwarz.
    bound = (1 - beta1) / np.sqrt((1 - beta2) * (1 - beta1 ** 2 / beta2))
    # Replay the warm-up to read its moments (torch's state after `warmup` steps).
    big = torch.nn.Parameter(torch.linspace(-1, 1, BIG))
    small = torch.nn.Parameter(torch.linspace(0, 1, SMALL))
    optimizer = _optimizer(config, [big, small])
    for step in range(warmup):
        average = (sum(_gradient(step, r, config) for r in range(NUM_PROC))
                   / np.float32(NUM_PROC))
        big.grad, small.grad = (torch.from_numpy(average[:BIG].copy()),
                                torch.from_numpy(average[BIG:].copy()))
        optimizer.step()
    moments = {n: np.concatenate([optimizer.state[p][n].numpy() for p in (big, small)])
               for n in ("exp_avg", "exp_avg_sq")}
    p = exact[-1].astype(np.float64)
    m = [moments["exp_avg"].astype(np.float64) for _ in range(NUM_PROC)]
    v = moments["exp_avg_sq"].astype(np.float64)
    params = list(exact)
    for step in range(warmup, steps):
        for r in range(NUM_PROC):
            g = _gradient(step, r, config).astype(np.float64)
            if kind == "Adam":
                g = g + wd * p
            m[r] = beta1 * m[r] + (1 - beta1) * g
        preconditioner = 1 / (np.sqrt(v / (1 - beta2 ** warmup)) + eps)
        direction = sum(np.clip(m_r * preconditioner, -bound, bound) for m_r in m) / NUM_PROC
        m = [direction / preconditioner for _ in range(NUM_PROC)]
        if kind == "AdamW":
            p = p * (1 - lr * wd)
        t = step + 1
        p = p - lr * direction / (1 - beta1 ** t)
        params.append(p.astype(np.float32))
    return params


def test_exchanged_momentum_is_bit_identical_to_the_reference():
    steps, beta, lr = 5, 0.9, 0.05
    algorithm = hs.DoubleSqueeze(hs.ScaledSign())
    config = {"optimizer": ("SGD", {"lr": lr, "momentum": beta}), "compression": algorithm}
    results = run_on_ranks(_train, NUM_PROC, "gloo", args=([config], steps), timeout=120)
    momenta = [np.zeros(BIG + SMALL, np.float32) for _ in range(NUM_PROC)]
    state = init_state(algorithm, "sharded", BIG, NUM_PROC)
    params = np.concatenate([np.linspace(-1, 1, BIG, dtype=np.float32),
                             np.linspace(0, 1, SMALL, dtype=np.float32)])
    for step in range(steps):
        for r in range(NUM_PROC):
            momenta[r] = momenta[r] * np.float32(beta) + _gradient(step, r) * np.float32(1.0)
        compressed, state = simulate_step(algorithm, "sharded", [m[:BIG] for m in momenta], state,
                                          step=step, bucket=0)
        plain = sum(m[BIG:] for m in momenta) / np.float32(NUM_PROC)
        applied = np.concatenate([compressed, plain])
        params = params - np.float32(lr) * applied
        for rank in range(NUM_PROC):
            np.testing.assert_array_equal(results[rank][0][step]["applied"], applied,
                                          err_msg=f"rank {rank} step {step}")
            np.testing.assert_allclose(results[rank][0][step]["params"], params, rtol=1e-6,
                                       atol=1e-6)


def _train_with_schedule(steps, optimizer_kind, checkpoint_at=None):
    """A small network with a learning-rate schedule; optionally checkpoint, rebuild and resume."""
    import horovod.torch as hvd
    import torch

    import horovod_squeeze.torch as hst

    hvd.init()
    generator = torch.Generator().manual_seed(7)
    data = torch.randn(64 * hvd.size(), 20, generator=generator)
    target = (data[:, 0] > 0).long()
    x, y = data[hvd.rank()::hvd.size()], target[hvd.rank()::hvd.size()]

    def build():
        torch.manual_seed(7)
        model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(),
                                    torch.nn.Linear(64, 2))
        if optimizer_kind == "sgd":
            wrapped = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        else:
            wrapped = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)
        optimizer = hst.DistributedOptimizer(
            wrapped, named_parameters=model.named_parameters(),
            compression=hs.DoubleSqueeze(hs.ScaledSign()), min_compress_numel=64,
            warmup_steps=3)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        return model, optimizer, schedule

    model, optimizer, schedule = build()
    for step in range(steps):
        if step == checkpoint_at:
            saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "schedule": schedule.state_dict()}
            model, optimizer, schedule = build()  # a fresh process's objects
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            schedule.load_state_dict(saved["schedule"])
        batch = slice((step * 16) % 64, (step * 16) % 64 + 16)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
        schedule.step()
    return {n: p.detach().numpy().copy() for n, p in model.named_parameters()}


@pytest.mark.parametrize("optimizer_kind", ["sgd", "adamw"])
def test_checkpoint_with_momentum_resumes_identically(optimizer_kind):
    # Saved at step 8, where the schedule has just halved the rate (residuals rescaled next step).
    uninterrupted = run_on_ranks(_train_with_schedule, 2, "gloo", args=(14, optimizer_kind),
                                 timeout=120)
    resumed = run_on_ranks(_train_with_schedule, 2, "gloo", args=(14, optimizer_kind),
                           kwargs={"checkpoint_at": 8}, timeout=120)
    for rank in range(2):
        for name in uninterrupted[rank]:
            np.testing.assert_array_equal(resumed[rank][name], uninterrupted[rank][name],
                                          err_msg=f"rank {rank} {name}")


def _refusals():
    import horovod.torch as hvd
    import torch

    import horovod_squeeze.torch as hst

    hvd.init()
    model = torch.nn.Linear(40, 40)
    algorithm = hs.DoubleSqueeze(hs.ScaledSign())
    cases = {
        "dampening": torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.1),
        "amsgrad": torch.optim.Adam(model.parameters(), amsgrad=True),
        "maximize": torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, maximize=True),
        "momentum for every": torch.optim.SGD(
            [{"params": [model.weight], "momentum": 0.9}, {"params": [model.bias]}],
            lr=0.1, momentum=0.5),
    }
    messages = {}
    for key, wrapped in cases.items():
        try:
            hst.DistributedOptimizer(wrapped, named_parameters=model.named_parameters(),
                                     compression=algorithm)
        except ValueError as error:
            messages[key] = str(error)
    try:
        hst.DistributedOptimizer(torch.optim.Adam(model.parameters()),
                                 named_parameters=model.named_parameters(),
                                 compression=algorithm, warmup_steps=0)
    except ValueError as error:
        messages["warmup_steps"] = str(error)
    # The explicit switch keeps the optimizer's own momentum: accepted.
    hst.DistributedOptimizer(cases["dampening"], named_parameters=model.named_parameters(),
                             compression=algorithm, worker_momentum=False)
    return messages


def test_settings_worker_momentum_cannot_honour_are_refused():
    messages = run_on_ranks(_refusals, 2, "gloo", timeout=120)[0]
    assert set(messages) == {"dampening", "amsgrad", "maximize", "momentum for every",
                             "warmup_steps"}
    for key, message in messages.items():
        assert key in message, message
        assert "worker_momentum=False" in message, message


# --- Keras: the same scheme under model.fit --------------------------------------------------------

def _keras_optimizer(config):
    import tensorflow as tf

    kind, hyper = config["optimizer"]
    return getattr(tf.keras.optimizers, kind)(**hyper)


def _keras_variables():
    import tensorflow as tf

    return [tf.Variable(np.linspace(-1, 1, BIG, dtype=np.float32), name="big"),
            tf.Variable(np.linspace(0, 1, SMALL, dtype=np.float32), name="small")]


def _keras_train(configs, steps):
    """Per config: the parameters after each step of model.fit, whose loss sum(v * x) makes each
    step's gradient its input row."""
    import horovod.tensorflow.keras as hvd
    import tensorflow as tf

    import horovod_squeeze.tensorflow.keras as hsk

    hvd.init()
    out = []
    for config in configs:
        variables = _keras_variables()

        class KnownGradients(tf.keras.layers.Layer):
            def __init__(self):
                super().__init__()
                self.known = variables

            def call(self, x):
                return tf.reshape(tf.reduce_sum(self.known[0] * x[0, :BIG])
                                  + tf.reduce_sum(self.known[1] * x[0, BIG:]), [1, 1])

        class Record(tf.keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.trajectory = []

            def on_train_batch_end(self, batch, logs=None):
                self.trajectory.append(np.concatenate([v.numpy() for v in variables]))

        model = tf.keras.Sequential([KnownGradients()])
        model.compile(optimizer=hsk.DistributedOptimizer(
            _keras_optimizer(config), compression=config["compression"],
            **config.get("options", {})), loss=lambda y, p: tf.reduce_sum(p))
        rows = np.stack([_gradient(step, hvd.rank(), config) for step in range(steps)])
        record = Record()
        model.fit(rows, np.zeros((steps, 1), np.float32), batch_size=1, epochs=1, shuffle=False,
                  verbose=0, callbacks=[record])
        out.append(record.trajectory)
    return out


def _keras_fp32_params(config, steps):
    """The Keras optimizer itself, eagerly, on the averaged gradients."""
    import tensorflow as tf

    variables = _keras_variables()
    optimizer = _keras_optimizer(config)
    params = []
    for step in range(steps):
        average = (sum(_gradient(step, r, config) for r in range(NUM_PROC))
                   / np.float32(NUM_PROC))
        optimizer.apply_gradients([(tf.constant(average[:BIG]), variables[0]),
                                   (tf.constant(average[BIG:]), variables[1])])
        params.append(np.concatenate([v.numpy() for v in variables]))
    return params


KERAS_CASES = [
    {"optimizer": ("SGD", {"learning_rate": 0.05, "momentum": 0.9}), "compression": EXACT},
    {"optimizer": ("SGD", {"learning_rate": 0.05, "momentum": 0.9, "nesterov": True}),
     "compression": EXACT, "options": {"warmup_steps": 2}},
    # Keras and PyTorch place epsilon differently; a tiny one makes both references agree.
    {"optimizer": ("Adam", {"learning_rate": 0.01, "epsilon": 1e-10}), "compression": EXACT,
     "options": {"warmup_steps": 3}, "quiet_until": 3},
]


def test_keras_worker_momentum_matches_the_fp32_optimizers():
    steps = 8
    results = run_on_ranks(_keras_train, NUM_PROC, "gloo", args=(KERAS_CASES, steps),
                           timeout=240, env={"TF_USE_LEGACY_KERAS": "1"})
    for index, config in enumerate(KERAS_CASES):
        kind, hyper = config["optimizer"]
        fp32 = _keras_fp32_params(config, steps)
        for step in range(steps):
            np.testing.assert_array_equal(results[0][index][step], results[1][index][step])
            if kind == "SGD":
                np.testing.assert_allclose(results[0][index][step], fp32[step], rtol=2e-5,
                                           atol=2e-6, err_msg=f"{kind} {hyper} step {step}")
        if kind == "Adam":  # exact while warming up, then the frozen-variance reference
            warmup = config["options"]["warmup_steps"]
            want = _frozen_adam({"optimizer": ("Adam", {
                "lr": hyper["learning_rate"], "eps": hyper["epsilon"], "weight_decay": 0.0}),
                "quiet_until": config["quiet_until"]}, steps, warmup)
            for step in range(steps):
                np.testing.assert_allclose(results[0][index][step], want[step], rtol=2e-5,
                                           atol=2e-6, err_msg=f"Adam step {step}")


def test_pytorch_engine_rescales_residuals_when_the_learning_rate_changes():
    """Rate 1 -> 0.5 (and a zero rate in between, which changes nothing) doubles the residuals
    before the next exchange: the same step as an engine whose residuals were doubled by hand."""
    import torch

    from horovod_squeeze.fake import FakeWorld
    from horovod_squeeze.torch.engine import SqueezeEngine

    rates = [1.0, 0.0, 0.5]

    def body(comm, schedule):
        step_rate = {"value": 1.0}
        engine = SqueezeEngine(hs.ErrorFeedback(hs.ScaledSign()), [("w", (BIG,))],
                               collectives=comm, learning_rate=lambda: step_rate["value"],
                               min_compress_numel=0)
        applied = []
        for step, rate in enumerate(rates):
            if schedule:
                step_rate["value"] = rate
            elif step == 2:
                engine.scale_state_(2.0)
            engine.submit("w", torch.from_numpy(_gradient(step, comm.rank)[:BIG]))
            applied.append(engine.result("w").numpy().copy())
        return applied, engine.state[0]["worker_residual"].numpy().copy()

    scheduled = FakeWorld(NUM_PROC).run(lambda comm: body(comm, True))
    by_hand = FakeWorld(NUM_PROC).run(lambda comm: body(comm, False))
    for (applied, residual), (want_applied, want_residual) in zip(scheduled, by_hand):
        for got, want in zip(applied, want_applied):
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(residual, want_residual)
    assert np.abs(scheduled[0][1]).sum() > 0


def test_adam_direction_bound_is_exact_adams_tight_limit():
    """torch.optim.Adam's m_t / sqrt(v_t / (1 - beta2^t)) stays within adam_direction_bound on any
    gradients, and gradients growing like (beta2 / beta1)^k reach B sqrt((1 - beta2^t)(1 - g^t)),
    g = beta1^2 / beta2, the Cauchy-Schwarz equality: the clip never touches exact Adam's
    direction and could not be tighter."""
    import torch

    from horovod_squeeze.momentum import adam_direction_bound

    beta1, beta2, steps = 0.9, 0.999, 300
    bound = adam_direction_bound(beta1, beta2)
    assert adam_direction_bound(0.99, 0.9) is None  # beta1^2 >= beta2: no bound exists
    rng = np.random.default_rng(0)
    sequences = {"growing": (beta2 / beta1) ** np.arange(steps),
                 "spike": np.r_[np.zeros(steps - 1), 1.0],
                 "normal": rng.standard_normal(steps),
                 "heavy tailed": rng.standard_cauchy(steps)}
    for name, gradients in sequences.items():
        param = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        adam = torch.optim.Adam([param], betas=(beta1, beta2), eps=0.0)
        for t, gradient in enumerate(gradients, start=1):
            param.grad = torch.tensor([gradient], dtype=torch.float64)
            adam.step()
            state = adam.state[param]
            if state["exp_avg_sq"].item() == 0.0:  # no gradient yet: m = 0 too
                continue
            ratio = abs((state["exp_avg"] / (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt()).item())
            assert ratio <= bound, (name, t, ratio)
        if name == "growing":
            tight = bound * np.sqrt((1 - beta2 ** steps) * (1 - (beta1 ** 2 / beta2) ** steps))
            assert ratio == pytest.approx(tight, rel=1e-9)


def test_adam_consensus_momentum_is_bit_identical_to_the_reference():
    """Adam's rule through the engine (fake collectives, 1-bit DoubleSqueeze): each worker sends
    clip(s * (b1 m + (1 - b1) g_i), ±B), and every worker's momentum becomes the exchanged average
    over s. The preconditioner spans 1e-2..1e8 (a zero variance gives 1/eps), so the clip binds."""
    import torch

    from horovod_squeeze.fake import FakeWorld
    from horovod_squeeze.momentum import WorkerMomentum, adam_direction_bound
    from horovod_squeeze.torch.engine import SqueezeEngine

    steps, beta1, bound = 4, 0.9, adam_direction_bound(0.9, 0.999)
    algorithm = hs.DoubleSqueeze(hs.ScaledSign())
    scale = np.float32(10.0) ** np.linspace(-2, 8, BIG).astype(np.float32)

    def body(comm):
        engine = SqueezeEngine(
            algorithm, [("w", (BIG,))], collectives=comm, min_compress_numel=0,
            momentum=WorkerMomentum.adam(beta1, 0.999),
            momentum_scale=lambda name: torch.from_numpy(scale))
        applied = []
        for step in range(steps):
            engine.submit("w", torch.from_numpy(_gradient(step, comm.rank)[:BIG] * 1e-3))
            applied.append(engine.result("w").numpy().copy())
        return applied, engine.state[0]["momentum"].numpy().copy()

    ranks = FakeWorld(NUM_PROC).run(body)
    momentum = np.zeros(BIG, np.float32)
    state = init_state(algorithm, "sharded", BIG, NUM_PROC)
    b1, rest = np.float32(beta1), np.float32(1.0 - beta1)
    for step in range(steps):
        sent = [np.clip((momentum * b1 + _gradient(step, r)[:BIG] * np.float32(1e-3) * rest)
                        * scale, np.float32(-bound), np.float32(bound))
                for r in range(NUM_PROC)]
        assert max(np.abs(s).max() for s in sent) == np.float32(bound)  # the clip binds
        exchanged, state = simulate_step(algorithm, "sharded", sent, state, step=step)
        momentum = exchanged / scale
        for rank, (applied, _) in enumerate(ranks):
            np.testing.assert_array_equal(applied[step], exchanged, err_msg=f"rank {rank} {step}")
    for rank, (_, final_momentum) in enumerate(ranks):
        np.testing.assert_array_equal(final_momentum, momentum, err_msg=f"rank {rank}")
