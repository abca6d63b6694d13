"""Neighbour collectives for decentralized training: MPI distributed graph communicators (mpi4py).

Horovod has no neighbour collectives; MPI does. :class:`NeighborExchange` builds a distributed graph
communicator over a :class:`~horovod_squeeze.topology.Topology` (``Create_dist_graph_adjacent``,
each rank's sources and destinations its neighbours) and sends one packed ``uint8`` message to every
neighbour per step (``Neighbor_allgather``). Every rank's message has the same size (a payload's
size is a pure function of the compressor and the tensor sizes), which :meth:`NeighborExchange.agree`
checks once, with a fingerprint of the configuration, before any step.

It shares MPI with Horovod in one process: launch with ``horovodrun --mpi`` (or ``mpirun``), and
Horovod and mpi4py use the same ``MPI_COMM_WORLD`` (Horovod asks for ``MPI_THREAD_MULTIPLE``, so
its background thread and these calls may overlap; Horovod talks on its own duplicate of the
communicator, so their messages never mix). Under ``horovodrun --gloo`` there is no MPI world to
share: every process would be a world of its own, and :func:`world` refuses with a clear error.
"""
from __future__ import annotations

import zlib

import numpy as np

from horovod_squeeze.topology import Topology

__all__ = ["NeighborExchange", "world"]


def world(expected_size: int | None = None):
    """``MPI.COMM_WORLD``, checked to hold ``expected_size`` ranks (Horovod's ``hvd.size()``)."""
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise RuntimeError("decentralized training needs mpi4py (pip install "
                           "'horovod-squeeze[decentralized]') and an MPI launcher") from error
    comm = MPI.COMM_WORLD
    if expected_size is not None and comm.Get_size() != expected_size:
        raise RuntimeError(
            f"decentralized training exchanges with neighbours over MPI, but MPI_COMM_WORLD has "
            f"{comm.Get_size()} rank(s) where Horovod has {expected_size}: the job was not "
            f"launched with MPI (horovodrun --gloo gives every process a world of its own). "
            f"Launch with `horovodrun --mpi -np {expected_size} ...` or `mpirun -np "
            f"{expected_size} ...`")
    return comm


class NeighborExchange:
    """One rank's messages to and from its neighbours in ``topology``, over ``comm``."""

    def __init__(self, topology: Topology, comm=None):
        comm = world() if comm is None else comm
        if comm.Get_size() != topology.size:
            raise ValueError(f"{topology!r} is a graph of {topology.size} ranks, but the job has "
                             f"{comm.Get_size()}")
        self.topology = topology
        self.rank = comm.Get_rank()
        self.neighbors = topology.neighbors(self.rank)
        self._world = comm
        self._graph = comm.Create_dist_graph_adjacent(self.neighbors, self.neighbors,
                                                      reorder=False)

    def allgather(self, message: np.ndarray) -> np.ndarray:
        """This rank's ``uint8`` message to every neighbour; theirs, one row each, in
        ``self.neighbors`` order."""
        message = np.ascontiguousarray(message, dtype=np.uint8).reshape(-1)
        received = np.empty((len(self.neighbors), message.size), np.uint8)
        self._graph.Neighbor_allgather(message, received)
        return received

    def everyone(self, flag: bool, step: int) -> tuple[bool, int]:
        """Whether ``flag`` holds on every rank, and the largest ``step``: one small allreduce
        over the world, for decisions taken once (restoring a checkpoint), never per step."""
        from mpi4py import MPI

        values = np.array([int(bool(flag)), -int(step)], np.int64)
        self._world.Allreduce(MPI.IN_PLACE, values, op=MPI.MIN)
        return bool(values[0]), int(-values[1])

    def agree(self, **config) -> None:
        """Checks, once and on every rank together, that every rank's neighbours hold the same
        ``config`` (e.g. the algorithm, the tensor sizes, the message size): a mismatch would
        otherwise send messages of different sizes, which MPI truncates or pads silently. Raises
        ``ValueError`` on every rank, naming a rank and the first setting that differs."""
        keys = sorted(config)
        mine = np.array([zlib.crc32(repr(config[key]).encode()) for key in keys]
                        + [zlib.crc32(self.topology.weights.tobytes())], np.uint32)
        theirs = self.allgather(mine.view(np.uint8)).view(np.uint32)
        differs = [(self.rank, rank, ([*keys, "topology"])[int(np.flatnonzero(row != mine)[0])])
                   for rank, row in zip(self.neighbors, theirs) if np.any(row != mine)]
        reports = [report for report in self._world.allgather(differs[0] if differs else None)
                   if report is not None]
        if reports:
            rank, neighbor, key = reports[0]
            raise ValueError(f"decentralized training is configured differently on two ranks: "
                             f"rank {rank} and its neighbour rank {neighbor} disagree on {key} "
                             f"(every rank must build the same model, algorithm and topology)")
