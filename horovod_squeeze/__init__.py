"""Error-compensated compressed communication for Horovod (PyTorch and TensorFlow/Keras).

The top level holds the framework-neutral vocabulary: compressor specs such as ``TopK(0.01)`` or
``ScaledSign()`` and the algorithms around them (``DoubleSqueeze(ScaledSign())``), which the NumPy
reference (:mod:`horovod_squeeze.reference`) and the framework bindings all accept.
"""
from horovod_squeeze import topology
from horovod_squeeze.algorithms import (
    DORE, DPSGD, EF21, Algorithm, ChocoSGD, DeepSqueeze, DoubleQuantization, DoubleSqueeze,
    ErrorFeedback, GossipAlgorithm, NoFeedback, ServerFeedback,
)
from horovod_squeeze.algorithms.eclk import ECLK
from horovod_squeeze.algorithms.ecsgd import ECSGD
from horovod_squeeze.exchange import Allgather, Allreduce, Exchange, Sharded
from horovod_squeeze.compressors import (
    FP16, QSGD, Compressor, Contract, Identity, Natural, RandK, ScaledSign, Ternary,
    ToContractive, TopK,
)

__version__ = "0.1.0"

__all__ = [
    "Algorithm", "DoubleSqueeze", "ErrorFeedback", "NoFeedback", "ServerFeedback", "DORE",
    "DoubleQuantization", "EF21", "ECLK", "ECSGD", "GossipAlgorithm", "DeepSqueeze", "ChocoSGD", "DPSGD",
    "topology",
    "Exchange", "Sharded", "Allgather", "Allreduce",
    "Compressor", "Contract", "FP16", "Identity", "Natural", "QSGD", "RandK", "ScaledSign",
    "Ternary", "ToContractive", "TopK",
]
