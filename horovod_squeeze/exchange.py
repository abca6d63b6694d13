"""Exchanges: where an algorithm's stages run, what travels between them, and what it costs.

An exchange runs one bucket's step as a generator (:meth:`Exchange.run`) that *yields* the
collectives it needs (:class:`Collective`) and receives their results. The generator is written once
for every framework; :mod:`horovod_squeeze.driver` runs it over injected collectives (Horovod's,
asynchronously in PyTorch and inside a graph in TensorFlow, or the in-process fake of
:mod:`horovod_squeeze.fake`).

- :class:`Sharded` (``"sharded"``, the default): rank r owns shard r of every bucket. Pass 1 is one
  alltoall of packed worker payloads (rank i sends its compression of shard j to rank j); the owner
  decodes the n pieces, runs the server stage and pass 2 is one allgather of the server payloads.
  Each rank sends ``(n - 1)`` pieces of a shard's payload, twice. Shards cut tensors, so each
  shard's payload has its own size (:func:`shard_segments`): the collectives carry ``splits``.
- :class:`Allgather` (``"allgather"``): one pass; every rank gathers every worker payload of the whole
  bucket and runs the server stage itself (a replicated server: nothing travels in pass 2).
- :class:`Allreduce` (``"allreduce"``): linear worker compressors only (``Identity``, ``FP16``,
  ``RandK``): their compact values are averaged by Horovod's allreduce directly; ranks share the
  random stream so their values line up.
- :class:`Plain`: an uncompressed fp32 average (small tensors, warm-up steps); no algorithm state.

Every compression sees the segments of its vector (:func:`tensor_segments`,
:func:`shard_segments`): the bucket's tensors, cut by shard boundaries, padding excluded, so every
tensor gets its own scales (see :mod:`horovod_squeeze.compressors`).

Everything except :meth:`Exchange.run` is a pure function of the configuration, so ranks agree on
buffer sizes without communicating, and telemetry can be checked against the wire format.
"""
from __future__ import annotations

import abc
import dataclasses
import warnings
from typing import Any, ClassVar, Generator, NamedTuple

from horovod_squeeze.algorithms.base import (
    AVERAGED_GRADIENT, SERVER, WORKER, Algorithm, StageContext,
)
from horovod_squeeze.compressors import Identity
from horovod_squeeze.streams import MASK32, hash32

__all__ = ["Exchange", "Sharded", "Allgather", "Allreduce", "Plain", "PLAIN", "EXCHANGES",
           "make_exchange", "Collective", "StepContext", "BucketResult", "PassBytes",
           "shard_numel", "shard_valid_numel", "tensor_segments", "shard_segments",
           "split_payloads", "fp32_allreduce_bytes", "stage_nonce", "PASS1", "PASS2"]

Tensor = Any

# Shards are whole bytes of 1-bit payloads, so every shard's bits start on a byte boundary.
SHARD_ALIGNMENT = 8

#: Stage numbers in random-stream nonces.
PASS1, PASS2 = 0, 1


class Collective(NamedTuple):
    """A collective an exchange asks for: ``op`` on this rank's ``tensor``, named ``name``.

    ``splits``: every rank's piece along dim 0, in rank order and the same list on every rank
    (every rank knows every payload's size). ``alltoall``: every rank sends ``splits[r]`` entries
    to rank r, so rank r receives ``size * splits[r]``; ``allgather``: rank r contributes
    ``splits[r]`` entries. ``None``: equal pieces.
    """

    op: str  # "alltoall", "allgather" or "allreduce_average"
    tensor: Tensor
    name: str  # unique within the bucket's step; the driver adds the engine's and bucket's prefix
    splits: tuple[int, ...] | None = None


class StepContext(NamedTuple):
    """Where and when a bucket's step runs."""

    step: Any
    rank: int
    size: int
    learning_rate: Any = None
    precision: str = "float32"  # the dtype of the bucket's arithmetic and state


class BucketResult(NamedTuple):
    """A bucket's step: what every rank applies (flat, the bucket's length) and the new state."""

    output: Tensor
    state: dict


@dataclasses.dataclass(frozen=True)
class PassBytes:
    """Bytes one rank sends and receives in each pass for one bucket (collectives' payloads)."""

    pass1_sent: int
    pass1_received: int
    pass2_sent: int
    pass2_received: int

    @property
    def sent(self) -> int:
        return self.pass1_sent + self.pass2_sent

    @property
    def received(self) -> int:
        return self.pass1_received + self.pass2_received

    def __add__(self, other: "PassBytes") -> "PassBytes":
        return PassBytes(*(a + b for a, b in zip(dataclasses.astuple(self),
                                                 dataclasses.astuple(other))))


