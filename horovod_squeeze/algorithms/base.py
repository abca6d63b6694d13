"""The algorithm protocol: named state, a worker stage, a server stage, and what workers apply.

An algorithm is a small frozen spec (hyperparameters and one compressor per pass) whose methods are
pure functions written against a codec (``horovod_squeeze.torch.codecs``,
``horovod_squeeze.tensorflow.codecs`` or the NumPy reference), so one definition serves every
framework. The exchange (:mod:`horovod_squeeze.exchange`) decides where each stage runs and what
travels; the algorithm only says what a stage computes:

- :meth:`Algorithm.state` declares the algorithm's tensors: their name, where they live
  (:data:`WORKER`: one per rank; :data:`SERVER`: one per server shard, or one replicated copy when the
  exchange has no server) and their units (:data:`GRADIENT` state is rescaled when the learning rate
  changes, :data:`MODEL` state is not). Engines, checkpoints, re-sharding and telemetry loop over it.
- :meth:`Algorithm.worker_stage` maps a rank's gradient segment and its worker state to the payload
  of pass 1 (made with :attr:`Algorithm.worker`) and the new worker state.
- :meth:`Algorithm.server_stage` maps the n decoded worker pieces and the server state to the payload
  of pass 2 (made with :attr:`Algorithm.server`), what it decodes to, and the new server state.
- :meth:`Algorithm.output_stage` turns the decoded pass-2 result into what every rank applies:
  an averaged gradient (:data:`AVERAGED_GRADIENT`, handed to the wrapped optimizer) or a model
  increment (:data:`MODEL_INCREMENT`, added to the parameters; stages see the learning rate).

Stages return new values and never write their inputs, so each engine stores state its own way.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, ClassVar, Mapping, NamedTuple, Sequence

from horovod_squeeze.compressors import Compressor, Identity

__all__ = ["Algorithm", "StateSpec", "StageContext", "WorkerOut", "ServerOut", "Compensated",
           "compensate", "mean", "numel", "warn_unless_contractive", "WORKER", "SERVER", "GRADIENT", "MODEL", "MOMENT",
           "AVERAGED_GRADIENT", "MODEL_INCREMENT"]

Tensor = Any

#: Placements: one tensor per rank, or one per server shard (replicated without a server).
WORKER, SERVER = "worker", "server"
#: Units of a state tensor: gradient-units residuals (rescaled when the learning rate changes),
#: model units, and a running estimate of the gradient (an optimizer's moment, a learned shift:
#: kept as is, as the wrapped optimizer keeps its own).
GRADIENT, MODEL, MOMENT = "gradient", "model", "moment"
#: What an algorithm's output is.
AVERAGED_GRADIENT, MODEL_INCREMENT = "averaged gradient", "model increment"


@dataclasses.dataclass(frozen=True)
class StateSpec:
    """One named state tensor of an algorithm, as long as the segment its stage sees."""

    name: str
    placement: str  # WORKER or SERVER
    units: str = GRADIENT
    doc: str = ""

    def __post_init__(self):
        if self.placement not in (WORKER, SERVER) or self.units not in (GRADIENT, MODEL, MOMENT):
            raise ValueError(f"bad state spec {self!r}")


class StageContext(NamedTuple):
    """What a stage knows besides its tensors."""

    nonce: Any  # random-stream nonce of this compression (distinct per step, bucket, shard, rank)
    name: str  # what the tensors are, for error messages
    step: Any = 0  # the step counter (an int, or a scalar tensor inside a graph)
    learning_rate: Any = None  # the wrapped optimizer's, for algorithms that update the model
    #: Lengths of the real segments of the stage's tensors (the bucket's tensors, or their parts
    #: in a shard; the rest is padding); ``None``: one segment, the whole tensor. Compressions
    #: pass it to the codec, so every tensor gets its own scales.
    segments: tuple[int, ...] | None = None
    #: The dtype of the stage's tensors (``"float32"`` or ``"float64"``): what decoding gives back.
    precision: str = "float32"
    #: Whether the stage's payload travels. A replicated server's does not (every rank runs it on
    #: the same pieces), so an ``Identity`` there returns its input exactly, in ``precision``.
    travels: bool = True


class WorkerOut(NamedTuple):
    """Pass 1 on one rank: the payload that travels and the new worker state."""

    payload: Tensor
    state: dict


class ServerOut(NamedTuple):
    """Pass 2 on one server: the payload, what every rank decodes from it, the new server state."""

    payload: Tensor
    decoded: Tensor
    state: dict


class Compensated(NamedTuple):
    """One error-compensated compression."""

    payload: Tensor  # the uint8 bytes that travel
    decoded: Tensor  # what the receiver reconstructs: C(v)
    residual: Tensor  # v - C(v)


def compensate(codec, compressor: Compressor, x: Tensor, residual: Tensor | None,
               ctx: StageContext) -> Compensated:
    """Error feedback, one line of the papers: ``v = x + e;  c = C(v);  e = v - c``.

    Without a residual (``None``), ``v = x`` and the returned residual is what was lost.
    ``Identity`` on a stage whose payload does not travel is exact (no payload).
    """
    corrected = x if residual is None else x + residual
    if not ctx.travels and isinstance(compressor, Identity):
        return Compensated(None, corrected, corrected - corrected)
    payload = codec.compress(compressor, corrected, nonce=ctx.nonce, name=ctx.name,
                             segments=ctx.segments)
    decoded = codec.decompress(compressor, payload, numel(x), name=ctx.name,
                               segments=ctx.segments, dtype=ctx.precision)
    return Compensated(payload, decoded, corrected - decoded)


def mean(pieces: Sequence[Tensor]) -> Tensor:
    """``mean_i(c_i)``, summed in rank order so every framework rounds alike."""
    total = pieces[0]
    for piece in pieces[1:]:
        total = total + piece
    return total / len(pieces)


@dataclasses.dataclass(frozen=True, repr=False)
class Algorithm:
    """Base of the algorithm specs: a compressor per pass, named state, two stages.

    ``Algorithm(C)`` uses ``C`` for both passes where the algorithm compresses both; subclasses
    define which compressor a pass uses when only one is given.
    """

    worker: Compressor | None = None
    server: Compressor | None = None

    #: What every rank applies after pass 2.
    output: ClassVar[str] = AVERAGED_GRADIENT

    def __post_init__(self):
        for field in ("worker", "server"):
            value = getattr(self, field)
            if value is not None and not isinstance(value, Compressor):
                raise TypeError(f"{type(self).__name__}: {field} must be a compressor spec such "
                                f"as horovod_squeeze.ScaledSign(), got {value!r}")
        if self.worker is None:
            raise TypeError(f"{type(self).__name__} needs a compressor, e.g. "
                            f"{type(self).__name__}(horovod_squeeze.ScaledSign())")
        if self.server is None:
            object.__setattr__(self, "server", self.default_server())

    def __repr__(self) -> str:
        fields = [repr(self.worker)]
        if self.server != self.default_server():
            fields.append(f"server={self.server!r}")
        fields += [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                   if f.name not in ("worker", "server")]
        return f"{type(self).__name__}({', '.join(fields)})"

    def default_server(self) -> Compressor:
        """Pass 2's compressor when none is named: exact (fp32), unless the algorithm compresses
        its second pass by design."""
        return Identity()

    # --- the protocol ---------------------------------------------------------------------------

    def state(self) -> tuple[StateSpec, ...]:
        """The algorithm's named state tensors."""
        return ()

    def worker_stage(self, codec, gradient: Tensor, state: Mapping[str, Tensor],
                     ctx: StageContext) -> WorkerOut:
        raise NotImplementedError

    def server_stage(self, codec, pieces: Sequence[Tensor], state: Mapping[str, Tensor],
                     ctx: StageContext) -> ServerOut:
        raise NotImplementedError

    def output_stage(self, codec, decoded: Tensor, ctx: StageContext) -> Tensor:
        """What every rank applies, from the decoded pass-2 result (by default, itself)."""
        return decoded

    def check(self, largest_numel: int, *, stacklevel: int = 2) -> None:
        """Refuses impossible settings, warns on unsafe ones (``largest_numel``: the largest
        tensor compressed)."""

    # --- helpers for subclasses -----------------------------------------------------------------

    def state_names(self, placement: str) -> tuple[str, ...]:
        return tuple(s.name for s in self.state() if s.placement == placement)

    def _warn_unless_contractive(self, compressor: Compressor, largest_numel: int,
                                 stacklevel: int) -> None:
        warn_unless_contractive(self, compressor, largest_numel, stacklevel + 1)


def warn_unless_contractive(owner, compressor: Compressor, largest_numel: int,
                            stacklevel: int) -> None:
    """Error feedback needs a contractive compressor: residuals of a high-variance unbiased one can
    grow without bound (``owner``: the algorithm, for the message)."""
    contract = compressor.contract(max(largest_numel, 1))
    if contract.kind == "unbiased" and contract.omega > 1:
        warnings.warn(
            f"{owner!r}: error feedback needs a contractive compressor, and {compressor!r} is "
            f"unbiased with omega = {contract.omega:.3g} on {largest_numel} entries, so its "
            f"residuals can grow without bound; use ToContractive({compressor!r})",
            stacklevel=stacklevel + 1)


def numel(x) -> int:
    """Entries of a tensor of any framework."""
    return math.prod(int(d) for d in x.shape)
