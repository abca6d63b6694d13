"""DoubleSqueeze (Tang, Lian, Yu, Zhang, Liu, ICML 2019): error compensation on both passes.

For n workers, worker residuals ``e_i``, a server residual ``e``, compressors ``C_w`` (pass 1) and
``C_s`` (pass 2, the same as ``C_w`` unless named)::

    worker i:  v_i = g_i + e_i;          c_i = C_w(v_i);   e_i = v_i - c_i    # pass 1: send c_i
    server:    v = mean_i(c_i) + e;      c = C_s(v);       e = v - c          # pass 2: send c
    every worker applies c as the averaged gradient

Symbols to arguments: ``g_i`` is ``gradient``, ``c_i`` the decoded ``pieces``, ``e_i`` and ``e``
the state ``worker_residual`` and ``server_residual``. With a sharded server each owner runs the
server line on its shard; without one, every rank runs it on the same average.

Example::

    import horovod_squeeze as hs
    hs.DoubleSqueeze(hs.ScaledSign())                                # 1 bit each way
    hs.DoubleSqueeze(worker=hs.TopK(0.01), server=hs.ScaledSign())   # a compressor per pass
"""
from __future__ import annotations

import dataclasses

from horovod_squeeze.algorithms.base import (
    SERVER, WORKER, Algorithm, ServerOut, StateSpec, WorkerOut, compensate, mean,
)

__all__ = ["DoubleSqueeze"]


@dataclasses.dataclass(frozen=True, repr=False)
class DoubleSqueeze(Algorithm):
    """Worker and server residuals: both passes compressed, neither loses what compression drops."""

    def default_server(self):
        return self.worker

    def state(self):
        return (StateSpec("worker_residual", WORKER, doc="e_i: what pass 1 has not sent yet"),
                StateSpec("server_residual", SERVER, doc="e: what pass 2 has not sent yet"))

    def worker_stage(self, codec, gradient, state, ctx):
        out = compensate(codec, self.worker, gradient, state["worker_residual"], ctx)
        return WorkerOut(out.payload, {"worker_residual": out.residual})

    def server_stage(self, codec, pieces, state, ctx):
        out = compensate(codec, self.server, mean(pieces), state["server_residual"], ctx)
        return ServerOut(out.payload, out.decoded, {"server_residual": out.residual})

    def check(self, largest_numel, *, stacklevel=2):
        for compressor in {self.worker, self.server}:
            self._warn_unless_contractive(compressor, largest_numel, stacklevel + 1)
