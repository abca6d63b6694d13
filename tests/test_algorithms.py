"""Every algorithm over every exchange through the PyTorch engine on in-process ranks
(:class:`horovod_squeeze.fake.FakeWorld`), step by step against the NumPy oracle
(:mod:`horovod_squeeze.reference.simulate`): what every rank applies and every state tensor of every
rank, bit for bit. Also the protocol's other paths (warm-up, low-precision gradients, a model-
increment algorithm that reads the learning rate) and the configuration errors and warnings."""
import dataclasses
import re
import warnings

import numpy as np
import pytest
import torch

import horovod_squeeze as hs
from horovod_squeeze.algorithms import (
    GRADIENT, MODEL, MODEL_INCREMENT, SERVER, WORKER, Algorithm, ServerOut, StateSpec, WorkerOut,
    compensate, mean,
)
from horovod_squeeze.exchange import PLAIN, Sharded, shard_numel
from horovod_squeeze.fake import FakeWorld
from horovod_squeeze.plan import EngineOptions
from horovod_squeeze.reference.simulate import init_state, simulate_step
from horovod_squeeze.torch.engine import SqueezeEngine
from simulation_cases import SHAPES, check_against_simulation, gradient, simulate

STEPS = 4
# Buckets of at most 1310 entries; tensors below 100 entries go to the plain bucket.
LAYOUT = {"bucket_cap_mb": 0.005, "min_compress_numel": 100}

# The table's model. Its buckets: head + norm + fc2 weights (650 entries), fc1.weight alone (1200),
# conv + embed weights (866), and the two biases plain. So compressions see several tensors, a
# tensor smaller than a shard, and shard boundaries that cut tensors (every rank count).
TABLE_SHAPES = {"embed.weight": (50, 13), "conv.weight": (8, 3, 3, 3), "conv.bias": (8,),
                "fc1.weight": (40, 30), "fc1.bias": (40,), "fc2.weight": (10, 40),
                "norm.weight": (130,), "head.weight": (3, 40)}

# Each algorithm with and without a server compressor, deterministic and stochastic compressors
# (QSGD, RandK, Ternary, Natural draw random numbers), linear ones for the allreduce exchange.
ALGORITHMS = [
    hs.DoubleSqueeze(hs.ScaledSign()),
    hs.DoubleSqueeze(hs.TopK(0.1)),
    hs.DoubleSqueeze(hs.ToContractive(hs.QSGD(4))),
    hs.DoubleSqueeze(hs.RandK(0.2, seed=2)),
    hs.DoubleSqueeze(hs.ToContractive(hs.Ternary(block_size=64))),
    hs.DoubleSqueeze(worker=hs.TopK(0.1), server=hs.ScaledSign(block_size=64)),
    hs.DoubleSqueeze(worker=hs.RandK(0.25, seed=5), server=hs.FP16()),
    hs.ErrorFeedback(hs.ScaledSign()),
    hs.ErrorFeedback(hs.TopK(0.05)),
    hs.ErrorFeedback(hs.Natural(seed=3)),
    hs.ErrorFeedback(hs.FP16()),
    hs.ErrorFeedback(hs.ScaledSign(), server=hs.ScaledSign()),
    hs.ErrorFeedback(hs.RandK(0.3, seed=1), server=hs.ToContractive(hs.QSGD(8, seed=4))),
    hs.NoFeedback(hs.QSGD(4)),
    hs.NoFeedback(hs.ScaledSign(scale="rms")),
    hs.NoFeedback(hs.RandK(0.3, unbiased=True)),
    hs.NoFeedback(hs.Ternary(), server=hs.TopK(0.2)),
    hs.ServerFeedback(hs.ToContractive(hs.QSGD(4))),
    hs.ServerFeedback(hs.RandK(0.3, unbiased=True), server=hs.TopK(0.5)),
    hs.ServerFeedback(hs.QSGD(4, seed=2), server=hs.ScaledSign(block_size=64)),
    hs.DORE(hs.Ternary(block_size=64)),
    hs.DORE(hs.QSGD(4), server=hs.Ternary(), alpha=0.05, beta=0.5, eta=0.2),
    hs.DORE(hs.ScaledSign(), alpha=1.0, eta=1.0),
    hs.DORE(hs.RandK(0.3, seed=1, unbiased=True), server=hs.FP16(), alpha=0.2, eta=1.0),
    hs.DoubleQuantization(b=4, b_x=8),
    hs.DoubleQuantization(b=2, b_x=6, seed=3),
    hs.EF21(hs.TopK(0.1)),
    hs.EF21(hs.RandK(0.3, seed=2)),
    hs.EF21(hs.ScaledSign(), server=hs.FP16(), alpha=0.5),
]
# What model-increment algorithms read at every step: the wrapped optimizer's learning rate.
LEARNING_RATE = 0.375
EXCHANGES = ["sharded", "allgather", "allreduce"]


def _valid(algorithm, exchange):
    """Allreduce needs a linear worker compressor. FP16 values are averaged in float16 there,
    which the oracle does not model: see test_fp16_values_are_averaged_in_float16_over_allreduce."""
    if exchange != "allreduce":
        return True
    return algorithm.worker.linear and algorithm.worker != hs.FP16()


CASES = [pytest.param(a, e, id=f"{e}-{a!r}") for a in ALGORITHMS for e in EXCHANGES
         if _valid(a, e)]


def random_gradient(shape, rank, step):
    """A gradient of any shape: random, different per rank and step."""
    seed = 7 + 1009 * rank + 100_003 * step
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def table_gradient(name, rank, step):
    """A gradient of a :data:`TABLE_SHAPES` tensor; tensors differ in magnitude by up to 100x, so
    a scale shared across tensors would show."""
    index = list(TABLE_SHAPES).index(name)
    seed = 31 * index + 1009 * rank + 100_003 * step
    values = np.random.default_rng(seed).standard_normal(TABLE_SHAPES[name])
    return (values * 10.0 ** (index % 3 - 1)).astype(np.float32)


