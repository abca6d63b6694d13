"""D-PSGD (Lian, Zhang, Zhang, Hsieh, Zhang, Liu, NeurIPS 2017): decentralized SGD, uncompressed.

Rank ``i`` with neighbours ``N(i)`` and mixing weights ``W``::

    x_half = x_i - lr * g_i                    # the wrapped optimizer's local step
    send x_half to N(i)
    x_i = sum_{j in N(i) + {i}} W_ij * x_half_j

(the local step before the average, as in DeepSqueeze, whose special case it is: ``C = Identity()``,
``eta = 1``). The model travels in float32, 32 bits per entry to each neighbour.

Example::

    import horovod_squeeze as hs
    hs.DPSGD()
"""
from __future__ import annotations

import dataclasses

from horovod_squeeze.algorithms.gossip import GossipAlgorithm, Mixed, Sent, weighted_sum
from horovod_squeeze.compressors import Identity

__all__ = ["DPSGD"]


@dataclasses.dataclass(frozen=True, repr=False)
class DPSGD(GossipAlgorithm):
    """Each rank's model becomes its neighbourhood's weighted average of the stepped models."""

    def __post_init__(self):
        super().__post_init__()
        if self.compressor != Identity() or self.consensus_step != 1.0:
            raise ValueError("DPSGD sends the model uncompressed and averages it whole; for a "
                             "compressor or a consensus step use DeepSqueeze or ChocoSGD")

    def __repr__(self):
        return "DPSGD()"

    def send_stage(self, codec, model, state, ctx):
        payload = codec.compress(Identity(), model, nonce=ctx.nonce, name=ctx.name,
                                 segments=ctx.segments)
        return Sent(payload, model, dict(state))

    def mix_stage(self, codec, model, own, self_weight, neighbors, state, ctx):
        return Mixed(weighted_sum([(self_weight, own)] + [(n.weight, n.decoded) for n in neighbors]),
                     dict(state))
