"""Error feedback on the workers (EF-SGD, Karimireddy et al. 2019; MEM-SGD, Stich et al. 2018).

For n workers, worker residuals ``e_i`` and a compressor ``C``::

    worker i:  v_i = g_i + e_i;   c_i = C(v_i);   e_i = v_i - c_i         # pass 1: send c_i
    server:    c = mean_i(c_i)                                            # exact
    every worker applies c as the averaged gradient

The average returns exactly: the sharded exchange sends it back in fp32 (pass 2 carries
``(n - 1) / n`` of the bucket in float32 per rank), the allgather and allreduce exchanges have no
second pass at all. ``ErrorFeedback(C, server=C2)`` compresses the average with ``C2`` without
feedback: a lossy second pass, only when asked for.

Example::

    import horovod_squeeze as hs
    hs.ErrorFeedback(hs.TopK(0.01))
"""
from __future__ import annotations

import dataclasses

from horovod_squeeze.algorithms.base import (
    WORKER, Algorithm, ServerOut, StateSpec, WorkerOut, compensate, mean,
)

__all__ = ["ErrorFeedback"]


@dataclasses.dataclass(frozen=True, repr=False)
class ErrorFeedback(Algorithm):
    """A worker residual only; the average comes back exactly unless a server compressor is named."""

    def state(self):
        return (StateSpec("worker_residual", WORKER, doc="e_i: what pass 1 has not sent yet"),)

    def worker_stage(self, codec, gradient, state, ctx):
        out = compensate(codec, self.worker, gradient, state["worker_residual"], ctx)
        return WorkerOut(out.payload, {"worker_residual": out.residual})

    def server_stage(self, codec, pieces, state, ctx):
        out = compensate(codec, self.server, mean(pieces), None, ctx)
        return ServerOut(out.payload, out.decoded, {})

    def check(self, largest_numel, *, stacklevel=2):
        self._warn_unless_contractive(self.worker, largest_numel, stacklevel + 1)