def run_engine(algorithm, num_ranks, *, steps=STEPS, shapes=SHAPES, gradients=gradient,
               dtype=torch.float32, learning_rate=None, **options):
    """Runs the engine on ``num_ranks`` in-process ranks; per rank, the records of
    :mod:`simulation_cases` (applied values upcast to float64, exactly) and the engine's output
    dtypes."""

    def body(comm):
        engine = SqueezeEngine(algorithm, list(shapes.items()), collectives=comm,
                               learning_rate=learning_rate, **options)
        records, dtypes = [], set()
        for step in range(steps):
            for name in reversed(list(shapes)):  # as backward produces them
                engine.submit(name, torch.from_numpy(gradients(name, comm.rank, step)).to(dtype))
            applied = {}
            for name, shape in shapes.items():
                out = engine.result(name)
                assert out.shape == torch.Size(shape)
                dtypes.add(out.dtype)
                applied[name] = out.double().numpy().copy()
            records.append({"applied": applied,
                            "state": {i: {n: t.numpy().copy() for n, t in s.items()}
                                      for i, s in engine.state.items()}})
        return {"buckets": [(b.index, list(b.names), b.exchange.name, b.numel)
                            for b in engine.buckets],
                "steps": records, "dtypes": dtypes}

    return FakeWorld(num_ranks, timeout=60).run(body)


def _lossy_one_pass(algorithm, exchange):
    """A server compressor without a server residual on an exchange with no second pass: the
    engine warns that it only loses precision."""
    return (exchange != "sharded" and algorithm.server != hs.Identity()
            and not algorithm.state_names(SERVER))


@pytest.mark.parametrize("num_ranks", [2, 3, 4])
@pytest.mark.parametrize("algorithm, exchange", CASES)
def test_engine_matches_reference_bit_for_bit(algorithm, exchange, num_ranks):
    config = {"compression": algorithm, "exchange": exchange, "learning_rate": LEARNING_RATE,
              **LAYOUT}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = run_engine(algorithm, num_ranks, shapes=TABLE_SHAPES, gradients=table_gradient,
                             exchange=exchange, learning_rate=lambda: LEARNING_RATE, **LAYOUT)
    messages = {str(w.message) for w in caught}
    if _lossy_one_pass(algorithm, exchange):
        assert len(messages) == 1 and "nothing travels in a second pass" in messages.pop()
    else:
        assert not messages
    buckets = results[0]["buckets"]
    assert [kind for _, _, kind, _ in buckets] == [exchange] * 3 + ["uncompressed"]
    assert [len(names) for _, names, _, _ in buckets] == [3, 1, 2, 2]
    check_against_simulation(config, results, num_ranks, exact=True, gradients=table_gradient)
    # The records are not trivially equal: compression changed what was applied.
    mean0 = np.mean([table_gradient("fc1.weight", r, 0) for r in range(num_ranks)], axis=0)
    applied0 = results[0]["steps"][0]["applied"]["fc1.weight"]
    assert not np.allclose(applied0, mean0, rtol=1e-3, atol=1e-3) or algorithm.worker == hs.FP16()


@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_one_parameter_model_steps_by_its_gradient(framework):
    # Regression: a one-entry tensor in an 8-entry shard once took the L1 scale of the padded
    # shard, 1/8 of its value in each pass, so the model moved by a fraction of its gradient.
    # With per-segment scales and padding that never travels, 1-bit sign of one entry is exact.
    algorithm, steps = hs.DoubleSqueeze(hs.ScaledSign()), 3

    def body(comm):
        if framework == "torch":
            engine = SqueezeEngine(algorithm, [("w", (1,))], collectives=comm,
                                   exchange="sharded", min_compress_numel=0)
            out = []
            for _ in range(steps):
                engine.submit("w", torch.ones(1))
                out.append(engine.result("w").tolist())
            return out, {n: t.tolist() for n, t in engine.state[0].items()}
        import tensorflow as tf

        from horovod_squeeze.tensorflow.engine import SqueezeEngine as TFEngine

        engine = TFEngine(algorithm, [("w", (1,))], collectives=comm, exchange="sharded",
                          min_compress_numel=0)
        out = [engine([tf.ones([1])])[0].numpy().tolist() for _ in range(steps)]
        return out, {n: v.numpy().tolist() for n, v in engine.state[0].items()}

    for rank, (applied, state) in enumerate(FakeWorld(2).run(body)):
        assert applied == [[1.0]] * steps, f"rank {rank}"
        assert state == {"worker_residual": [0.0] * 16, "server_residual": [0.0] * 8}


@pytest.mark.parametrize("num_ranks", [2, 3, 4])
def test_fp16_values_are_averaged_in_float16_over_allreduce(num_ranks):
    # The allreduce averages FP16's wire values, so the average is rounded to float16 (the fake
    # sums in float32 and rounds once); the worker residuals do not depend on it.
    algorithm = hs.ErrorFeedback(hs.FP16())
    results = run_engine(algorithm, num_ranks, exchange="allreduce", **LAYOUT)
    simulated = simulate({"compression": algorithm, "exchange": "allreduce"},
                         results[0]["buckets"], num_ranks, steps=STEPS)
    rounded = 0
    for rank, result in enumerate(results):
        for got, want in zip(result["steps"], simulated):
            for name in SHAPES:
                expected = want["applied"][name]
                if name != "layer1.bias":  # the plain bucket is averaged in float32
                    expected = expected.astype(np.float16).astype(np.float32)
                    rounded += np.count_nonzero(expected != want["applied"][name])
                np.testing.assert_array_equal(got["applied"][name], expected)
            for index, tensors in want["state"].items():
                for state_name, per_rank in tensors.items():
                    np.testing.assert_array_equal(got["state"][index][state_name],
                                                  per_rank[rank])
    assert rounded > 0  # float16 rounding did change the average


