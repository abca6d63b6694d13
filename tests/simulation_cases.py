"""Known per-rank gradients and the NumPy simulation they must match: shared by the PyTorch and
TensorFlow optimizer tests and the in-process engine tests, so every binding is held to one oracle
(:mod:`horovod_squeeze.reference.simulate`).

Shapes of the records (``n`` ranks, ``T`` steps):

``buckets``
    What an engine laid out, one ``(index, names, exchange, numel)`` per bucket: ``exchange`` is the
    bucket's exchange name (``"sharded"``, ``"allgather"``, ``"allreduce"``) or ``"uncompressed"``
    for the plain bucket of small tensors (``bucket.exchange.name`` in both engines); ``names`` in
    the bucket's (flat buffer) order.

``results`` (what a test collects from the engine, one per rank, in rank order)
    ``{"buckets": buckets, "steps": [T records]}``, each step record::

        {"applied": {param name: array of the parameter's shape},   # what the rank applied
         "state": {bucket index: {state name: 1-D float32 array}}}   # the rank's live tensors

    ``state`` holds every bucket (the plain bucket: ``{}``) and, for a compressed bucket, every
    state tensor of ``algorithm.state()`` as the engine stores it: a worker tensor covers the
    bucket (zero-padded to ``n * shard`` entries under ``sharded``), a server tensor the shard the
    rank owns under ``sharded``, else the whole bucket (a replicated copy).

``simulate(config, buckets, n)``
    The same per step, with each state tensor given for every rank:
    ``{"applied": {...}, "state": {bucket index: {state name: [n arrays, rank order]}}}``.

``config`` is a dict of the wrapper's keyword arguments: ``compression`` (an algorithm),
``exchange`` (default ``"sharded"``), ``warmup_steps`` (default 0: those first steps are a plain
average and the state stays zero), ``learning_rate`` (for an algorithm whose output is a model
increment: a number, or a function of the step; plain steps then apply ``-lr * average``),
``precision`` (``"float32"``, the default, or ``"float64"``: the dtype gradients, state and
arithmetic are simulated in); other keys (bucket options) only shape ``buckets``.
"""
import numpy as np

import horovod_squeeze as hs
from horovod_squeeze.algorithms import MODEL_INCREMENT, SERVER
from horovod_squeeze.exchange import make_exchange
from horovod_squeeze.reference.simulate import init_state, simulate_step

# Parameter shapes of a small model: matrices, a bias below min_compress_numel, odd sizes.
SHAPES = {"layer1.weight": (37, 11), "layer1.bias": (37,), "layer2.weight": (5, 37),
          "layer3.weight": (64, 33)}
STEPS = 5

# Algorithm x compressor x exchange combinations every framework must match the simulation on.
CONFIGS = [
    {"compression": hs.DoubleSqueeze(hs.TopK(0.1))},
    {"compression": hs.DoubleSqueeze(hs.ScaledSign(block_size=64)), "exchange": "allgather"},
    {"compression": hs.ErrorFeedback(hs.ScaledSign())},
    {"compression": hs.ErrorFeedback(hs.TopK(0.05)), "exchange": "allgather"},
    {"compression": hs.NoFeedback(hs.ScaledSign(scale="rms"))},
    {"compression": hs.DoubleSqueeze(hs.ToContractive(hs.QSGD(4)))},
    {"compression": hs.DoubleSqueeze(hs.RandK(0.2, seed=2)), "exchange": "allreduce"},
    {"compression": hs.ErrorFeedback(hs.ScaledSign(), server=hs.ScaledSign())},
    {"compression": hs.DoubleSqueeze(worker=hs.TopK(0.1), server=hs.ScaledSign())},
]

UNCOMPRESSED = "uncompressed"


def gradient(name, rank, step):
    """Gradient of parameter ``name`` on ``rank`` at ``step``: random, different per rank."""
    seed = sum(map(ord, name)) * 7919 + rank * 104729 + step * 1299709
    return np.random.default_rng(seed).standard_normal(SHAPES[name]).astype(np.float32)


def _rank_order_mean(arrays):
    """The plain average as the collectives compute it: in the arrays' precision, summed in rank
    order."""
    total = arrays[0]
    for array in arrays[1:]:
        total = total + array
    return total / np.float32(len(arrays))


def _per_rank(algorithm, exchange, state, num_ranks):
    """Each rank's view of a simulated bucket state: its worker tensors, and the server shard it
    owns (sharded) or the one replicated copy."""
    views = {name: list(tensors) for name, tensors in state["worker"].items()}
    for name, tensors in state["server"].items():
        views[name] = [tensors[rank if exchange == "sharded" else 0] for rank in range(num_ranks)]
    assert set(views) == {spec.name for spec in algorithm.state()}
    return views


