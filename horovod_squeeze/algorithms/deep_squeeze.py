"""DeepSqueeze (Tang, Lian, Qiu, Yuan, Zhang, Liu, 2019): error-compensated compression of the model
in decentralized training.

Rank ``i`` with neighbours ``N(i)``, mixing weights ``W``, model error ``e_i``, compressor ``C`` and
consensus step ``eta``::

    x_half = x_i - lr * g_i                    # the wrapped optimizer's local step
    v_i = x_half + e_i;  c_i = C(v_i);  e_i = v_i - c_i                 # send c_i to N(i)
    x_i = x_half + eta * sum_{j in N(i) + {i}} (W_ij - [j == i]) * c_j

``C = Identity()`` with ``eta = 1`` is D-PSGD (:class:`~horovod_squeeze.algorithms.dpsgd.DPSGD`).
Symbols to arguments: ``x_half`` is ``model``, ``c_i`` is ``own``, the ``c_j`` come in
``neighbors``, ``e_i`` is the state ``model_error``.

Example::

    import horovod_squeeze as hs
    hs.DeepSqueeze(hs.ScaledSign(), consensus_step=0.2)     # 1 bit per entry to each neighbour
"""
from __future__ import annotations

import dataclasses

from horovod_squeeze.algorithms.base import (
    MODEL, WORKER, StateSpec, compensate, warn_unless_contractive,
)
from horovod_squeeze.algorithms.gossip import GossipAlgorithm, Mixed, Sent, weighted_sum
from horovod_squeeze.compressors import Compressor, ScaledSign

__all__ = ["DeepSqueeze"]


@dataclasses.dataclass(frozen=True, repr=False)
class DeepSqueeze(GossipAlgorithm):
    """Each rank sends its error-compensated compressed model and moves ``eta`` of the way to
    its neighbourhood's weighted average of the compressed models."""

    compressor: Compressor = ScaledSign()
    consensus_step: float = 0.1

    def state(self):
        return (StateSpec("model_error", WORKER, MODEL,
                          doc="e_i: what compressing this rank's model has not sent yet"),)

    def send_stage(self, codec, model, state, ctx):
        out = compensate(codec, self.compressor, model, state["model_error"], ctx)
        return Sent(out.payload, out.decoded, {"model_error": out.residual})

    def mix_stage(self, codec, model, own, self_weight, neighbors, state, ctx):
        pull = weighted_sum([(self_weight - 1.0, own)]
                            + [(n.weight, n.decoded) for n in neighbors])
        return Mixed(model + pull * self.consensus_step, dict(state))

    def check(self, largest_numel, *, stacklevel=2):
        warn_unless_contractive(self, self.compressor, largest_numel, stacklevel + 1)
