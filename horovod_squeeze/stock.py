"""Horovod's own ``compression=`` hook: which algorithms can go through it, and their two stages.

The hook receives one tensor at a time, keeps no state, and Horovod's allreduce *sums* (averages)
what it returns, so only linear worker compressors are correct through it. Each tensor gets its own
random stream (``stream_id`` of its name) so that RandK picks the same entries on every rank; the
server stage runs on every rank after the allreduce, on the same average, so nothing travels back
and any server compressor works. The framework classes (``horovod_squeeze.torch.StockCompression``,
``horovod_squeeze.tensorflow.StockCompression``) find the tensor's name and keep its state.
"""
from __future__ import annotations

import math
import zlib

from horovod_squeeze.algorithms.base import Algorithm, StageContext
from horovod_squeeze.exchange import PASS1, PASS2, stage_nonce
from horovod_squeeze.plan import check_algorithm as check_is_algorithm

__all__ = ["stream_id", "check_algorithm", "stock_compress", "stock_decompress"]


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


def stock_compress(codec, algorithm: Algorithm, flat, state: dict, *, step, name: str):
    """Before the allreduce: the worker stage on the tensor's shared stream.

    Returns ``(header, values, new_state)``: the values Horovod averages, and the payload's header
    (RandK's stream key), which never travels because every rank computes the same one.
    """
    sent = algorithm.worker_stage(
        codec, flat, state, StageContext(stage_nonce(step, stream_id(name), 0, PASS1), name, step))
    header, values = codec.split_linear(algorithm.worker, sent.payload, _numel(flat))
    return header, values, sent.state


def stock_decompress(codec, algorithm: Algorithm, header, values, state: dict, *, step,
                     name: str, numel: int):
    """After the allreduce, on every rank: decode the average and run the server stage on it.

    Returns ``(decoded, new_state)``.
    """
    payload = codec.join_linear(algorithm.worker, header, values, numel)
    average = codec.decompress(algorithm.worker, payload, numel, name=name)
    served = algorithm.server_stage(
        codec, [average], state, StageContext(stage_nonce(step, stream_id(name), 0, PASS2), name,
                                              step))
    return served.decoded, served.state


def _numel(x) -> int:
    return math.prod(int(d) for d in x.shape)
