"""Horovod's own ``compression=`` hook: which algorithms can go through it, and the ``allreduce``
exchange of one tensor split around it (:func:`start` before Horovod's allreduce, :func:`finish`
after).

The hook receives one tensor at a time, keeps no state, and Horovod's allreduce *sums* (averages)
what it returns, so only linear worker compressors are correct through it. Each tensor gets its own
random stream (``stream_id`` of its name) so that RandK picks the same entries on every rank; the
server stage runs on every rank after the allreduce, on the same average, so nothing travels back
and any server compressor works. The framework classes (``horovod_squeeze.torch.StockCompression``,
``horovod_squeeze.tensorflow.StockCompression``) find the tensor's name and keep its state.
"""
from __future__ import annotations

import zlib

from horovod_squeeze.algorithms.base import Algorithm
from horovod_squeeze.buckets import Bucket
from horovod_squeeze.exchange import Allreduce, BucketResult, StepContext
from horovod_squeeze.plan import check_algorithm as check_is_algorithm

__all__ = ["stream_id", "check_algorithm", "start", "finish"]

_ALLREDUCE = Allreduce()


def stream_id(name: str) -> int:
    """The per-tensor stream number of a parameter name (the ``bucket`` of its nonces)."""
    return zlib.crc32(name.encode())


def check_algorithm(algorithm, compressed_wrapper: str) -> Algorithm:
    """Refuses what cannot go through the hook, naming ``compressed_wrapper`` as the way out."""
    check_is_algorithm(algorithm)
    if not algorithm.worker.linear:
        raise ValueError(
            f"{algorithm.worker!r} cannot go through Horovod's compression= hook: the "
            "allreduce sums what the hook returns, which is only correct for linear "
            f"compressors (Identity, FP16, RandK). Use {compressed_wrapper}, whose sharded "
            "exchange sends any compressor's payloads.")
    return algorithm


def start(codec, algorithm: Algorithm, flat, state: dict, *, step, name: str):
    """Before Horovod's allreduce: the ``allreduce`` exchange of one tensor, on its own stream
    (bucket ``stream_id(name)``), up to its collective.

    Returns ``(values, steps)``: the values the hook hands Horovod, and the exchange to
    :func:`finish` with their average. Rank and size do not enter this exchange.
    """
    bucket = Bucket(stream_id(name), [name], [tuple(flat.shape)], _ALLREDUCE)
    steps = _ALLREDUCE.run(codec, algorithm, bucket, flat, state, StepContext(step, 0, 1))
    return next(steps).tensor, steps


def finish(steps, averaged) -> BucketResult:
    """After Horovod's allreduce, on every rank: decode the average, run the server stage."""
    try:
        steps.send(averaged)
    except StopIteration as done:
        return done.value
    raise RuntimeError("the allreduce exchange asked for a second collective")