def shard_numel(numel: int, num_ranks: int) -> int:
    """Entries per rank's shard of a bucket of ``numel``: equal, rounded up to whole bytes of bits."""
    per_rank = -(-numel // num_ranks)
    return -(-per_rank // SHARD_ALIGNMENT) * SHARD_ALIGNMENT


def shard_valid_numel(numel: int, num_ranks: int, owner: int) -> int:
    """Entries of shard ``owner`` that hold real data; the rest is padding, which carries no state
    (it is zeroed in every decoded piece and state tensor) and so never biases an average."""
    shard = shard_numel(numel, num_ranks)
    return max(0, min(shard, numel - owner * shard))


def tensor_segments(bucket) -> tuple[int, ...]:
    """The segments of a whole bucket: its tensors' sizes (an empty tensor has none)."""
    return tuple(stop - start for _, _, start, stop in bucket.spans() if stop > start)


def shard_segments(bucket, num_ranks: int, owner: int) -> tuple[int, ...]:
    """The segments of shard ``owner``: the parts of the bucket's tensors inside it, in order;
    the shard's padding belongs to none."""
    shard = shard_numel(bucket.numel, num_ranks)
    first, last = owner * shard, (owner + 1) * shard
    return tuple(min(stop, last) - max(start, first) for _, _, start, stop in bucket.spans()
                 if min(stop, last) > max(start, first))


def fp32_allreduce_bytes(numel: int, num_ranks: int) -> int:
    """Bytes one rank sends in a ring allreduce of ``numel`` float32 values: the baseline."""
    return 2 * (num_ranks - 1) * 4 * numel // num_ranks


def stage_nonce(step, bucket: int, shard: int, stage: int, rank: int = 0):
    """Random-stream nonce of one compression: distinct per step, bucket, shard, pass and rank.

    Ranks pass ``rank=0`` where they must draw the same numbers (RandK over an allreduce).
    """
    nonce = 0
    for part in (step, bucket, shard, stage, rank):
        nonce = hash32(nonce ^ (part & MASK32))
    return nonce


class Exchange(abc.ABC):
    """How one bucket's step travels. Subclasses are stateless: one instance serves every bucket."""

    name: ClassVar[str]
    #: Whether the exchange runs an algorithm (``Plain`` does not).
    compressed: ClassVar[bool] = True

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other) -> bool:
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))

    def check(self, algorithm: Algorithm) -> None:
        """Refuses an algorithm this exchange cannot run correctly."""

    @abc.abstractmethod
    def state_numel(self, placement: str, numel: int, size: int) -> int:
        """Length of this rank's state tensor of ``placement`` for a bucket of ``numel``."""

    @abc.abstractmethod
    def pass_bytes(self, algorithm: Algorithm, bucket, size: int, rank: int = 0) -> PassBytes:
        """Payload bytes rank ``rank`` of ``size`` sends and receives for ``bucket``.

        Counts what crosses the rank's boundary: a rank's own piece of an alltoall or allgather does
        not travel. Allreduce is counted as a ring, ``2 (n - 1) / n`` each way of the values it sums
        (a linear payload's header, such as RandK's stream key, never travels: every rank knows it).
        Only ``sharded`` depends on the rank: its shards hold different segments (and the last
        ones padding, which does not travel), so their payloads differ by a few bytes.
        """

    @abc.abstractmethod
    def run(self, codec, algorithm: Algorithm, bucket, flat: Tensor, state: dict,
            ctx: StepContext) -> Generator[Collective, Tensor, BucketResult]:
        """One step of ``bucket`` (its ``index``, ``numel`` and ``describe()``): yields collectives,
        returns the :class:`BucketResult`."""


