"""Error-compensated compression algorithms: one module per paper, one protocol for all.

See :mod:`horovod_squeeze.algorithms.base` for the protocol of the synchronous algorithms (named
state, a worker stage, a server stage, the output), :mod:`horovod_squeeze.algorithms.gossip` for the
decentralized ones (a send stage and a mix stage), and each module for its paper's update rule.
"""
from horovod_squeeze.algorithms.base import (
    AVERAGED_GRADIENT, GRADIENT, MODEL, MODEL_INCREMENT, MOMENT, SERVER, WORKER, Algorithm, ServerOut,
    StageContext, StateSpec, WorkerOut, compensate, mean,
)
from horovod_squeeze.algorithms.choco import ChocoSGD
from horovod_squeeze.algorithms.deep_squeeze import DeepSqueeze
from horovod_squeeze.algorithms.dore import DORE
from horovod_squeeze.algorithms.double_quantization import DoubleQuantization
from horovod_squeeze.algorithms.double_squeeze import DoubleSqueeze
from horovod_squeeze.algorithms.dpsgd import DPSGD
from horovod_squeeze.algorithms.ef21 import EF21
from horovod_squeeze.algorithms.error_feedback import ErrorFeedback
from horovod_squeeze.algorithms.gossip import GossipAlgorithm
from horovod_squeeze.algorithms.no_feedback import NoFeedback
from horovod_squeeze.algorithms.server_feedback import ServerFeedback

__all__ = ["Algorithm", "GossipAlgorithm", "DeepSqueeze", "ChocoSGD", "DPSGD", "DORE", "DoubleQuantization", "DoubleSqueeze", "EF21", "ErrorFeedback", "NoFeedback",
           "ServerFeedback", "StateSpec", "StageContext", "WorkerOut", "ServerOut", "compensate", "mean", "WORKER", "SERVER",
           "GRADIENT", "MODEL", "MOMENT", "AVERAGED_GRADIENT", "MODEL_INCREMENT"]
