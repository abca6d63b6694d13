"""Known per-rank gradients and the NumPy simulation they must match: shared by the PyTorch and
TensorFlow optimizer tests, so both frameworks are held to the same oracle."""
import numpy as np

import horovod_squeeze as hs
from horovod_squeeze.reference.simulate import init_state, simulate_step

# Parameter shapes of a small model: matrices, a bias below min_compress_numel, odd sizes.
SHAPES = {"layer1.weight": (37, 11), "layer1.bias": (37,), "layer2.weight": (5, 37),
          "layer3.weight": (64, 33)}
STEPS = 5

# Algorithm x compressor x exchange combinations both frameworks must match the simulation on.
CONFIGS = [
    {"compression": hs.DoubleSqueeze(hs.TopK(0.1))},
    {"compression": hs.DoubleSqueeze(hs.ScaledSign(block_size=64)), "exchange": "allgather"},
    {"compression": hs.ErrorFeedback(hs.ScaledSign())},
    {"compression": hs.ErrorFeedback(hs.TopK(0.05)), "exchange": "allgather"},
    {"compression": hs.NoFeedback(hs.ScaledSign(scale="rms"))},
    {"compression": hs.DoubleSqueeze(hs.ToContractive(hs.QSGD(4)))},
    {"compression": hs.DoubleSqueeze(hs.RandK(0.2, seed=2)), "exchange": "allreduce"},
]


def gradient(name, rank, step):
    """Gradient of parameter ``name`` on ``rank`` at ``step``: random, different per rank."""
    seed = sum(map(ord, name)) * 7919 + rank * 104729 + step * 1299709
    return np.random.default_rng(seed).standard_normal(SHAPES[name]).astype(np.float32)


def simulate(config, buckets, num_ranks):
    """Per step: applied gradients and per-bucket residuals, from the NumPy simulation."""
    algorithm, exchange = config["compression"], config.get("exchange", "sharded")
    states = {index: init_state(numel, num_ranks, exchange)
              for index, _, kind, numel in buckets if kind != "uncompressed"}
    trajectory = []
    for step in range(STEPS):
        applied = {}
        for index, names, kind, numel in buckets:
            grads = [np.concatenate([gradient(n, r, step).reshape(-1) for n in names])
                     for r in range(num_ranks)]
            if kind == "uncompressed":
                flat = np.mean(grads, axis=0)
            else:
                flat, states[index] = simulate_step(algorithm, exchange, grads, states[index],
                                                    step=step, bucket=index)
            offset = 0
            for n in names:
                size = int(np.prod(SHAPES[n]))
                applied[n] = flat[offset:offset + size].reshape(SHAPES[n])
                offset += size
        trajectory.append({"applied": applied,
                           "states": {i: (s.worker_residuals, s.server_residuals)
                                      for i, s in states.items()}})
    return trajectory


def assert_close(got, expected, what):
    scale = max(float(np.linalg.norm(expected)), 1e-30)
    error = float(np.linalg.norm(np.asarray(got, np.float64) - expected)) / scale
    assert error <= 1e-6, f"{what}: relative error {error:.3g}"


def check_against_simulation(config, results, num_ranks):
    buckets = results[0]["buckets"]
    simulated = simulate(config, buckets, num_ranks)
    exchange = config.get("exchange", "sharded")
    for rank, result in enumerate(results):
        assert result["buckets"] == buckets
        for step, (got, want) in enumerate(zip(result["steps"], simulated)):
            for name in SHAPES:
                assert_close(got["applied"][name], want["applied"][name],
                              f"rank {rank} step {step} applied {name}")
            for index, (workers, servers) in want["states"].items():
                assert_close(got["worker"][index], workers[rank],
                              f"rank {rank} step {step} bucket {index} worker residual")
                owner = rank if exchange == "sharded" else 0
                assert_close(got["server"][index], servers[owner],
                              f"rank {rank} step {step} bucket {index} server residual")
