"""Error feedback on the server only: workers compress without memory, the server compensates.

For n workers, a server residual ``e`` and compressors ``C_w`` (pass 1) and ``C_s`` (pass 2, the
same as ``C_w`` unless named)::

    worker i:  c_i = C_w(g_i)                                             # pass 1: send c_i
    server:    v = mean_i(c_i) + e;      c = C_s(v);       e = v - c      # pass 2: send c
    every worker applies c as the averaged gradient

With an unbiased ``C_w`` (``QSGD``, ``Ternary``, ``RandK(unbiased=True)``) the uplink adds variance
but no bias, and the downlink's compression error is returned later instead of lost. No per-worker
state: the only residual lives with the server (one shard per rank in the sharded exchange).

Example::

    import horovod_squeeze as hs
    hs.ServerFeedback(hs.QSGD(4), server=hs.ScaledSign())
"""
from __future__ import annotations

import dataclasses

from horovod_squeeze.algorithms.base import (
    SERVER, Algorithm, ServerOut, StateSpec, WorkerOut, compensate, mean,
)

__all__ = ["ServerFeedback"]


@dataclasses.dataclass(frozen=True, repr=False)
class ServerFeedback(Algorithm):
    """A server residual only: pass 2 compensated, pass 1 sent as compressed."""

    def default_server(self):
        return self.worker

    def state(self):
        return (StateSpec("server_residual", SERVER, doc="e: what pass 2 has not sent yet"),)

    def worker_stage(self, codec, gradient, state, ctx):
        return WorkerOut(compensate(codec, self.worker, gradient, None, ctx).payload, {})

    def server_stage(self, codec, pieces, state, ctx):
        out = compensate(codec, self.server, mean(pieces), state["server_residual"], ctx)
        return ServerOut(out.payload, out.decoded, {"server_residual": out.residual})

    def check(self, largest_numel, *, stacklevel=2):
        self._warn_unless_contractive(self.server, largest_numel, stacklevel + 1)