def simulate(config, buckets, num_ranks, *, steps=STEPS, gradients=None):
    """Per step, what every rank applies and every rank's state, from the NumPy simulation.

    ``gradients(name, rank, step)`` gives the per-rank gradients (default :func:`gradient`); they
    are simulated in the config's precision (float32 by default) and the applied values have the
    gradient's shape, in that precision.
    """
    gradients = gradient if gradients is None else gradients
    algorithm = config["compression"]
    exchange = make_exchange(config.get("exchange", "sharded")).name
    warmup = config.get("warmup_steps", 0)
    rate = config.get("learning_rate")
    learning_rate = rate if callable(rate) else lambda step: rate
    precision = config.get("precision", "float32")
    real = np.dtype(precision).type
    states = {index: init_state(algorithm, exchange, numel, num_ranks, precision)
              for index, _, kind, numel in buckets if kind != UNCOMPRESSED}
    for index, _, kind, _ in buckets:
        assert kind in (exchange, UNCOMPRESSED), f"bucket {index} travels by {kind!r}"
    trajectory = []
    for step in range(steps):
        applied = {}
        for index, names, kind, numel in buckets:
            per_rank = [[np.asarray(gradients(n, r, step)) for n in names]
                        for r in range(num_ranks)]
            grads = [np.concatenate([g.astype(precision).reshape(-1) for g in parts])
                     for parts in per_rank]
            assert grads[0].size == numel, f"bucket {index}: {grads[0].size} entries, not {numel}"
            rate = learning_rate(step)
            if kind == UNCOMPRESSED or step < warmup:
                flat = _rank_order_mean(grads)
                if algorithm.output == MODEL_INCREMENT:  # the algorithm's uncompressed limit
                    flat = flat * real(-rate)
            else:
                flat, states[index] = simulate_step(
                    algorithm, exchange, grads, states[index], step=step, bucket=index,
                    sizes=[g.size for g in per_rank[0]], learning_rate=rate,
                    precision=precision)
            offset = 0
            for n, g in zip(names, per_rank[0]):
                applied[n] = flat[offset:offset + g.size].reshape(g.shape)
                offset += g.size
        trajectory.append({
            "applied": applied,
            "state": {index: (_per_rank(algorithm, exchange, states[index], num_ranks)
                              if kind != UNCOMPRESSED else {})
                      for index, _, kind, _ in buckets}})
    return trajectory


def assert_close(got, expected, what, *, exact=False):
    """Relative error at most 1e-6 (``exact``: bit-identical)."""
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape, f"{what}: shape {got.shape}, expected {expected.shape}"
    if exact:
        np.testing.assert_array_equal(got, expected, err_msg=what)
        return
    scale = max(float(np.linalg.norm(expected)), 1e-30)
    error = float(np.linalg.norm(np.asarray(got, np.float64) - expected)) / scale
    assert error <= 1e-6, f"{what}: relative error {error:.3g}"


def check_against_simulation(config, results, num_ranks, *, exact=False, gradients=None):
    """Every rank's applied gradients and every state tensor, step by step, against
    :func:`simulate` (``exact``: bit-identical, else relative error 1e-6)."""
    buckets = results[0]["buckets"]
    steps = len(results[0]["steps"])
    assert steps > 0
    simulated = simulate(config, buckets, num_ranks, steps=steps, gradients=gradients)
    server_names = {s.name for s in config["compression"].state() if s.placement == SERVER}
    for rank, result in enumerate(results):
        assert result["buckets"] == buckets, f"rank {rank} laid out other buckets"
        assert len(result["steps"]) == steps
        for step, (got, want) in enumerate(zip(result["steps"], simulated)):
            assert set(got["applied"]) == set(want["applied"])
            for name in want["applied"]:
                assert_close(got["applied"][name], want["applied"][name],
                             f"rank {rank} step {step} applied {name}", exact=exact)
            assert set(got["state"]) == set(want["state"]), f"rank {rank}: buckets with state"
            for index, tensors in want["state"].items():
                assert set(got["state"][index]) == set(tensors), \
                    f"rank {rank} bucket {index}: state {sorted(got['state'][index])}"
                for name, per_rank in tensors.items():
                    what = (f"rank {rank} step {step} bucket {index} "
                            f"{'server' if name in server_names else 'worker'} state {name}")
                    assert_close(got["state"][index][name], per_rank[rank], what, exact=exact)