def test_table_covers_every_algorithm_exchange_and_stochastic_compressors():
    exported = {getattr(hs, name) for name in hs.__all__}
    kinds = {k for k in exported if isinstance(k, type) and issubclass(k, hs.Algorithm)
             and k is not hs.Algorithm}
    assert {type(a) for a in ALGORITHMS} == kinds  # every algorithm the package exports
    for kind in kinds:
        named = [a for a in ALGORITHMS if type(a) is kind]
        assert any(a.worker.stochastic or getattr(a.worker, "inner", a.worker).stochastic
                   for a in named)
        if kind is hs.DoubleQuantization:  # its compressors are Q(b) and Q(b_x), by definition
            assert len({(a.b, a.b_x) for a in named}) > 1
            continue
        assert any(a.server == a.default_server() for a in named)
        assert any(a.server != a.default_server() for a in named)
        assert any(a.worker.linear for a in named)  # so each runs over allreduce too
    assert {e for _, e in (c.values for c in CASES)} == set(EXCHANGES)


def test_default_server_compressors():
    sign = hs.ScaledSign()
    assert hs.DoubleSqueeze(sign).server == sign  # compressed both ways
    assert hs.ErrorFeedback(sign).server == hs.Identity()  # the average returns exactly
    assert hs.NoFeedback(sign).server == hs.Identity()
    assert hs.ErrorFeedback(sign, server=hs.TopK(0.1)).server == hs.TopK(0.1)
    # Printed as written: the server compressor only when it is not the default.
    assert repr(hs.ErrorFeedback(sign)) == f"ErrorFeedback({sign!r})"
    assert repr(hs.DoubleSqueeze(sign)) == f"DoubleSqueeze({sign!r})"
    assert repr(hs.DoubleSqueeze(sign, server=hs.TopK(0.1))) == \
        f"DoubleSqueeze({sign!r}, server={hs.TopK(0.1)!r})"
    assert [(s.name, s.placement) for s in hs.DoubleSqueeze(sign).state()] == \
        [("worker_residual", WORKER), ("server_residual", SERVER)]
    assert [s.name for s in hs.ErrorFeedback(sign).state()] == ["worker_residual"]
    assert hs.NoFeedback(sign).state() == ()


@pytest.mark.parametrize("exchange", ["sharded", "allgather"])
def test_error_feedback_returns_the_average_of_the_workers_payloads_exactly(exchange):
    # Independent of the oracle's modules: ErrorFeedback's first step applies mean_i C(g_i),
    # with no loss on the way back (the sharded pass 2 is fp32), and keeps e_i = g_i - C(g_i).
    from horovod_squeeze import reference

    numel, num_ranks, compressor = 3000, 2, hs.TopK(0.05)
    grads = [random_gradient(numel, r, 0) for r in range(num_ranks)]
    results = run_engine(hs.ErrorFeedback(compressor), num_ranks, steps=1, shapes={"w": (numel,)},
                         gradients=lambda n, r, s: grads[r], exchange=exchange,
                         min_compress_numel=0)
    # TopK compresses each vector: the whole bucket (allgather) or each shard's real entries
    # (sharded: the last shard's padding is never selected).
    vector = numel if exchange == "allgather" else shard_numel(numel, num_ranks)
    pieces = [np.concatenate([reference.decompress(compressor, reference.compress(
        compressor, g[start:start + vector]), min(vector, numel - start))
        for start in range(0, numel, vector)]) for g in grads]
    expected = (pieces[0] + pieces[1]) / np.float32(2)
    assert np.count_nonzero(expected) < 0.11 * numel  # at most two ranks' 5%
    for rank in range(num_ranks):
        record = results[rank]["steps"][0]
        np.testing.assert_array_equal(record["applied"]["w"], expected)
        residual = record["state"][0]["worker_residual"][:numel]
        np.testing.assert_array_equal(residual, grads[rank] - pieces[rank])
        assert np.count_nonzero(residual) == numel - np.count_nonzero(pieces[rank])


@pytest.mark.parametrize("exchange", ["sharded", "allgather", "allreduce"])
@pytest.mark.parametrize("algorithm", [hs.DoubleSqueeze(hs.RandK(0.1, seed=7)),
                                       hs.ErrorFeedback(hs.RandK(0.1, seed=7))], ids=repr)
def test_error_compensation_telescopes(algorithm, exchange):
    # Independent of the oracle: with error feedback nothing is lost, only delayed, so
    # sum_t applied_t + mean_i e_i (+ e) = sum_t mean_i g_i after any number of steps.
    num_ranks, steps = 3, 6
    shapes = {"w": (50, 41)}
    results = run_engine(algorithm, num_ranks, steps=steps, shapes=shapes,
                         gradients=lambda n, r, s: random_gradient((50, 41), r, s),
                         exchange=exchange, min_compress_numel=0)
    numel = 50 * 41
    sent = sum(np.mean([random_gradient((50, 41), r, s).astype(np.float64)
                        for r in range(num_ranks)], axis=0) for s in range(steps)).reshape(-1)
    for rank in range(num_ranks):
        applied = sum(rec["applied"]["w"].astype(np.float64) for rec in results[rank]["steps"])
        final = [results[r]["steps"][-1]["state"][0] for r in range(num_ranks)]
        owed = np.mean([f["worker_residual"][:numel] for f in final], axis=0, dtype=np.float64)
        if "server_residual" in final[0]:
            owed = owed + (np.concatenate([f["server_residual"] for f in final])[:numel]
                           if exchange == "sharded" else final[rank]["server_residual"])
        np.testing.assert_allclose(applied.reshape(-1) + owed, sent, rtol=0, atol=2e-5)
        assert np.linalg.norm(owed) > 0.1 * np.linalg.norm(sent)  # RandK(0.1) withholds a lot


