"""Horovod's own ``compression=`` hook: which algorithms can go through it, and their two stages.

The hook receives one tensor at a time, keeps no state, and Horovod's allreduce *sums* (averages)
what it returns, so only linear compressors are correct through it. Each tensor gets its own
random stream (``stream_id`` of its name) so that RandK picks the same entries on every rank. The
framework classes (``horovod_squeeze.torch.StockCompression``,
``horovod_squeeze.tensorflow.StockCompression``) find the tensor's name and keep the residuals.
"""
from __future__ import annotations

import zlib

from horovod_squeeze.algorithms import (
    SERVER, WORKER, Algorithm, Compensated, server_stage, stage_nonce, worker_stage,
)

__all__ = ["stream_id", "check_algorithm", "stock_worker_stage", "stock_server_stage"]


def stream_id(name: str) -> int:
    """The per-tensor stream number of a parameter name (the ``bucket`` of its nonces)."""
    return zlib.crc32(name.encode())


def check_algorithm(algorithm, compressed_wrapper: str) -> None:
    """Refuses what cannot go through the hook, naming ``compressed_wrapper`` as the way out."""
    if not isinstance(algorithm, Algorithm):
        raise TypeError(f"algorithm must be e.g. horovod_squeeze.ErrorFeedback(hs.FP16()), "
                        f"got {algorithm!r}")
    if not algorithm.compressor.linear:
        raise ValueError(
            f"{algorithm.compressor!r} cannot go through Horovod's compression= hook: the "
            "allreduce sums what the hook returns, which is only correct for linear "
            f"compressors (Identity, FP16, RandK). Use {compressed_wrapper}, whose sharded "
            "exchange sends any compressor's payloads.")


def stock_worker_stage(codec, algorithm: Algorithm, flat, residual, *, step,
                       name: str) -> Compensated:
    """Before the allreduce: ``v = g + e; c = C(v); e = v - c``, on the tensor's shared stream."""
    return worker_stage(codec, algorithm, flat, residual,
                        nonce=stage_nonce(step, stream_id(name), 0, WORKER), name=name)


def stock_server_stage(codec, algorithm: Algorithm, mean, residual, *, step,
                       name: str) -> Compensated:
    """After the allreduce, on every rank: the server stage on the averaged tensor."""
    return server_stage(codec, algorithm, [mean], residual,
                        nonce=stage_nonce(step, stream_id(name), 0, SERVER), name=name)
