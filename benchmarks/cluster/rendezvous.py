"""Horovod's Gloo rendezvous server for a cluster (``python -m benchmarks.cluster.rendezvous``).

Runs inside host 0's namespace, as ``horovodrun`` runs it on the launching host: one slot per host
(local rank 0 of 1, cross rank = rank). Prints its port on the first line of stdout and serves
until stdin closes, so it never outlives the harness that started it.

    python -m benchmarks.cluster.rendezvous 10.213.0.1 10.213.0.2 ...
"""
from __future__ import annotations

import sys

from horovod.runner.common.util.hosts import SlotInfo
from horovod.runner.http.http_server import RendezvousServer


def main(addresses: list[str]) -> None:
    size = len(addresses)
    server = RendezvousServer()
    port = server.start()
    server.init([SlotInfo(hostname=address, rank=rank, local_rank=0, cross_rank=rank, size=size,
                          local_size=1, cross_size=size) for rank, address in enumerate(addresses)])
    print(port, flush=True)
    sys.stdin.read()  # returns when the harness exits or closes the pipe
    server.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
