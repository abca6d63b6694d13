"""Exchanges: how compressed payloads travel between ranks, and the bytes each pass moves.

- ``sharded`` (default): rank r owns shard r of every bucket. Pass 1 is one alltoall of packed
  worker payloads (rank i sends its compression of shard j to rank j); the owner averages the n
  pieces, runs the server stage and pass 2 is one allgather of the packed server payloads. Each
  rank sends about ``2 (n - 1) / n`` of the compressed bucket.
- ``allgather``: one pass; every rank gathers every worker payload of the whole bucket and runs the
  server stage itself (a replicated server: no second pass, ``n - 1`` payloads sent per rank).
- ``allreduce``: linear compressors only (``Identity``, ``FP16``, ``RandK``): their compact values
  are summed by Horovod's allreduce directly.

Everything here is a pure function of the configuration, so ranks agree on buffer sizes without
communicating, and telemetry can be checked against the wire format.
"""
from __future__ import annotations

import dataclasses
import math
import warnings

from horovod_squeeze.algorithms import Algorithm
from horovod_squeeze.compressors import Compressor

__all__ = ["EXCHANGES", "check_configuration", "shard_numel", "shard_valid_numel", "PassBytes", "pass_bytes",
           "fp32_allreduce_bytes"]

EXCHANGES = ("sharded", "allgather", "allreduce")

# Shards are whole bytes of 1-bit payloads, so every shard's bits start on a byte boundary.
SHARD_ALIGNMENT = 8


def check_configuration(algorithm, named_shapes, exchange: str, *, warmup_steps: int = 0,
                        log_every: int = 0, stacklevel: int = 4) -> None:
    """Refuses impossible settings with a clear error; warns on unsafe ones (both frameworks)."""
    if not isinstance(algorithm, Algorithm):
        raise TypeError("compression must be an algorithm such as "
                        "horovod_squeeze.DoubleSqueeze(horovod_squeeze.ScaledSign()), "
                        f"got {algorithm!r}")
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
    if exchange == "allreduce" and not algorithm.compressor.linear:
        raise ValueError(
            f"exchange='allreduce' sums compressed values, which is only correct for linear "
            f"compressors (Identity, FP16, RandK); {algorithm.compressor!r} is not linear: "
            "use exchange='sharded' or 'allgather'")
    if warmup_steps < 0 or log_every < 0:
        raise ValueError("warmup_steps and log_every must be >= 0")
    largest = max((math.prod(int(d) for d in shape) for _, shape in named_shapes), default=1)
    contract = algorithm.compressor.contract(largest)
    if algorithm.worker_feedback and contract.kind == "unbiased" and contract.omega > 1:
        warnings.warn(
            f"{algorithm!r}: error feedback needs a contractive compressor, and "
            f"{algorithm.compressor!r} is unbiased with omega = {contract.omega:.3g} on "
            f"{largest} entries, so its residuals can grow without bound; use "
            f"ToContractive({algorithm.compressor!r})", stacklevel=stacklevel)


def shard_numel(numel: int, num_ranks: int) -> int:
    """Entries per rank's shard of a bucket of ``numel``: equal, rounded up to whole bytes of bits."""
    per_rank = -(-numel // num_ranks)
    return -(-per_rank // SHARD_ALIGNMENT) * SHARD_ALIGNMENT


def shard_valid_numel(numel: int, num_ranks: int, owner: int) -> int:
    """Entries of shard ``owner`` that hold real data; the rest is padding.

    Padding entries are zeroed in every stage's input and residual, so they carry no state and do
    not bias the server's average.
    """
    shard = shard_numel(numel, num_ranks)
    return max(0, min(shard, numel - owner * shard))


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


def pass_bytes(compressor: Compressor, exchange: str, numel: int, num_ranks: int) -> PassBytes:
    """Payload bytes one rank sends and receives for a bucket of ``numel`` entries.

    Counts what crosses the rank's boundary: a rank's own piece of an alltoall or allgather does
    not travel. Allreduce is counted as a ring, ``2 (n - 1) / n`` each way of the values it sums
    (a linear payload's header, such as RandK's stream key, never travels: every rank knows it).
    """
    peers = num_ranks - 1
    if exchange == "sharded":
        piece = compressor.payload_nbytes(shard_numel(numel, num_ranks))
        return PassBytes(peers * piece, peers * piece, peers * piece, peers * piece)
    if exchange == "allgather":
        payload = compressor.payload_nbytes(numel)
        return PassBytes(peers * payload, peers * payload, 0, 0)
    if exchange == "allreduce":
        ring = 2 * peers * compressor.layout(numel)["values"].nbytes // num_ranks
        return PassBytes(ring, ring, 0, 0)
    raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")


def fp32_allreduce_bytes(numel: int, num_ranks: int) -> int:
    """Bytes one rank sends in a ring allreduce of ``numel`` float32 values: the baseline."""
    return 2 * (num_ranks - 1) * 4 * numel // num_ranks
