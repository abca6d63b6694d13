"""Ranks as threads: :func:`horovod_squeeze.decentralized.gossip_step` on n in-process ranks, their
neighbour exchange a pair of barriers. Fast, and the same code path as MPI's but the transport."""
from __future__ import annotations

import threading

import torch

from horovod_squeeze.decentralized import gossip_step
from horovod_squeeze.torch import codecs


def gossip_on_threads(algorithm, topology, models, states, *, step, sizes=None,
                      precision="float32"):
    """Every rank's :class:`~horovod_squeeze.decentralized.GossipResult`, or the exception it
    raised."""
    n = topology.size
    inbox, results = [None] * n, [None] * n
    barrier = threading.Barrier(n, timeout=60)

    def exchange_of(rank):
        def exchange(message):
            inbox[rank] = message
            barrier.wait()
            received = [inbox[j] for j in topology.neighbors(rank)]
            barrier.wait()
            return received
        return exchange

    def run(rank):
        try:
            results[rank] = gossip_step(
                algorithm, codecs.on(), models[rank], states[rank], topology=topology, rank=rank,
                step=step, finite=bool(torch.isfinite(models[rank]).all()),
                exchange=exchange_of(rank), segments=sizes, precision=precision)
        except Exception as error:  # noqa: BLE001 - reported to the test
            results[rank] = error

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results
