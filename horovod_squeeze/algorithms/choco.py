"""CHOCO-SGD (Koloskova, Stich, Jaggi, ICML 2019): compressed gossip of model differences against
public copies.

Every rank ``i`` keeps a public copy ``xhat_i`` of its model, which its neighbours can rebuild from
what it sends, and ``s_i = sum_{j in N(i) + {i}} W_ij xhat_j`` (the memory-efficient form: no copy
per neighbour). With compressor ``Q`` and consensus step ``gamma``::

    x_half = x_i - lr * g_i                    # the wrapped optimizer's local step
    q_i = Q(x_half - xhat_i)                   # send q_i to N(i)
    xhat_i = xhat_i + q_i
    s_i = s_i + sum_{j in N(i) + {i}} W_ij q_j
    x_i = x_half + gamma * (s_i - xhat_i)

Public copies start at zero. ``Q`` must be contractive (``ScaledSign``, ``TopK``, or an unbiased
compressor under ``ToContractive``); the paper's consensus step is small (``gamma`` of the order of
the spectral gap times the compressor's ``delta``).

Example::

    import horovod_squeeze as hs
    hs.ChocoSGD(hs.TopK(0.01), consensus_step=0.05)
"""
from __future__ import annotations

import dataclasses

from horovod_squeeze.algorithms.base import (
    MODEL, WORKER, StateSpec, numel, warn_unless_contractive,
)
from horovod_squeeze.algorithms.gossip import GossipAlgorithm, Mixed, Sent, weighted_sum
from horovod_squeeze.compressors import Compressor, ScaledSign

__all__ = ["ChocoSGD"]


@dataclasses.dataclass(frozen=True, repr=False)
class ChocoSGD(GossipAlgorithm):
    """Each rank sends the compressed change of its public copy and moves ``gamma`` of the way
    to its neighbourhood's weighted average of the public copies."""

    compressor: Compressor = ScaledSign()
    consensus_step: float = 0.1

    absent_neighbor = "zero"

    def state(self):
        return (StateSpec("public_model", WORKER, MODEL,
                          doc="xhat_i: this rank's model as its neighbours know it"),
                StateSpec("neighborhood_model", WORKER, MODEL,
                          doc="s_i: the weighted sum of the public copies of N(i) + {i}"))

    def send_stage(self, codec, model, state, ctx):
        payload = codec.compress(self.compressor, model - state["public_model"], nonce=ctx.nonce,
                                 name=ctx.name, segments=ctx.segments)
        decoded = codec.decompress(self.compressor, payload, numel(model), name=ctx.name,
                                   segments=ctx.segments, dtype=ctx.precision)
        return Sent(payload, decoded, dict(state))

    def mix_stage(self, codec, model, own, self_weight, neighbors, state, ctx):
        public = state["public_model"] + own
        neighborhood = state["neighborhood_model"] + weighted_sum(
            [(self_weight, own)] + [(n.weight, n.decoded) for n in neighbors])
        return Mixed(model + (neighborhood - public) * self.consensus_step,
                     {"public_model": public, "neighborhood_model": neighborhood})

    def check(self, largest_numel, *, stacklevel=2):
        warn_unless_contractive(self, self.compressor, largest_numel, stacklevel + 1)