class Sharded(Exchange):
    """Alltoall of worker payloads to shard owners, server stage per shard, allgather back."""

    name = "sharded"

    def state_numel(self, placement, numel, size):
        return shard_numel(numel, size) * (size if placement == WORKER else 1)

    def pass_bytes(self, algorithm, bucket, size, rank=0):
        shard = shard_numel(bucket.numel, size)
        segments = [shard_segments(bucket, size, owner) for owner in range(size)]
        up = [algorithm.worker.payload_nbytes(shard, s) for s in segments]  # to each owner
        down = [algorithm.server.payload_nbytes(shard, s) for s in segments]  # from each owner
        return PassBytes(sum(up) - up[rank], (size - 1) * up[rank],
                         (size - 1) * down[rank], sum(down) - down[rank])

    def run(self, codec, algorithm, bucket, flat, state, ctx):
        xp, n, rank = codec.xp, ctx.size, ctx.rank
        shard = shard_numel(bucket.numel, n)
        segments = [shard_segments(bucket, n, owner) for owner in range(n)]
        padded = xp.pad(flat, shard * n)
        worker_names = algorithm.state_names(WORKER)
        payloads, worker_state = [], {name: [] for name in worker_names}
        for owner in range(n):
            start, stop = owner * shard, (owner + 1) * shard
            valid = shard_valid_numel(bucket.numel, n, owner)
            out = algorithm.worker_stage(
                codec, xp.slice(padded, start, stop),
                {name: xp.slice(state[name], start, stop) for name in worker_names},
                _stage(ctx, bucket, owner, PASS1, ctx.rank, f"shard {owner}", segments[owner]))
            payloads.append(out.payload)
            for name in worker_names:
                worker_state[name].append(_zero_tail(xp, out.state[name], valid))
        sizes = tuple(algorithm.worker.payload_nbytes(shard, s) for s in segments)
        received = yield Collective("alltoall", xp.concat(payloads), "pass1", sizes)

        # Every rank sent this rank its compression of the same shard: n pieces of one size.
        pieces = split_payloads(codec, algorithm.worker, received, shard, [segments[rank]] * n,
                                ctx.precision)
        ctx_server = _stage(ctx, bucket, rank, PASS2, 0, f"shard {rank}", segments[rank])
        served = algorithm.server_stage(
            codec, pieces, {name: state[name] for name in algorithm.state_names(SERVER)},
            ctx_server)
        sizes = tuple(algorithm.server.payload_nbytes(shard, s) for s in segments)
        gathered = yield Collective("allgather", served.payload, "pass2", sizes)

        decoded = xp.slice(xp.concat(split_payloads(codec, algorithm.server, gathered, shard,
                                                    segments, ctx.precision)), 0, bucket.numel)
        new_state = {name: xp.concat(parts) for name, parts in worker_state.items()}
        valid = shard_valid_numel(bucket.numel, n, rank)
        new_state.update({name: _zero_tail(xp, value, valid)
                          for name, value in served.state.items()})
        return BucketResult(algorithm.output_stage(codec, decoded, ctx_server), new_state)


class _Replicated(Exchange):
    """One pass; every rank runs the server stage on the same pieces (a replicated server)."""

    #: Whether every rank draws pass 1's random numbers from one stream.
    shared_stream: ClassVar[bool] = False

    def check(self, algorithm):
        if not isinstance(algorithm.server, Identity) and not algorithm.state_names(SERVER):
            warnings.warn(
                f"{algorithm!r} over exchange={self.name!r}: nothing travels in a second pass, so "
                f"the server compressor {algorithm.server!r}, without a server residual, only "
                "loses precision; use exchange='sharded' or leave server= out", stacklevel=4)

    def state_numel(self, placement, numel, size):
        return numel

    def run(self, codec, algorithm, bucket, flat, state, ctx):
        worker_names = algorithm.state_names(WORKER)
        stream_rank = 0 if self.shared_stream else ctx.rank
        segments = tensor_segments(bucket)
        sent = algorithm.worker_stage(codec, flat, {name: state[name] for name in worker_names},
                                      _stage(ctx, bucket, 0, PASS1, stream_rank, "", segments))
        pieces = yield from self.gather_pieces(codec, algorithm, bucket, sent.payload, ctx)
        # Nothing travels in pass 2: every rank serves itself.
        ctx_server = _stage(ctx, bucket, 0, PASS2, 0, "", segments)._replace(travels=False)
        served = algorithm.server_stage(
            codec, pieces, {name: state[name] for name in algorithm.state_names(SERVER)},
            ctx_server)
        return BucketResult(algorithm.output_stage(codec, served.decoded, ctx_server),
                            {**sent.state, **served.state})

    @abc.abstractmethod
    def gather_pieces(self, codec, algorithm, bucket, payload, ctx):
        """Yields the pass, returns the decoded pieces the server stage averages."""


class Allgather(_Replicated):
    """Every rank gathers every worker payload and runs the server stage itself."""

    name = "allgather"

    def pass_bytes(self, algorithm, bucket, size, rank=0):
        payload = (size - 1) * algorithm.worker.payload_nbytes(bucket.numel,
                                                               tensor_segments(bucket))
        return PassBytes(payload, payload, 0, 0)

    def gather_pieces(self, codec, algorithm, bucket, payload, ctx):
        gathered = yield Collective("allgather", payload, "pass1")
        return split_payloads(codec, algorithm.worker, gathered, bucket.numel,
                              [tensor_segments(bucket)] * ctx.size, ctx.precision)


