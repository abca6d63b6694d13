"""What one rank computes between collectives, for each exchange: written once over a codec.

The PyTorch and TensorFlow engines run these functions on their own tensors and only move the
results through Horovod. Residuals are returned, not updated in place, so each engine stores them
its own way (``Tensor.copy_``, ``tf.Variable.assign``). The arithmetic is
:func:`~horovod_squeeze.algorithms.worker_stage` and
:func:`~horovod_squeeze.algorithms.server_stage`; this module adds the data layout: shards, padding,
nonces and payload offsets, matching :mod:`horovod_squeeze.reference.simulate`.

``sharded``: :func:`sharded_pass1` (alltoall input) -> :func:`sharded_pass2` (allgather input)
-> :func:`sharded_decode`. ``allgather`` / ``allreduce``: :func:`replicated_pass1` -> collective
-> :func:`replicated_server`.
"""
from __future__ import annotations

from typing import Any, NamedTuple

from horovod_squeeze.algorithms import (
    SERVER, WORKER, Algorithm, Compensated, server_stage, stage_nonce, worker_stage,
)
from horovod_squeeze.buckets import Bucket
from horovod_squeeze.exchange import shard_numel, shard_valid_numel

__all__ = ["Sent", "sharded_pass1", "sharded_pass2", "sharded_decode", "replicated_pass1",
           "replicated_server", "split_payloads"]

Tensor = Any


class Sent(NamedTuple):
    """A pass's output on one rank: the payload that travels and the rank's new residual."""

    payload: Tensor
    residual: Tensor | None  # None without feedback at this stage


def sharded_pass1(codec, algorithm: Algorithm, bucket: Bucket, flat: Tensor,
                  residual: Tensor | None, *, step, rank: int, size: int) -> Sent:
    """Worker ``rank``: shard j of ``g + e`` compressed for its owner j, payloads in owner order."""
    xp = codec.xp
    shard = shard_numel(bucket.numel, size)
    padded = xp.pad(flat, shard * size)
    payloads, residuals = [], []
    for owner in range(size):
        part = slice(owner * shard, (owner + 1) * shard)
        out = worker_stage(codec, algorithm, xp.slice(padded, part.start, part.stop),
                           None if residual is None else xp.slice(residual, part.start, part.stop),
                           nonce=stage_nonce(step, bucket.index, owner, WORKER, rank),
                           name=f"{bucket.describe()} shard {owner}")
        payloads.append(out.payload)
        if out.residual is not None:  # padding carries no state
            residuals.append(_zero_tail(xp, out.residual, shard_valid_numel(bucket.numel, size,
                                                                            owner)))
    return Sent(xp.concat(payloads), xp.concat(residuals) if residuals else None)


def sharded_pass2(codec, algorithm: Algorithm, bucket: Bucket, received: Tensor,
                  residual: Tensor | None, *, step, rank: int, size: int) -> Sent:
    """Owner ``rank``: the mean of the n workers' pieces of its shard, compressed by the server."""
    xp = codec.xp
    shard = shard_numel(bucket.numel, size)
    valid = shard_valid_numel(bucket.numel, size, rank)
    pieces = [_zero_tail(xp, piece, valid)
              for piece in split_payloads(codec, algorithm, received, shard, size)]
    out = server_stage(codec, algorithm, pieces, residual,
                       nonce=stage_nonce(step, bucket.index, rank, SERVER),
                       name=f"{bucket.describe()} shard {rank}")
    return Sent(out.payload,
                None if out.residual is None else _zero_tail(xp, out.residual, valid))


def sharded_decode(codec, algorithm: Algorithm, bucket: Bucket, gathered: Tensor, *,
                   size: int) -> Tensor:
    """Every rank: the n owners' server payloads decoded into the averaged bucket."""
    shard = shard_numel(bucket.numel, size)
    decoded = split_payloads(codec, algorithm, gathered, shard, size)
    return codec.xp.slice(codec.xp.concat(decoded), 0, bucket.numel)


def replicated_pass1(codec, algorithm: Algorithm, bucket: Bucket, flat: Tensor,
                     residual: Tensor | None, *, step, rank: int) -> Sent:
    """Worker pass of a one-pass exchange; ``rank=0`` on every rank shares the random stream."""
    out = worker_stage(codec, algorithm, flat, residual,
                       nonce=stage_nonce(step, bucket.index, 0, WORKER, rank),
                       name=bucket.describe())
    return Sent(out.payload, out.residual)


def replicated_server(codec, algorithm: Algorithm, bucket: Bucket, decoded_pieces: list,
                      residual: Tensor | None, *, step) -> Compensated:
    """The server stage every rank runs on the same pieces: ``.decoded`` is the averaged bucket."""
    return server_stage(codec, algorithm, decoded_pieces, residual,
                        nonce=stage_nonce(step, bucket.index, 0, SERVER), name=bucket.describe())


def split_payloads(codec, algorithm: Algorithm, gathered: Tensor, numel: int,
                   size: int) -> list[Tensor]:
    """``size`` equal payloads of ``numel`` entries each (rank order), decoded."""
    nbytes = algorithm.compressor.payload_nbytes(numel)
    return [codec.decompress(algorithm.compressor,
                             codec.xp.slice(gathered, r * nbytes, (r + 1) * nbytes), numel)
            for r in range(size)]


def _zero_tail(xp, x: Tensor, valid: int) -> Tensor:
    numel = int(x.shape[0])
    return x if valid >= numel else xp.pad(xp.slice(x, 0, valid), numel)
