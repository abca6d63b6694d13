"""One rank's gossip step, written once for every framework: send, exchange with neighbours, mix.

:func:`gossip_step` runs a :class:`~horovod_squeeze.algorithms.gossip.GossipAlgorithm`'s stages on a
rank's flat model (its parameters laid end to end, one segment each) around one neighbour exchange.
The framework bindings supply the codec, the model vector, and ``exchange``: a function that sends
this rank's message to every neighbour and returns theirs (``uint8`` tensors, in
``topology.neighbors(rank)`` order), e.g. :class:`~horovod_squeeze.neighbors.NeighborExchange`'s
``allgather`` around a host copy.

A message is one flag byte (1: the model was finite) and the algorithm's payload. A rank whose model
is not finite sends the flag 0 and zeros instead of compressing it, so its neighbours are never left
waiting, keeps its state, and raises ``FloatingPointError`` after the exchange; the neighbours mix
without it (:attr:`~horovod_squeeze.algorithms.gossip.GossipAlgorithm.absent_neighbor`) and say so
in :attr:`GossipResult.absent`.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, NamedTuple, Sequence

from horovod_squeeze.algorithms.base import StageContext, numel
from horovod_squeeze.algorithms.gossip import GossipAlgorithm, Neighbor, gossip_nonce
from horovod_squeeze.topology import TOPOLOGIES, Topology

__all__ = ["GossipResult", "gossip_step", "message_nbytes", "check_setup", "checkpoint",
           "restorable", "agree_on_restore", "FLAG_BYTES", "CHECKPOINT_FORMAT"]

Tensor = Any
_log = logging.getLogger("horovod_squeeze")
#: Bytes before the payload in every message: the finite flag.
FLAG_BYTES = 1
#: The format tag of a gossip checkpoint (:func:`checkpoint`).
CHECKPOINT_FORMAT = "horovod_squeeze.gossip/1"


class GossipResult(NamedTuple):
    model: Tensor  # the new model vector
    state: dict  # the new state
    message_nbytes: int  # bytes sent to each neighbour
    absent: tuple[int, ...]  # neighbours whose model was not finite this step


def message_nbytes(algorithm: GossipAlgorithm, size: int, segments=None) -> int:
    """Bytes one rank sends to each neighbour per step, for a model of ``size`` entries."""
    return FLAG_BYTES + algorithm.compressor.payload_nbytes(size, segments)


def check_setup(algorithm, topology, size: int, precision: str,
                consensus_every: int = 0) -> Topology:
    """The bindings' argument checks: ``algorithm`` a gossip algorithm, ``topology`` a
    :class:`Topology` of ``size`` ranks or a built-in graph's name, ``precision`` float32 or
    float64, ``consensus_every`` a whole number of steps (0: never). Returns the topology."""
    if isinstance(consensus_every, bool) or not isinstance(consensus_every, int) \
            or consensus_every < 0:
        raise ValueError(f"consensus_every must be an integer >= 0, got {consensus_every!r}")
    if not isinstance(algorithm, GossipAlgorithm):
        raise TypeError(f"decentralized training needs a decentralized algorithm (hs.DeepSqueeze, "
                        f"hs.ChocoSGD or hs.DPSGD), got {algorithm!r}")
    if isinstance(topology, str):
        if topology not in TOPOLOGIES:
            raise ValueError(f"unknown topology {topology!r}; choose among "
                             f"{', '.join(TOPOLOGIES)} or pass a horovod_squeeze.topology.Topology")
        topology = TOPOLOGIES[topology](size)
    if not isinstance(topology, Topology):
        raise TypeError(f"topology must be a name or a horovod_squeeze.topology.Topology, got "
                        f"{topology!r}")
    if precision not in ("float32", "float64"):
        raise ValueError(f"precision must be 'float32' or 'float64', got {precision!r}")
    return topology


def gossip_step(algorithm: GossipAlgorithm, codec, model: Tensor, state: dict, *,
                topology: Topology, rank: int, step: int, finite: bool,
                exchange: Callable[[Tensor], Sequence[Tensor]], segments=None,
                precision: str = "float32", name: str = "model") -> GossipResult:
    """``model`` (after the local step) mixed with the neighbours' messages."""
    xp = codec.xp
    size = numel(model)
    ctx = StageContext(gossip_nonce(step, rank), name, step, None, segments, precision)
    nbytes = message_nbytes(algorithm, size, segments)
    if finite:
        sent = algorithm.send_stage(codec, model, state, ctx)
        message = xp.concat([xp.constant([1], "uint8"), sent.payload])
    else:
        message = xp.to_bytes(xp.pad(xp.constant([0], "int64"), nbytes), "uint8")
    received = exchange(message)
    if not finite:
        raise FloatingPointError(
            f"{name}: rank {rank}'s model is not finite (NaN or Inf) after its local step; it sent "
            f"nothing its neighbours use, and its {algorithm!r} state is unchanged")
    self_weight = topology.weight(rank, rank)
    neighbors, absent = [], []
    for other, data in zip(topology.neighbors(rank), received):
        weight = topology.weight(rank, other)
        if int(xp.from_bytes(xp.slice(data, 0, FLAG_BYTES), "uint8")[0]) != 1:
            absent.append(other)
            if algorithm.absent_neighbor == "self":
                self_weight += weight
            else:
                neighbors.append(Neighbor(other, weight, sent.decoded * 0.0))
            continue
        payload = xp.slice(data, FLAG_BYTES, nbytes)
        neighbors.append(Neighbor(other, weight, algorithm.decode(codec, payload, size, ctx)))
    mixed = algorithm.mix_stage(codec, model, sent.decoded, self_weight, neighbors, sent.state, ctx)
    return GossipResult(mixed.model, mixed.state, nbytes, tuple(absent))


