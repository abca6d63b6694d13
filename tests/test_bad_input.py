"""The bad-input matrix: each case a clear error naming the problem, or a correct result, in
PyTorch and TensorFlow, on in-process ranks whose collectives time out instead of hanging
(:class:`horovod_squeeze.fake.FakeWorld`). What needs ``horovodrun`` (checkpoints, dead workers,
AMP, sparse gradients) is in ``test_resume``, ``test_faults``, ``test_nonfinite`` and
``test_drop_in``."""
import re

import numpy as np
import pytest

import horovod_squeeze as hs
from horovod_squeeze.fake import FakeWorld

FRAMEWORKS = ["torch", "tensorflow"]
ALGORITHM = hs.DoubleSqueeze(hs.ScaledSign())
SHAPES = {"w": (37, 11), "v": (300,), "b": (5,)}  # b: the uncompressed bucket; 37 * 11 is odd


def _engine(framework, comm, algorithm=ALGORITHM, shapes=SHAPES, **options):
    options = {"min_compress_numel": 100, "learning_rate": lambda: 0.1, **options}
    if framework == "torch":
        from horovod_squeeze.torch.engine import SqueezeEngine
    else:
        from horovod_squeeze.tensorflow.engine import SqueezeEngine
    return SqueezeEngine(algorithm, list(shapes.items()), collectives=comm, **options)


def _step(framework, engine, grads: dict):
    """One step; the results as NumPy arrays, by name."""
    if framework == "torch":
        import torch

        for name in reversed(list(grads)):
            value = grads[name]
            engine.submit(name, value if isinstance(value, torch.Tensor)
                          else torch.from_numpy(np.asarray(value)))
        return {name: engine.result(name) for name in grads}
    import tensorflow as tf

    out = engine([tf.constant(value) for value in grads.values()])
    return dict(zip(grads, out))


def _numpy(value):
    if hasattr(value, "float") and hasattr(value, "dtype") and "bfloat16" in str(value.dtype):
        value = value.float()
    return np.asarray(value.numpy() if hasattr(value, "numpy") else value)


def _gradients(rank, shapes=SHAPES, dtype=np.float32):
    rng = np.random.default_rng(rank)
    return {name: rng.standard_normal(shape).astype(dtype) for name, shape in shapes.items()}


def _run(num_ranks, body):
    return FakeWorld(num_ranks, timeout=60).run(body)


def _raises(error, pattern, fn):
    with pytest.raises(error, match=pattern):
        fn()


# --- errors a rank raises by itself, before any collective ------------------------------------------

BAD_SPECS = [
    pytest.param(lambda: hs.TopK(0.0), ValueError, "ratio", id="TopK ratio 0"),
    pytest.param(lambda: hs.TopK(1.5), ValueError, "ratio", id="TopK ratio above 1"),
    pytest.param(lambda: hs.QSGD(0), ValueError, "levels", id="QSGD 0 levels"),
    pytest.param(lambda: hs.QSGD.bits(1), ValueError, "", id="QSGD 1 bit"),
    pytest.param(lambda: hs.DORE(hs.Ternary(), alpha=0.0), ValueError, "alpha",
                 id="DORE alpha 0"),
    pytest.param(lambda: hs.DORE(hs.Ternary(), eta=2.0), ValueError, "eta", id="DORE eta 2"),
    pytest.param(lambda: hs.DoubleQuantization(b=1), ValueError, "", id="DQ 1 bit"),
    pytest.param(lambda: hs.DoubleQuantization(4, 8), TypeError, "", id="DQ positional"),
    pytest.param(lambda: hs.DoubleSqueeze(), TypeError, "needs a compressor",
                 id="no compressor"),
    pytest.param(lambda: hs.DoubleSqueeze("sign"), TypeError, "must be a compressor spec",
                 id="a string for a compressor"),
]


@pytest.mark.parametrize("make, error, pattern", BAD_SPECS)
def test_impossible_specs_are_refused_by_name(make, error, pattern):
    _raises(error, pattern, make)


BAD_OPTIONS = [
    pytest.param({"bucket_cap_mb": 0}, ValueError, "bucket_cap_mb must be positive",
                 id="bucket_cap_mb 0"),
    pytest.param({"min_compress_numel": -1}, ValueError, "min_compress_numel must be",
                 id="min_compress_numel -1"),
    pytest.param({"warmup_steps": 1.5}, ValueError, "warmup_steps must be", id="warmup 1.5"),
    pytest.param({"precision": "float16"}, ValueError, "precision must be one of",
                 id="precision float16"),
    pytest.param({"exchange": "ring"}, ValueError, "exchange must be one of", id="exchange ring"),
]


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("options, error, pattern", BAD_OPTIONS)
def test_impossible_engine_options_are_refused_by_name(framework, options, error, pattern):
    _raises(error, pattern, lambda: _engine(framework, FakeWorld(1).collectives(0), **options))


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_configuration_errors_name_the_problem(framework):
    comm = FakeWorld(1).collectives(0)
    _raises(TypeError, "is a compressor; wrap it in an algorithm",
            lambda: _engine(framework, comm, algorithm=hs.ScaledSign()))
    if framework == "torch":
        from horovod_squeeze.torch.engine import SqueezeEngine
    else:
        from horovod_squeeze.tensorflow.engine import SqueezeEngine
    _raises(ValueError, "duplicate", lambda: SqueezeEngine(
        ALGORITHM, [("w", (2,)), ("w", (3,))], collectives=comm))
    _raises(ValueError, "only correct for linear compressors",
            lambda: _engine(framework, comm, exchange="allreduce"))