class Allreduce(_Replicated):
    """Horovod's allreduce averages a linear compressor's values; ranks share the random stream."""

    name = "allreduce"
    shared_stream = True

    def check(self, algorithm):
        super().check(algorithm)
        if not algorithm.worker.linear:
            raise ValueError(
                f"exchange='allreduce' sums compressed values, which is only correct for linear "
                f"compressors (Identity, FP16, RandK); {algorithm.worker!r} is not linear: "
                "use exchange='sharded' or 'allgather'")

    def pass_bytes(self, algorithm, bucket, size, rank=0):
        layout = algorithm.worker.layout(bucket.numel, tensor_segments(bucket))
        ring = 2 * (size - 1) * layout["values"].nbytes // size
        return PassBytes(ring, ring, 0, 0)

    def gather_pieces(self, codec, algorithm, bucket, payload, ctx):
        segments = tensor_segments(bucket)
        header, values = codec.split_linear(algorithm.worker, payload, bucket.numel, segments)
        averaged = yield Collective("allreduce_average", values, "pass1")
        joined = codec.join_linear(algorithm.worker, header, averaged, bucket.numel, segments)
        return [codec.decompress(algorithm.worker, joined, bucket.numel, name=bucket.describe(),
                                 segments=segments, dtype=ctx.precision)]


class Plain(Exchange):
    """An uncompressed fp32 average: what Horovod's allreduce does.

    For an algorithm whose output is a model increment, the plain step is that algorithm's
    uncompressed limit: ``-learning_rate * average`` (an SGD step), so small tensors and warm-up
    steps still move the model the right way.
    """

    name = "uncompressed"
    compressed = False

    def state_numel(self, placement, numel, size):
        return 0

    def pass_bytes(self, algorithm, bucket, size, rank=0):
        ring = fp32_allreduce_bytes(bucket.numel, size)
        return PassBytes(ring, ring, 0, 0)

    def run(self, codec, algorithm, bucket, flat, state, ctx):
        averaged = yield Collective("allreduce_average", flat, "plain")
        if algorithm is None or algorithm.output == AVERAGED_GRADIENT:
            return BucketResult(averaged, dict(state))
        if ctx.learning_rate is None:
            raise ValueError(f"{algorithm!r} outputs a model increment, which needs the "
                             "optimizer's learning rate; none was given to the engine")
        return BucketResult(averaged * (-ctx.learning_rate), dict(state))


#: The uncompressed exchange, for small tensors and warm-up steps.
PLAIN = Plain()

EXCHANGES = {cls.name: cls for cls in (Sharded, Allgather, Allreduce)}


def make_exchange(exchange) -> Exchange:
    """An exchange from its name (``"sharded"``, ``"allgather"``, ``"allreduce"``) or itself."""
    if isinstance(exchange, Exchange) and exchange.compressed:
        return exchange
    if isinstance(exchange, str) and exchange in EXCHANGES:
        return EXCHANGES[exchange]()
    raise ValueError(f"exchange must be one of {tuple(EXCHANGES)} or an Exchange, "
                     f"got {exchange!r}")


def split_payloads(codec, compressor, gathered: Tensor, numel: int,
                   segments: list[tuple[int, ...]], dtype: str = "float32") -> list[Tensor]:
    """The payloads packed back to back in ``gathered`` (rank order), decoded to ``dtype``: piece r
    is a vector of ``numel`` entries in ``segments[r]``, its size
    ``payload_nbytes(numel, segments[r])``."""
    pieces, start = [], 0
    for piece_segments in segments:
        stop = start + compressor.payload_nbytes(numel, piece_segments)
        pieces.append(codec.decompress(compressor, codec.xp.slice(gathered, start, stop), numel,
                                       segments=piece_segments, dtype=dtype))
        start = stop
    return pieces


def _stage(ctx: StepContext, bucket, shard: int, stage: int, stream_rank: int, where: str,
           segments: tuple[int, ...]) -> StageContext:
    name = f"{bucket.describe()} {where}".rstrip()
    return StageContext(stage_nonce(ctx.step, bucket.index, shard, stage, stream_rank), name,
                        step=ctx.step, learning_rate=ctx.learning_rate, segments=segments,
                        precision=ctx.precision)


def _zero_tail(xp, x: Tensor, valid: int) -> Tensor:
    numel = int(x.shape[0])
    return x if valid >= numel else xp.pad(xp.slice(x, 0, valid), numel)
