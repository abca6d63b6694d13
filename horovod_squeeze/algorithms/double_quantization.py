"""Synchronous double quantization: the synchronous form of AsyLPG (Yu, Wu, Huang, NeurIPS 2019).

Gradients go up through the b-bit unbiased quantizer ``Q(b)`` (stochastic rounding onto a grid of
``delta = ||v||_inf / (2^(b-1) - 1)``, :meth:`horovod_squeeze.QSGD.bits`); the server keeps the
exact model ``x`` and sends the workers' model ``x_hat`` its change through ``Q(b_x)``, quantized
relative to ``x_hat`` (which every rank holds), as AsyLPG quantizes it relative to its snapshot::

    worker i:  send Q(b)(g_i)                                                  # pass 1
    server:    x = x - gamma * mean_i Q(b)(g_i)
               q = x - x_hat;   c = Q(b_x)(q)                                  # pass 2: send c
    every worker:  x_hat = x_hat + c

With ``e = x - x_hat`` (the state ``model_error``) the server's lines are
``q = -gamma * mean_i Q(b)(g_i) + e;  c = Q(b_x)(q);  e = q - c``: ``x_hat`` is always the exact
model plus one fresh, unbiased rounding error of at most ``delta_x`` per entry, which never
accumulates. ``gamma`` is the wrapped optimizer's learning rate (plain SGD). This is
:class:`~horovod_squeeze.DORE` with ``alpha = 0`` (no shifts) and ``beta = eta = 1``.

Example::

    import horovod_squeeze as hs
    hs.DoubleQuantization(b=4, b_x=8)   # 4-bit gradients up, 8-bit model changes down
"""
from __future__ import annotations

import dataclasses

from horovod_squeeze.algorithms.base import (
    MODEL, MODEL_INCREMENT, SERVER, Algorithm, ServerOut, StateSpec, WorkerOut, compensate, mean,
)
from horovod_squeeze.compressors import QSGD

__all__ = ["DoubleQuantization"]


@dataclasses.dataclass(frozen=True, repr=False)
class DoubleQuantization(Algorithm):
    """b-bit gradients up, b_x-bit model changes down, the exact model kept by the server.

    Args (keywords, named as in the paper):
      b: bits per gradient entry (2..9, sign included).
      b_x: bits per model entry (2..9).
      seed: the quantizers' random stream.
    """

    b: int = 8
    b_x: int = 8
    seed: int = 0

    output = MODEL_INCREMENT

    def __post_init__(self):
        if self.worker is not None or self.server is not None:
            raise TypeError("DoubleQuantization quantizes with b and b_x bits: pass them by "
                            "keyword, e.g. DoubleQuantization(b=4, b_x=8); for other compressors "
                            "use DORE(worker, server=..., alpha=...)")
        object.__setattr__(self, "worker", QSGD.bits(self.b, self.seed))
        object.__setattr__(self, "server", QSGD.bits(self.b_x, self.seed))

    def __repr__(self):
        return f"DoubleQuantization(b={self.b}, b_x={self.b_x}, seed={self.seed})"

    def state(self):
        return (StateSpec("model_error", SERVER, units=MODEL,
                          doc="e = x - x_hat: the exact model minus the workers'"),)

    def worker_stage(self, codec, gradient, state, ctx):
        return WorkerOut(compensate(codec, self.worker, gradient, None, ctx).payload, {})

    def server_stage(self, codec, pieces, state, ctx):
        model_step = mean(pieces) * (-ctx.learning_rate)
        out = compensate(codec, self.server, model_step, state["model_error"], ctx)
        return ServerOut(out.payload, out.decoded, {"model_error": out.residual})
