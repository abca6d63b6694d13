"""Error-compensated compression algorithms: each paper's update as a worker and a server stage.

DoubleSqueeze (Tang et al., ICML 2019), for n workers, compressor C, worker residuals e_i and a
server residual e::

    worker i:  v_i = g_i + e_i;        c_i = C(v_i);   e_i = v_i - c_i      # pass 1: send c_i
    server:    v = mean_i(c_i) + e;    c = C(v);       e = v - c            # pass 2: send c
    every worker applies c as the averaged gradient

:func:`compensate` is one such line; :func:`worker_stage` and :func:`server_stage` are the two passes.
``ErrorFeedback`` (EF-SGD / MEM-SGD) keeps the worker residual only, ``NoFeedback`` neither. When an
exchange has no real server (``allgather``, ``allreduce``), every rank runs the server stage on the
same average, so the server residual is replicated and DoubleSqueeze's math is unchanged.

The stages are written against a codec (``horovod_squeeze.torch.codecs``,
``horovod_squeeze.tensorflow.codecs`` or the NumPy reference), so one definition serves every
framework and the reference simulation (:mod:`horovod_squeeze.reference.simulate`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

from horovod_squeeze.compressors import Compressor
from horovod_squeeze.streams import MASK32, hash32

__all__ = ["Algorithm", "DoubleSqueeze", "ErrorFeedback", "NoFeedback", "Compensated",
           "compensate", "worker_stage", "server_stage", "stage_nonce", "WORKER", "SERVER"]

Tensor = Any

WORKER, SERVER = 0, 1


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """An error-compensation scheme around one compressor (a hashable spec, like compressors)."""

    compressor: Compressor

    worker_feedback: ClassVar[bool]
    server_feedback: ClassVar[bool]

    def __post_init__(self):
        if not isinstance(self.compressor, Compressor):
            raise TypeError(f"{type(self).__name__}: compressor must be a compressor spec such as "
                            f"horovod_squeeze.ScaledSign(), got {self.compressor!r}")


@dataclasses.dataclass(frozen=True)
class DoubleSqueeze(Algorithm):
    """Worker and server residuals: both passes compressed, neither loses what compression drops."""

    worker_feedback: ClassVar[bool] = True
    server_feedback: ClassVar[bool] = True


@dataclasses.dataclass(frozen=True)
class ErrorFeedback(Algorithm):
    """Worker residual only (EF-SGD, MEM-SGD); the server's recompression error is dropped."""

    worker_feedback: ClassVar[bool] = True
    server_feedback: ClassVar[bool] = False


@dataclasses.dataclass(frozen=True)
class NoFeedback(Algorithm):
    """Plain compressed SGD: no residuals, the compression error is lost every step."""

    worker_feedback: ClassVar[bool] = False
    server_feedback: ClassVar[bool] = False


class Compensated(NamedTuple):
    """Result of one error-compensated compression."""

    payload: Tensor  # the uint8 bytes that travel
    decoded: Tensor  # what the receiver reconstructs: C(v)
    residual: Tensor | None  # v - C(v), or None without feedback


def compensate(codec, spec: Compressor, x: Tensor, residual: Tensor | None, *, nonce: int,
               name: str) -> Compensated:
    """``v = x + residual; c = C(v); residual = v - c`` (no residual: plain ``c = C(x)``)."""
    corrected = x if residual is None else x + residual
    payload = codec.compress(spec, corrected, nonce=nonce, name=name)
    decoded = codec.decompress(spec, payload, _numel(x), name=name)
    return Compensated(payload, decoded, None if residual is None else corrected - decoded)


def worker_stage(codec, algorithm: Algorithm, gradient: Tensor, residual: Tensor | None, *,
                 nonce: int, name: str) -> Compensated:
    """Pass 1 on worker i: ``v_i = g_i + e_i; c_i = C(v_i); e_i = v_i - c_i``."""
    return compensate(codec, algorithm.compressor, gradient,
                      residual if algorithm.worker_feedback else None, nonce=nonce, name=name)


def server_stage(codec, algorithm: Algorithm, decoded_pieces: list[Tensor],
                 residual: Tensor | None, *, nonce: int, name: str) -> Compensated:
    """Pass 2 on the (shard) server: ``v = mean_i(c_i) + e; c = C(v); e = v - c``."""
    total = decoded_pieces[0]
    for piece in decoded_pieces[1:]:  # rank order, so every framework sums in the same order
        total = total + piece
    mean = total / len(decoded_pieces)
    return compensate(codec, algorithm.compressor, mean,
                      residual if algorithm.server_feedback else None, nonce=nonce, name=name)


def stage_nonce(step: int, bucket: int, shard: int, stage: int, rank: int = 0) -> int:
    """Random-stream nonce of one compression: distinct per step, bucket, shard, stage and rank.

    Ranks pass ``rank=0`` where they must draw the same numbers (RandK over an allreduce).
    """
    nonce = 0
    for part in (step, bucket, shard, stage, rank):
        nonce = hash32(nonce ^ (part & MASK32))
    return nonce


def _numel(x) -> int:
    shape = x.shape
    count = 1
    for dim in shape:
        count *= int(dim)
    return count