def checkpoint(algorithm: GossipAlgorithm, topology: Topology, rank: int, step: int, sizes,
               state: dict) -> dict:
    """One rank's gossip state as a checkpoint (``state``: NumPy arrays). Decentralized ranks hold
    different models, so each rank saves its own."""
    return {"format": CHECKPOINT_FORMAT, "algorithm": repr(algorithm), "topology": topology.name,
            "rank": int(rank), "size": topology.size, "sizes": [int(s) for s in sizes],
            "step": int(step), "state": dict(state)}


def restorable(saved, algorithm: GossipAlgorithm, topology: Topology, rank: int, sizes) -> bool:
    """Whether ``saved`` (from :func:`checkpoint`) is this rank's own state, to restore exactly;
    ``False`` for another rank's or another world's (restoring it would break what the neighbours
    believe, e.g. CHOCO's public copies: the bindings then restart every rank from zero state).
    ``ValueError`` for a checkpoint of another algorithm or model, or a malformed one."""
    if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"not a gossip checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    if saved["algorithm"] != repr(algorithm):
        raise ValueError(f"the checkpoint holds {saved['algorithm']} state, this run trains with "
                         f"{algorithm!r}")
    if list(saved["sizes"]) != [int(s) for s in sizes]:
        raise ValueError(f"the checkpoint's parameters have sizes {list(saved['sizes'])}, this "
                         f"model's {[int(s) for s in sizes]}")
    names = set(algorithm.state_names())
    if set(saved["state"]) != names:
        raise ValueError(f"the checkpoint's state is {sorted(saved['state'])}, {algorithm!r} "
                         f"keeps {sorted(names)}")
    return (saved["rank"] == rank and saved["size"] == topology.size
            and saved["topology"] == topology.name)


def agree_on_restore(saved, algorithm: GossipAlgorithm, topology: Topology, exchange,
                     sizes) -> tuple[dict | None, int]:
    """What every rank does with a loaded checkpoint, decided alike on every rank (one allreduce
    through ``exchange``, a :class:`~horovod_squeeze.neighbors.NeighborExchange`): its saved state
    (NumPy arrays) if every rank loaded its own, else ``None``, zero state (rank 0 logs a
    warning); and the step to go on from, the largest saved."""
    own = restorable(saved, algorithm, topology, exchange.rank, sizes)
    everyone, step = exchange.everyone(own, saved["step"])
    if not everyone and exchange.rank == 0:
        _log.warning("gossip checkpoint: not every rank loaded its own state; every rank restarts "
                     "from zero %r state at step %d", algorithm, step)
    return (saved["state"] if everyone else None), step
