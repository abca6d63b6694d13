"""The PyTorch and TensorFlow bindings mirror each other: the same public names, the same options
with the same defaults, the same methods on their engines, state modules and stock hooks."""
import dataclasses
import inspect

import numpy as np

import horovod_squeeze as hs
from horovod_squeeze.fake import FakeWorld
from horovod_squeeze.plan import EngineOptions


def _bindings():
    import horovod_squeeze.tensorflow as hstf
    import horovod_squeeze.tensorflow.keras as hsk
    import horovod_squeeze.torch as hst

    return hst, hstf, hsk


def _keyword_only(fn):
    return {name: p.default for name, p in inspect.signature(fn).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _public_methods(cls):
    return {name for name, _ in inspect.getmembers(cls) if not name.startswith("_")}


def test_same_public_names():
    hst, hstf, hsk = _bindings()
    # Each framework's own entry points: PyTorch wraps the optimizer, TensorFlow the tape (Keras:
    # the optimizer, in horovod_squeeze.tensorflow.keras), as Horovod does; decentralized,
    # PyTorch's optimizer gossips in its step, TensorFlow's Gossip after the step (Keras: a
    # callback). The finite-sum methods' optimizer takes closures, PyTorch's optimizer interface:
    # PyTorch only.
    assert set(hst.__all__) - {"DistributedOptimizer", "DecentralizedOptimizer",
                               "FiniteSumOptimizer"} == set(
        hstf.__all__) - {"DistributedGradientTape", "Gossip"}
    assert {"DecentralizedCallback"} <= set(hsk.callbacks.__all__)
    assert {"DistributedOptimizer", "callbacks"} <= set(hsk.__all__)
    assert hst.state.__all__ == hstf.state.__all__ == ["gather", "restore"]
    from horovod_squeeze.tensorflow import codecs as tf_codecs
    from horovod_squeeze.torch import codecs as torch_codecs

    assert torch_codecs.__all__ == tf_codecs.__all__


def test_same_options_with_the_same_defaults():
    hst, hstf, hsk = _bindings()
    expected = {f.name: f.default for f in dataclasses.fields(EngineOptions)}
    assert _keyword_only(hstf.DistributedGradientTape) == {**expected, "optimizer": None}
    # The optimizers add worker momentum, whose Adam default decides the warm-up.
    expected.update(warmup_steps=None, worker_momentum=True)
    for entry in (hst.DistributedOptimizer, hsk.DistributedOptimizer):
        assert _keyword_only(entry) == expected, entry.__module__


def test_same_arguments_and_methods():
    hst, hstf, _ = _bindings()
    from horovod_squeeze.tensorflow.engine import SqueezeEngine as TFEngine
    from horovod_squeeze.torch.engine import SqueezeEngine as TorchEngine

    assert (inspect.signature(TorchEngine.__init__).parameters.keys()
            == inspect.signature(TFEngine.__init__).parameters.keys())
    # "b" is below min_compress_numel: a plain bucket, without state.
    engines = [cls(hs.DoubleSqueeze(hs.ScaledSign()), [("w", (2048,)), ("b", (10,))],
                   collectives=FakeWorld(1).collectives(0)) for cls in (TorchEngine, TFEngine)]
    shared = {"algorithm", "exchange", "buckets", "plan", "comm", "step", "state",
              "state_norms", "scale_state_", "last_stats"}
    for engine in engines:
        assert shared <= set(dir(engine)), type(engine).__module__
        assert set(engine.state[0]) == {"worker_residual", "server_residual"}
        assert engine.state[1] == {}
        residual = engine.state[0]["worker_residual"]
        if hasattr(residual, "assign"):  # a tf.Variable
            residual.assign(np.ones(residual.shape, np.float32))
        else:
            residual.fill_(1.0)
        engine.scale_state_(2.0)  # skips the plain bucket
        assert float(engine.state[0]["worker_residual"][0]) == 2.0
        assert set(engine.state_norms()) == {"w", "b"}
    for name in ("gather", "restore"):
        assert (list(inspect.signature(getattr(hst.state, name)).parameters)
                == list(inspect.signature(getattr(hstf.state, name)).parameters))
    assert _public_methods(hst.StockCompression) == _public_methods(hstf.StockCompression)
    for name in ("compress", "decompress", "on"):
        from horovod_squeeze.tensorflow import codecs as tf_codecs
        from horovod_squeeze.torch import codecs as torch_codecs

        assert (list(inspect.signature(getattr(torch_codecs, name)).parameters)
                == list(inspect.signature(getattr(tf_codecs, name)).parameters))


def test_decentralized_telemetry_and_checkpoints_have_the_same_names():
    from horovod_squeeze.tensorflow.decentralized import Gossip
    from horovod_squeeze.torch.decentralized import _GossipOptimizer

    shared = {"bytes_sent_per_step", "neighbors", "state_norms",
              "consensus_distance", "state_dict", "load_state_dict"}
    assert shared <= _public_methods(_GossipOptimizer) and shared <= _public_methods(Gossip)
    hst, hstf, hsk = _bindings()
    options = {"comm", "precision", "consensus_every"}
    assert options <= set(inspect.signature(hst.DecentralizedOptimizer).parameters)
    assert options <= set(inspect.signature(Gossip).parameters)
    assert options <= set(inspect.signature(hsk.callbacks.DecentralizedCallback).parameters)
