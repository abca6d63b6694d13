"""ServerFeedback, through both engines on the in-process fake collectives, against its oracle."""
import numpy as np
import pytest

import horovod_squeeze as hs
from horovod_squeeze.fake import FakeWorld
from horovod_squeeze.reference.simulate import init_state, simulate_step

SHAPES = {"w1": (40, 30), "w2": (333,), "w3": (17, 19)}
STEPS = 4
ALGORITHMS = [hs.ServerFeedback(hs.ScaledSign()),
              hs.ServerFeedback(hs.QSGD(4, seed=1), server=hs.ScaledSign(block_size=64))]


def _gradient(name, rank, step):
    seed = 1000 * step + 10 * rank + list(SHAPES).index(name)
    return np.random.default_rng(seed).standard_normal(SHAPES[name]).astype(np.float32)


def _torch_body(algorithm, exchange):
    def body(comm):
        import torch

        from horovod_squeeze.torch.engine import SqueezeEngine

        engine = SqueezeEngine(algorithm, list(SHAPES.items()), collectives=comm,
                               exchange=exchange, min_compress_numel=0)
        applied = []
        for step in range(STEPS):
            for name in SHAPES:
                engine.submit(name, torch.from_numpy(_gradient(name, comm.rank, step)))
            applied.append({n: engine.result(n).numpy() for n in SHAPES})
        return applied, [(b.names, b.numel) for b in engine.buckets], {
            name: tensor.numpy() for name, tensor in engine.state[0].items()}
    return body


def _tensorflow_body(algorithm, exchange):
    def body(comm):
        import tensorflow as tf

        from horovod_squeeze.tensorflow.engine import SqueezeEngine

        engine = SqueezeEngine(algorithm, list(SHAPES.items()), collectives=comm,
                               exchange=exchange, min_compress_numel=0)
        applied = []
        for step in range(STEPS):
            out = engine([tf.constant(_gradient(n, comm.rank, step)) for n in SHAPES])
            applied.append({n: a.numpy() for n, a in zip(SHAPES, out)})
        return applied, [(b.names, b.numel) for b in engine.buckets], {
            name: v.numpy() for name, v in engine.state[0].items()}
    return body


@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
@pytest.mark.parametrize("exchange", ["sharded", "allgather"])
@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=repr)
def test_matches_its_oracle(algorithm, exchange, framework):
    n = 3
    body = (_torch_body if framework == "torch" else _tensorflow_body)(algorithm, exchange)
    results = FakeWorld(n).run(body)
    ((names, numel),) = results[0][1]
    state = init_state(algorithm, exchange, numel, n)
    for step in range(STEPS):
        grads = [np.concatenate([_gradient(name, r, step).reshape(-1) for name in names])
                 for r in range(n)]
        want, state = simulate_step(algorithm, exchange, grads, state, step=step,
                                    sizes=[np.prod(SHAPES[name]) for name in names])
        for rank in range(n):
            got = np.concatenate([results[rank][0][step][name].reshape(-1) for name in names])
            np.testing.assert_array_equal(got, want)
    for rank in range(n):
        owner = rank if exchange == "sharded" else 0
        np.testing.assert_array_equal(results[rank][2]["server_residual"],
                                      state["server"]["server_residual"][owner])
        assert set(results[rank][2]) == {"server_residual"}  # no worker state


def test_feedback_returns_what_the_server_dropped():
    """Constant gradients: with the server's residual the applied sum tracks the true sum;
    NoFeedback with the same lossy server compressor drifts."""
    n, steps = 2, 100
    grads = [np.random.default_rng(r).standard_normal(4096).astype(np.float32) for r in range(n)]
    drift = {}
    for algorithm in (hs.ServerFeedback(hs.Identity(), server=hs.ScaledSign()),
                      hs.NoFeedback(hs.Identity(), server=hs.ScaledSign(block_size=64))):
        state, total = init_state(algorithm, "allgather", 4096, n), 0
        for step in range(steps):
            applied, state = simulate_step(algorithm, "allgather", grads, state, step=step)
            total = total + applied
        truth = steps * sum(grads) / n
        drift[type(algorithm).__name__] = np.linalg.norm(total - truth) / np.linalg.norm(truth)
    assert drift["ServerFeedback"] < 0.10 and drift["NoFeedback"] > 5 * drift["ServerFeedback"], drift