@pytest.mark.parametrize("exchange", ["sharded", "allgather"])
def test_warmup_steps_are_plain_averages_with_zero_state(exchange):
    algorithm = hs.DoubleSqueeze(hs.ScaledSign())
    config = {"compression": algorithm, "exchange": exchange, "warmup_steps": 2, **LAYOUT}
    results = run_engine(algorithm, 3, steps=4, exchange=exchange, warmup_steps=2, **LAYOUT)
    check_against_simulation(config, results, 3, exact=True)
    for result in results:
        for step, record in enumerate(result["steps"]):
            norms = [np.linalg.norm(t) for s in record["state"].values() for t in s.values()]
            assert len(norms) == 4  # two compressed buckets, two tensors each
            assert all(n == 0 for n in norms) if step < 2 else all(n > 0 for n in norms)
        first = result["steps"][0]["applied"]["layer3.weight"]
        want = (gradient("layer3.weight", 0, 0) + gradient("layer3.weight", 1, 0)
                + gradient("layer3.weight", 2, 0)) / np.float32(3)
        np.testing.assert_array_equal(first, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("algorithm, exchange", [
    (hs.DoubleSqueeze(hs.ScaledSign()), "sharded"),
    (hs.ErrorFeedback(hs.TopK(0.1)), "allgather"),
    (hs.NoFeedback(hs.RandK(0.2, seed=3)), "allreduce")], ids=str)
def test_low_precision_gradients_are_computed_in_float32(dtype, algorithm, exchange):
    def rounded(name, rank, step):  # float32 values the gradient's dtype holds exactly
        return torch.from_numpy(gradient(name, rank, step)).to(dtype).float().numpy()

    results = run_engine(algorithm, 3, gradients=rounded, dtype=dtype, exchange=exchange, **LAYOUT)
    config = {"compression": algorithm, "exchange": exchange}
    simulated = simulate(config, results[0]["buckets"], 3, steps=STEPS, gradients=rounded)
    for rank, result in enumerate(results):
        assert result["dtypes"] == {dtype}  # returned in the gradient's dtype
        for step, (got, want) in enumerate(zip(result["steps"], simulated)):
            for name in SHAPES:
                expected = torch.from_numpy(want["applied"][name]).to(dtype).float().numpy()
                np.testing.assert_array_equal(got["applied"][name], expected,
                                              err_msg=f"rank {rank} step {step} {name}")
            for index, tensors in want["state"].items():  # the state stays float32
                for state_name, per_rank in tensors.items():
                    assert got["state"][index][state_name].dtype == np.float32
                    np.testing.assert_array_equal(got["state"][index][state_name],
                                                  per_rank[rank])
        # The state holds float32 values the low-precision dtype cannot represent.
        if algorithm.state():
            state = result["steps"][-1]["state"][0]["worker_residual"]
            assert np.any(torch.from_numpy(state).to(dtype).float().numpy() != state)


# Each kind of state and every exchange, for float64 models.
FLOAT64_CASES = [
    pytest.param(hs.DORE(hs.Ternary(block_size=64)), "sharded", id="DORE-sharded"),
    pytest.param(hs.DORE(hs.QSGD(4), server=hs.Ternary(), eta=0.2), "allgather",
                 id="DORE-allgather"),
    pytest.param(hs.DoubleQuantization(b=4, b_x=8), "sharded", id="DoubleQuantization-sharded"),
    pytest.param(hs.DoubleSqueeze(hs.ScaledSign()), "sharded", id="DoubleSqueeze-sharded"),
    pytest.param(hs.ErrorFeedback(hs.TopK(0.1)), "allgather", id="ErrorFeedback-allgather"),
    pytest.param(hs.DoubleSqueeze(hs.RandK(0.2, seed=2)), "allreduce",
                 id="DoubleSqueeze-allreduce"),
]


def table_gradient64(name, rank, step):
    """:func:`table_gradient`'s values in float64, which float32 cannot hold."""
    index = list(TABLE_SHAPES).index(name)
    values = np.random.default_rng(31 * index + 1009 * rank + 100_003 * step).standard_normal(
        TABLE_SHAPES[name])
    return values * 10.0 ** (index % 3 - 1)


@pytest.mark.parametrize("num_ranks", [2, 4])
@pytest.mark.parametrize("algorithm, exchange", FLOAT64_CASES)
def test_float64_models_keep_float64_state_bit_for_bit(algorithm, exchange, num_ranks):
    # precision="float64": gradients, state, arithmetic and the plain average in float64; the
    # compressors see float32 and decode exactly, as the reference does.
    config = {"compression": algorithm, "exchange": exchange, "learning_rate": LEARNING_RATE,
              "precision": "float64", **LAYOUT}
    results = run_engine(algorithm, num_ranks, shapes=TABLE_SHAPES, gradients=table_gradient64,
                         dtype=torch.float64, exchange=exchange, precision="float64",
                         learning_rate=lambda: LEARNING_RATE, **LAYOUT)
    # Allreduce averages the wire's float32 values, where the reference averages them in float64.
    check_against_simulation(config, results, num_ranks, exact=exchange != "allreduce",
                             gradients=table_gradient64)
    simulated32 = simulate({**config, "precision": "float32"}, results[0]["buckets"], num_ranks,
                           steps=STEPS, gradients=table_gradient64)
    for result in results:
        assert result["dtypes"] == {torch.float64}
        last = result["steps"][-1]
        for tensors in last["state"].values():
            for name, value in tensors.items():
                assert value.dtype == np.float64, name
                # Double quantization's state is built from decoded values only, which float32
                # often holds; the others take the gradients in.
                assert (isinstance(algorithm, hs.DoubleQuantization)
                        or np.any(value.astype(np.float32) != value)), f"{name}: float32 values"
    # Not what float32 arithmetic gives: the plain bucket's average, and the state.
    rank0 = results[0]["steps"][-1]
    assert np.any(rank0["applied"]["conv.bias"] != simulated32[-1]["applied"]["conv.bias"])
    assert any(np.any(value != simulated32[-1]["state"][index][name][0])
               for index, tensors in rank0["state"].items() for name, value in tensors.items())


@pytest.mark.parametrize("algorithm, exchange", FLOAT64_CASES[:2] + FLOAT64_CASES[4:5])
def test_tensorflow_float64_engine_matches_reference_bit_for_bit(algorithm, exchange):
    import tensorflow as tf

    from horovod_squeeze.tensorflow.engine import SqueezeEngine as TFEngine

    names = list(TABLE_SHAPES)

    def body(comm):
        engine = TFEngine(algorithm, list(TABLE_SHAPES.items()), collectives=comm,
                          exchange=exchange, precision="float64",
                          learning_rate=lambda: LEARNING_RATE, **LAYOUT)
        records = []
        for step in range(STEPS):
            out = engine([tf.constant(table_gradient64(n, comm.rank, step)) for n in names])
            assert {t.dtype for t in out} == {tf.float64}
            records.append({"applied": {n: t.numpy() for n, t in zip(names, out)},
                            "state": {i: {n: v.numpy() for n, v in s.items()}
                                      for i, s in engine.state.items()}})
        return {"buckets": [(b.index, list(b.names), b.exchange.name, b.numel)
                            for b in engine.buckets], "steps": records}

    results = FakeWorld(2, timeout=120).run(body)
    config = {"compression": algorithm, "exchange": exchange, "learning_rate": LEARNING_RATE,
              "precision": "float64", **LAYOUT}
    check_against_simulation(config, results, 2, exact=True, gradients=table_gradient64)


def test_float64_engine_converges_past_float32s_floor():
    # DORE on the heterogeneous least squares problem, full gradients, ternary both ways, through
    # the engine on 4 in-process ranks: in float32 the distance to x* stops near float32's
    # resolution; a float64 model goes on converging linearly far below it.
    num_workers, dim, steps = 4, 120, 400
    algorithm = hs.DORE(hs.Ternary(block_size=64))

    def distances(dtype):
        gradient, optimum, lr = _least_squares(num_workers, dim, dtype=dtype)

        def body(comm):
            engine = SqueezeEngine(algorithm, [("x", (dim,))], collectives=comm,
                                   learning_rate=lambda: lr, min_compress_numel=0,
                                   precision=np.dtype(dtype).name)
            x, out = torch.zeros(dim, dtype=getattr(torch, np.dtype(dtype).name)), []
            for step in range(steps):
                engine.submit("x", torch.from_numpy(gradient(comm.rank, x.numpy())))
                x += engine.result("x")
                if step % 50 == 49:
                    out.append(np.linalg.norm(x.numpy() - optimum) / np.linalg.norm(optimum))
            return x.numpy(), out

        runs = FakeWorld(num_workers, timeout=120).run(body)
        for x, _ in runs[1:]:
            np.testing.assert_array_equal(x, runs[0][0])  # every rank, the same model
        return runs[0][1]

    float32, float64 = distances(np.float32), distances(np.float64)
    assert 1e-8 < float32[-1] < 1e-5
    assert float64[-1] < 1e-12 and float64[-1] < 1e-4 * float32[-1]
    assert all(b < a / 4 for a, b in zip(float64, float64[1:]))  # linearly, at every check


# --- a toy algorithm whose output is a model increment ----------------------------------------


@dataclasses.dataclass(frozen=True, repr=False)
class LearningRateMomentum(Algorithm):
    """Toy: workers send C(g_i); the server keeps ``m = beta m + lr mean_i c_i`` (model units),
    sends it with the server compressor, and every rank adds ``-m`` to its parameters."""

    beta: float = 0.5
    output = MODEL_INCREMENT

    def state(self):
        return (StateSpec("momentum", SERVER, units=MODEL, doc="m: the model's velocity"),)

    def worker_stage(self, codec, gradient, state, ctx):
        return WorkerOut(compensate(codec, self.worker, gradient, None, ctx).payload, {})

    def server_stage(self, codec, pieces, state, ctx):
        momentum = state["momentum"] * self.beta + mean(pieces) * ctx.learning_rate
        out = compensate(codec, self.server, momentum, None, ctx)
        return ServerOut(out.payload, out.decoded, {"momentum": momentum})

    def output_stage(self, codec, decoded, ctx):
        return -decoded


@pytest.mark.parametrize("server", [None, hs.FP16()], ids=["exact", "fp16"])
@pytest.mark.parametrize("exchange", ["sharded", "allgather"])
def test_model_increment_algorithm_gets_the_learning_rate(exchange, server):
    algorithm = LearningRateMomentum(hs.QSGD(4), server=server)
    assert algorithm.output == MODEL_INCREMENT and algorithm.server == (server or hs.Identity())
    shapes = {"w": (61, 29), "b": (10,)}  # b: below min_compress_numel, a plain bucket
    schedule = [0.5, 0.5, 0.25, 0.125]  # read by the engine at every step
    num_ranks = 3

    def grads(name, rank, step):
        return random_gradient(shapes[name], rank, step)

    engines = {}

    def body(comm):
        engine = SqueezeEngine(algorithm, list(shapes.items()), collectives=comm,
                               learning_rate=lambda: schedule[engines[comm.rank].step],
                               exchange=exchange, min_compress_numel=100)
        engines[comm.rank] = engine
        out = []
        for step in range(len(schedule)):
            for name in reversed(list(shapes)):
                engine.submit(name, torch.from_numpy(grads(name, comm.rank, step)))
            out.append((engine.result("w").numpy().copy(), engine.result("b").numpy().copy(),
                        engine.state[0]["momentum"].numpy().copy()))
        return out

    results = FakeWorld(num_ranks, timeout=60).run(body)
    assert [b.exchange.name for b in engines[0].buckets] == [exchange, "uncompressed"]

    # Oracle: NoFeedback(QSGD(4)) draws the same random numbers and returns mean_i c_i exactly.
    numel = 61 * 29
    reference = init_state(hs.NoFeedback(hs.QSGD(4)), exchange, numel, num_ranks)
    momentum = np.zeros(numel, np.float32)
    shard = shard_numel(numel, num_ranks)
    for step, rate in enumerate(schedule):
        average, reference = simulate_step(
            hs.NoFeedback(hs.QSGD(4)), exchange,
            [grads("w", r, step).reshape(-1) for r in range(num_ranks)], reference, step=step)
        momentum = momentum * np.float32(0.5) + average * np.float32(rate)
        sent = momentum if server is None else momentum.astype(np.float16).astype(np.float32)
        # The plain bucket takes the algorithm's uncompressed limit: an SGD step, -lr * mean.
        plain = sum(grads("b", r, step) for r in range(num_ranks)) / np.float32(num_ranks)
        for rank in range(num_ranks):
            got, got_plain, state = results[rank][step]
            np.testing.assert_array_equal(got.reshape(-1), -sent, err_msg=f"step {step}")
            np.testing.assert_array_equal(got_plain, plain * np.float32(-rate))
            if exchange == "sharded":
                want = np.pad(momentum, (0, shard * num_ranks - numel))[
                    rank * shard:(rank + 1) * shard]
            else:
                want = momentum
            np.testing.assert_array_equal(state, want)
    assert np.linalg.norm(momentum) > 0
    # Model-unit state is not rescaled when the learning rate changes; gradient-unit state is.
    engine = engines[0]
    before = engine.state[0]["momentum"].clone()
    engine.scale_state_(2.0)
    assert engine.plan.gradient_state() == ()
    torch.testing.assert_close(engine.state[0]["momentum"], before, rtol=0, atol=0)


def test_scale_state_rescales_gradient_units_only():
    def body(comm):
        engine = SqueezeEngine(hs.DoubleSqueeze(hs.ScaledSign()), [("w", (300,))],
                               collectives=comm, min_compress_numel=0)
        engine.submit("w", torch.from_numpy(gradient("layer1.bias", comm.rank, 0).repeat(9)[:300]))
        engine.result("w")
        before = {n: t.clone() for n, t in engine.state[0].items()}
        engine.scale_state_(0.5)
        return before, engine.state[0]

    for before, after in FakeWorld(2).run(body):
        assert set(after) == {"worker_residual", "server_residual"}
        for name in after:
            assert torch.any(before[name] != 0)
            torch.testing.assert_close(after[name], before[name] * 0.5, rtol=0, atol=0)


# --- configuration errors and warnings ----------------------------------------------------------


def _engine(algorithm, shapes=(("w", (10_000,)),), **options):
    """An engine of rank 0 of 2, built without running a step."""
    return SqueezeEngine(algorithm, list(shapes), collectives=FakeWorld(2).collectives(0),
                         **options)


@pytest.mark.parametrize("algorithm, error, match", [
    (hs.ScaledSign(), TypeError, re.escape(f"compression={hs.ScaledSign()!r} is a compressor; wrap "
                                           f"it in an algorithm, e.g. horovod_squeeze."
                                           f"DoubleSqueeze({hs.ScaledSign()!r})")),
    ("DoubleSqueeze", TypeError, "compression must be an algorithm"),
    (None, TypeError, "compression must be an algorithm"),
], ids=["bare compressor", "a string", "None"])
def test_engine_refuses_what_is_not_an_algorithm(algorithm, error, match):
    with pytest.raises(error, match=match):
        _engine(algorithm)


def test_algorithms_refuse_missing_or_wrong_compressors():
    with pytest.raises(TypeError, match=r"DoubleSqueeze needs a compressor"):
        hs.DoubleSqueeze()
    with pytest.raises(TypeError, match="worker must be a compressor spec"):
        hs.ErrorFeedback("topk")
    with pytest.raises(TypeError, match="server must be a compressor spec"):
        hs.NoFeedback(hs.ScaledSign(), server=0.5)
    with pytest.raises(ValueError, match="bad state spec"):
        StateSpec("x", "everywhere")
    with pytest.raises(ValueError, match="bad state spec"):
        StateSpec("x", WORKER, units="meters")
    assert StateSpec("x", WORKER).units == GRADIENT


@pytest.mark.parametrize("algorithm", [hs.DoubleSqueeze(hs.ScaledSign()),
                                       hs.ErrorFeedback(hs.TopK(0.1)),
                                       hs.NoFeedback(hs.ToContractive(hs.QSGD(4))),
                                       hs.NoFeedback(hs.Natural())], ids=repr)
def test_allreduce_refuses_nonlinear_compressors(algorithm):
    with pytest.raises(ValueError, match=r"exchange='allreduce' sums compressed values, which is "
                                         r"only correct for linear compressors"):
        _engine(algorithm, exchange="allreduce")
    with pytest.raises(ValueError, match="only correct for linear compressors"):
        _engine(algorithm, exchange=hs.Allreduce())


def test_allreduce_checks_the_worker_compressor_only():
    # The server stage runs replicated after the allreduce: any server compressor works.
    engine = _engine(hs.DoubleSqueeze(hs.RandK(0.1), server=hs.ScaledSign()), exchange="allreduce")
    assert engine.exchange == hs.Allreduce()
    with pytest.raises(ValueError, match=r"ScaledSign\(.*\) is not linear"):
        _engine(hs.DoubleSqueeze(hs.ScaledSign(), server=hs.RandK(0.1)), exchange="allreduce")


@pytest.mark.parametrize("options, match", [
    ({"exchange": "ring"}, r"exchange must be one of \('sharded', 'allgather', 'allreduce'\)"),
    ({"exchange": PLAIN}, "exchange must be one of"),
    ({"exchange": None}, "exchange must be one of"),
    ({"bucket_cap_mb": 0}, "bucket_cap_mb must be positive, got 0"),
    ({"bucket_cap_mb": -1.5}, "bucket_cap_mb must be positive"),
    ({"bucket_cap_mb": "25"}, "bucket_cap_mb must be positive"),
    ({"min_compress_numel": -1}, r"min_compress_numel must be an integer >= 0, got -1"),
    ({"warmup_steps": 1.5}, r"warmup_steps must be an integer >= 0, got 1\.5"),
    ({"warmup_steps": True}, "warmup_steps must be an integer >= 0, got True"),
    ({"log_every": -10}, "log_every must be an integer >= 0"),
], ids=lambda v: repr(v) if isinstance(v, dict) else None)
def test_bad_engine_options(options, match):
    with pytest.raises(ValueError, match=match):
        EngineOptions(**options)
    with pytest.raises(ValueError, match=match):
        _engine(hs.DoubleSqueeze(hs.ScaledSign()), **options)


def test_engine_options_accept_exchange_objects_and_names():
    for exchange in ("sharded", hs.Sharded(), "allgather", hs.Allgather()):
        engine = _engine(hs.DoubleSqueeze(hs.ScaledSign()), exchange=exchange)
        assert engine.exchange.name == getattr(exchange, "name", exchange)
    assert isinstance(_engine(hs.DoubleSqueeze(hs.ScaledSign())).exchange, Sharded)  # default


def test_duplicate_parameter_names_are_refused():
    with pytest.raises(ValueError, match=r"parameter names must be unique, got duplicates \['w'\]"):
        _engine(hs.DoubleSqueeze(hs.ScaledSign()), shapes=[("w", (10,)), ("w", (20,))])


@pytest.mark.parametrize("algorithm", [
    hs.DoubleSqueeze(hs.QSGD(4)),
    hs.ErrorFeedback(hs.QSGD(4)),
    hs.DoubleSqueeze(worker=hs.ToContractive(hs.QSGD(4)), server=hs.QSGD(4)),
    hs.ErrorFeedback(hs.Ternary(block_size=None)),
], ids=repr)
def test_error_feedback_with_high_variance_unbiased_compressor_warns(algorithm):
    with pytest.warns(UserWarning, match=r"error feedback needs a contractive compressor.*"
                                         r"use ToContractive\("):
        _engine(algorithm)


@pytest.mark.parametrize("exchange", ["allgather", "allreduce"])
@pytest.mark.parametrize("algorithm", [hs.ErrorFeedback(hs.RandK(0.1), server=hs.TopK(0.5)),
                                       hs.NoFeedback(hs.RandK(0.1), server=hs.FP16())], ids=repr)
def test_a_server_compressor_without_feedback_on_a_one_pass_exchange_warns(algorithm, exchange):
    with pytest.warns(UserWarning, match=re.escape(
            f"{algorithm!r} over exchange={exchange!r}: nothing travels in a second pass, so the "
            f"server compressor {algorithm.server!r}, without a server residual, only loses "
            "precision; use exchange='sharded' or leave server= out")):
        _engine(algorithm, exchange=exchange)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _engine(algorithm, exchange="sharded")  # there it saves bytes in pass 2
        _engine(type(algorithm)(algorithm.worker), exchange=exchange)  # exact: nothing lost
        _engine(hs.DoubleSqueeze(algorithm.worker, server=algorithm.server), exchange=exchange)


@pytest.mark.parametrize("algorithm", [
    hs.NoFeedback(hs.QSGD(4)),  # no feedback: an unbiased compressor is what it wants
    hs.NoFeedback(hs.QSGD(4), server=hs.QSGD(4)),
    hs.DoubleSqueeze(hs.ToContractive(hs.QSGD(4))),
    hs.ErrorFeedback(hs.Natural()),  # unbiased, but omega = 1/8 < 1
    hs.ErrorFeedback(hs.TopK(0.01), server=hs.QSGD(4)),  # no server feedback (sharded)
    hs.DoubleSqueeze(hs.RandK(0.01)),
    hs.DORE(hs.Ternary()),
    hs.DORE(hs.Ternary(), eta=1.0, beta=0.1),  # the other side of DORE's model rule
    hs.DORE(hs.Ternary(), server=hs.ScaledSign(), eta=1.0),  # error feedback down
    hs.DORE(hs.ScaledSign(), alpha=1.0, eta=1.0),  # EF21 up, error feedback down
    hs.DORE(hs.Identity(), alpha=0.5, eta=1.0),  # exact: nothing to bound
    hs.DoubleQuantization(b=4, b_x=8),
], ids=repr)
def test_safe_compressors_do_not_warn(algorithm):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _engine(algorithm)


# --- DORE and double quantization: their rules, and what separates them from DoubleSqueeze -----


@pytest.mark.parametrize("algorithm, match", [
    (hs.DORE(hs.Ternary(), alpha=0.5), r"alpha <= 1 / \(omega \+ 1\) = 0\.118 for Ternary"),
    (hs.DORE(hs.Ternary(), eta=1.0),
     r"model error grows unless beta <= 1 / \(omega \+ 1\) = 0\.118 or eta < 1 / sqrt\(omega\) "
     r"= 0\.365"),
    (hs.DORE(hs.QSGD(2), alpha=0.01, beta=0.5, eta=0.9),
     r"eta < 1 / sqrt\(omega\) = 0\.141, for QSGD.* \(omega = 50 on 10000 entries\)"),
], ids=repr)
def test_dore_warns_outside_its_safe_steps(algorithm, match):
    with pytest.warns(UserWarning, match=match):
        _engine(algorithm)


@pytest.mark.parametrize("kwargs, match", [
    ({"worker": hs.ScaledSign()}, r"unbiased only for an unbiased compressor.*EF21"),
    ({"worker": hs.TopK(0.1), "alpha": 0.5}, r"unbiased only for an unbiased compressor"),
    ({"worker": hs.Ternary(), "server": hs.ScaledSign()},
     r"only error feedback corrects it, which needs a contractive compressor with beta=1 and "
     r"eta=1"),
    ({"worker": hs.Ternary(), "server": hs.ScaledSign(scale="rms"), "eta": 1.0},
     r"ScaledSign\(scale='rms'.* is biased"),
])
def test_dore_refuses_biased_compressors_where_it_needs_unbiased_ones(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _engine(hs.DORE(**kwargs))


@pytest.mark.parametrize("make, error, match", [
    (lambda: hs.DORE(hs.Ternary(), alpha=0.0), ValueError, r"alpha must be in \(0, 1\]"),
    (lambda: hs.DORE(hs.Ternary(), beta=1.5), ValueError, r"beta must be in \(0, 1\]"),
    (lambda: hs.DORE(hs.Ternary(), eta=-0.1), ValueError, r"eta must be in \[0, 1\]"),
    (lambda: hs.DORE(hs.Ternary(), alpha="0.1"), ValueError, "alpha must be"),
    (lambda: hs.DoubleQuantization(b=1), ValueError, r"b must be an integer in \[2, 9\]"),
    (lambda: hs.DoubleQuantization(b=4, b_x=16), ValueError, r"b must be an integer in \[2, 9\]"),
    (lambda: hs.DoubleQuantization(4, 8), TypeError, "pass them by keyword"),
])
def test_dore_and_double_quantization_refuse_impossible_parameters(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_double_quantization_uses_the_papers_quantizers():
    algorithm = hs.DoubleQuantization(b=3, b_x=6, seed=2)
    assert algorithm.worker == hs.QSGD(3, seed=2, p="inf")  # 2^(3-1) - 1 levels
    assert algorithm.server == hs.QSGD(31, seed=2, p="inf")
    assert algorithm.worker.layout(100)["codes"].width == 3
    assert algorithm.server.layout(100)["codes"].width == 6
    assert {s.name: (s.placement, s.units) for s in algorithm.state()} == {
        "model_error": (SERVER, MODEL)}


def _least_squares(num_workers, dim, seed=0, dtype=np.float32):
    """Heterogeneous ridge regression: worker i's data is centred at 3 i, so the local gradients
    at the optimum differ (they only sum to zero). Returns the full local gradients (in
    ``dtype``), x* and the step 1 / L."""
    rng = np.random.default_rng(seed)
    rows = 2 * dim
    a = [rng.standard_normal((rows, dim)) / np.sqrt(rows) for _ in range(num_workers)]
    b = [rng.standard_normal(rows) + 3 * i for i in range(num_workers)]
    ridge = 0.1
    hessian = sum(m.T @ m for m in a) / num_workers + ridge * np.eye(dim)
    optimum = np.linalg.solve(hessian, sum(m.T @ v for m, v in zip(a, b)) / num_workers)

    def gradient(i, x):
        return (a[i].T @ (a[i] @ x - b[i]) + ridge * x).astype(dtype)

    return gradient, optimum, 1 / np.linalg.eigvalsh(hessian).max()


@pytest.mark.parametrize("exchange", ["sharded", "allgather"])
def test_dore_converges_to_the_exact_optimum_where_double_squeeze_cannot(exchange):
    # Full gradients, ternary both ways: DORE's compressed quantities vanish at the optimum, so it
    # goes on converging linearly to float32's floor; error feedback's residuals stay as large as
    # the local gradients' disagreement there.
    num_workers, dim, steps = 4, 120, 400
    gradient, optimum, lr = _least_squares(num_workers, dim)

    def distance(algorithm):
        x = np.zeros(dim, np.float32)
        state = init_state(algorithm, exchange, dim, num_workers)
        for step in range(steps):
            out, state = simulate_step(algorithm, exchange,
                                       [gradient(i, x) for i in range(num_workers)], state,
                                       step=step, learning_rate=lr)
            x = x + out if algorithm.output == MODEL_INCREMENT else x - np.float32(lr) * out
        return np.linalg.norm(x - optimum) / np.linalg.norm(optimum)

    dore = distance(hs.DORE(hs.Ternary(block_size=64)))
    assert dore < 1e-5
    assert distance(hs.ErrorFeedback(hs.ToContractive(hs.Ternary(block_size=64)))) > 1e3 * dore
    assert distance(hs.DoubleQuantization(b=4, b_x=8)) > 1e3 * dore  # no shift: SGD's noise floor
