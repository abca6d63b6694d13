"""The gossip protocol: decentralized algorithms, where each rank mixes its model with its neighbours'.

No server and no average: every rank takes its local optimizer step (``x_half``), sends one payload
to each neighbour in a :class:`~horovod_squeeze.topology.Topology`, and mixes what it hears with the
weights ``W[i, j]``. A :class:`GossipAlgorithm` says what one rank computes, in two stages written
against a codec (like :class:`~horovod_squeeze.algorithms.base.Algorithm`'s, one definition for
every framework and the NumPy reference):

- :meth:`GossipAlgorithm.send_stage` maps ``x_half`` and the rank's state to the payload it sends,
  what every neighbour decodes from it, and the new state;
- :meth:`GossipAlgorithm.mix_stage` maps ``x_half``, the rank's own decoded message, its
  neighbours' (with their weights) and the state to the new model and state.

State is per rank, in model units (:data:`~horovod_squeeze.algorithms.base.MODEL`). Stages return
new values and never write their inputs.

A neighbour whose model was not finite sends nothing usable; :attr:`GossipAlgorithm.absent_neighbor`
says how the others mix without it, keeping the algorithm's invariants: ``"self"`` moves its weight
to the receiving rank's own message (the row still sums to 1), ``"zero"`` mixes a zero message (CHOCO's
public copies then stay what every neighbour believes they are).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Mapping, NamedTuple, Sequence

from horovod_squeeze.algorithms.base import StageContext, StateSpec
from horovod_squeeze.compressors import Compressor, Identity
from horovod_squeeze.exchange import stage_nonce

__all__ = ["GossipAlgorithm", "Sent", "Mixed", "Neighbor", "weighted_sum", "gossip_nonce", "GOSSIP"]

#: The stage number of a gossip message in its random-stream nonce (passes 1 and 2 are 0 and 1).
GOSSIP = 2


def gossip_nonce(step, rank: int):
    """Random-stream nonce of rank ``rank``'s message at ``step``: distinct per step and rank."""
    return stage_nonce(step, 0, 0, GOSSIP, rank)

Tensor = Any


class Sent(NamedTuple):
    """One rank's message: the payload that travels, what its receivers decode, the new state."""

    payload: Tensor
    decoded: Tensor
    state: dict


class Mixed(NamedTuple):
    """One rank after gossip: its new model and state."""

    model: Tensor
    state: dict


class Neighbor(NamedTuple):
    """A decoded message from neighbour ``rank``, mixed with weight ``W[i, rank]``."""

    rank: int
    weight: float
    decoded: Tensor


def weighted_sum(terms: Sequence[tuple[float, Tensor]]) -> Tensor:
    """``sum_k w_k t_k``, accumulated in the given order so every framework rounds alike."""
    total = None
    for weight, tensor in terms:
        term = tensor * weight
        total = term if total is None else total + term
    return total


@dataclasses.dataclass(frozen=True, repr=False)
class GossipAlgorithm:
    """Base of the decentralized algorithm specs: a compressor, a consensus step, two stages."""

    compressor: Compressor = Identity()
    consensus_step: float = 1.0

    #: How a neighbour that sent nothing usable is mixed: ``"self"`` or ``"zero"`` (see above).
    absent_neighbor: ClassVar[str] = "self"

    def __post_init__(self):
        if not isinstance(self.compressor, Compressor):
            raise TypeError(f"{type(self).__name__}: compressor must be a compressor spec such as "
                            f"horovod_squeeze.ScaledSign(), got {self.compressor!r}")
        step = self.consensus_step
        if isinstance(step, bool) or not isinstance(step, (int, float)) \
                or not (math.isfinite(step) and 0 < step <= 1):
            raise ValueError(f"{type(self).__name__}: consensus_step must be in (0, 1], got "
                             f"{step!r}")

    def __repr__(self) -> str:
        fields = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)]
        if fields and fields[0].startswith("compressor="):
            fields[0] = repr(self.compressor)
        return f"{type(self).__name__}({', '.join(fields)})"

    def state(self) -> tuple[StateSpec, ...]:
        """The algorithm's named per-rank state tensors (model units)."""
        return ()

    def send_stage(self, codec, model: Tensor, state: Mapping[str, Tensor],
                   ctx: StageContext) -> Sent:
        raise NotImplementedError

    def decode(self, codec, payload: Tensor, numel: int, ctx: StageContext) -> Tensor:
        """A neighbour's payload as it decodes (``ctx``: the receiving rank's)."""
        return codec.decompress(self.compressor, payload, numel, name=ctx.name,
                                segments=ctx.segments, dtype=ctx.precision)

    def mix_stage(self, codec, model: Tensor, own: Tensor, self_weight: float,
                  neighbors: Sequence[Neighbor], state: Mapping[str, Tensor],
                  ctx: StageContext) -> Mixed:
        raise NotImplementedError

    def check(self, largest_numel: int, *, stacklevel: int = 2) -> None:
        """Refuses impossible settings, warns on unsafe ones."""

    def state_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.state())