# --- gradients: wrong, odd, non-finite ------------------------------------------------------------


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_gradients_of_the_wrong_dtype_or_shape_are_refused_by_name(framework):
    def body(comm):
        engine = _engine(framework, comm)
        wrong_dtype = {**_gradients(comm.rank), "w": np.ones((37, 11), np.int64)}
        with pytest.raises(TypeError, match="gradient of 'w': expected a floating-point"):
            _step(framework, engine, wrong_dtype)
        engine = _engine(framework, comm)
        wrong_shape = {**_gradients(comm.rank), "w": np.ones((11, 37), np.float32)}
        with pytest.raises(ValueError, match=re.escape("gradient of 'w' has shape (11, 37)")):
            _step(framework, engine, wrong_shape)
        return True

    assert _run(1, body) == [True]


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("where", ["one rank", "every rank"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_gradients_skip_the_step_on_every_rank(framework, where, value):
    def body(comm):
        engine = _engine(framework, comm)
        grads = _gradients(comm.rank)
        if where == "every rank" or comm.rank == 1:
            grads["v"][7] = value
        out = _step(framework, engine, grads)
        skipped = (engine.skipped_steps if framework == "torch"
                   else int(engine.skipped_steps.numpy()))
        return all(np.all(np.isnan(_numpy(a))) for a in out.values()), skipped

    assert _run(3, body) == [(True, 1)] * 3


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_empty_and_scalar_tensors_and_uneven_shards_work(framework):
    shapes = {"empty": (0,), "scalar": (), "w": (37, 11), "tail": (1,)}

    def body(comm):
        engine = _engine(framework, comm, shapes=shapes, min_compress_numel=0)
        outs = [_step(framework, engine, _gradients(comm.rank, shapes)) for _ in range(2)]
        return {name: _numpy(value) for name, value in outs[-1].items()}

    results = _run(3, body)
    for result in results:
        assert result["empty"].shape == (0,) and result["scalar"].shape == ()
        assert result["w"].shape == (37, 11) and np.all(np.isfinite(result["w"]))
        for name in shapes:
            np.testing.assert_array_equal(result[name], results[0][name])


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_low_and_high_precision_gradients(framework, dtype):
    def body(comm):
        engine = _engine(framework, comm,
                         precision="float64" if dtype == "float64" else "float32")
        grads = _gradients(comm.rank)
        if framework == "torch":
            import torch

            grads = {n: torch.from_numpy(g).to(getattr(torch, dtype)) for n, g in grads.items()}
        else:
            import tensorflow as tf

            grads = {n: tf.cast(g, dtype) for n, g in grads.items()}
        out = _step(framework, engine, grads)
        state = [t for tensors in engine.state.values() for t in tensors.values()]
        return ({str(value.dtype).replace("torch.", "").replace("<dtype: '", "").rstrip("'>")
                 for value in out.values()},
                {str(t.dtype).replace("torch.", "").replace("<dtype: '", "").rstrip("'>")
                 .replace("_ref", "") for t in state})

    for out_dtypes, state_dtypes in _run(2, body):
        assert out_dtypes == {dtype}
        assert state_dtypes == {"float64" if dtype == "float64" else "float32"}


def test_one_rank_runs_the_algorithm():
    def body(comm):
        engine = _engine("torch", comm)
        return [_numpy(a) for a in _step("torch", engine, _gradients(0)).values()]

    (result,) = _run(1, body)
    assert all(np.all(np.isfinite(a)) for a in result)


# --- ranks that disagree ------------------------------------------------------------------------


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("differ, field", [
    ({"algorithm": hs.ErrorFeedback(hs.ScaledSign())}, "algorithm"),
    ({"exchange": "allgather"}, "exchange"),
    ({"shapes": {**SHAPES, "w": (11, 37)}}, "parameters"),
    ({"warmup_steps": 2}, "options"),
])
def test_ranks_built_differently_fail_together(framework, differ, field):
    def body(comm):
        engine = _engine(framework, comm, **(differ if comm.rank == 1 else {}))
        shapes = differ.get("shapes", SHAPES) if comm.rank == 1 else SHAPES
        with pytest.raises(ValueError, match=rf"ranks \[1\] were built with another {field}"):
            _step(framework, engine, _gradients(comm.rank, shapes))
        return True

    assert _run(2, body) == [True, True]
