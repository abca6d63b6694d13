"""NumPy simulation of n ranks gossiping over a mixing matrix: the decentralized test oracle.

Each decentralized algorithm's update is written from its paper in its own module beside this one
(``horovod_squeeze.reference.<module>``, named like the algorithm's module, with ``gossip`` and
``init_state``). This module adds what every binding shares and the papers leave open: rank ``i``
mixes the messages of itself first, then of its neighbours (``W[i, j] > 0``) in ascending order;
its message is the model laid out as one vector whose segments are the parameters' sizes,
compressed with the nonce of (step, rank) (:func:`~horovod_squeeze.algorithms.gossip.gossip_nonce`).
"""
from __future__ import annotations

import numpy as np

from horovod_squeeze import reference
from horovod_squeeze.algorithms.gossip import gossip_nonce
from horovod_squeeze.reference.simulate import reference_module

__all__ = ["init_state", "simulate_gossip"]


def init_state(algorithm, numel: int, num_ranks: int, precision: str = "float32") -> dict:
    """The reference's zero state for models of ``numel`` entries."""
    return reference_module(algorithm).init_state(numel, num_ranks, precision)


def simulate_gossip(algorithm, weights, models: list[np.ndarray], state: dict, *, step: int,
                    sizes=None, precision: str = "float32") -> tuple[list[np.ndarray], dict]:
    """One gossip step of every rank: ``models`` are the ``x_half`` (after the local step); returns
    the new models and state."""
    weights = np.asarray(weights, np.float64)
    n = len(models)
    segments = None if sizes is None else tuple(int(size) for size in sizes)

    def order(i):
        return [i] + [j for j in range(n) if j != i and weights[i, j] > 0]

    def compress(i, v):
        payload = reference.compress(algorithm.compressor, v, nonce=gossip_nonce(step, i),
                                     segments=segments)
        return reference.decompress(algorithm.compressor, payload, v.size,
                                    segments=segments).astype(precision)

    return reference_module(algorithm).gossip(algorithm, [m.astype(precision) for m in models], state,
                                     weights, order, compress)
