"""Plain compressed averaging, no error feedback: the compression error is lost every step.

::

    worker i:  c_i = C(g_i)                                               # pass 1: send c_i
    server:    c = mean_i(c_i)                                            # exact
    every worker applies c as the averaged gradient

As with :class:`~horovod_squeeze.ErrorFeedback`, the average returns exactly unless a server
compressor is named (``NoFeedback(C, server=C2)``: ``c = C2(mean_i(c_i))``, also without feedback).
The baseline the error-compensated algorithms are measured against.

Example::

    import horovod_squeeze as hs
    hs.NoFeedback(hs.QSGD(4))
"""
from __future__ import annotations

import dataclasses

from horovod_squeeze.algorithms.base import Algorithm, ServerOut, WorkerOut, compensate, mean

__all__ = ["NoFeedback"]


@dataclasses.dataclass(frozen=True, repr=False)
class NoFeedback(Algorithm):
    """No residuals: what compression drops is lost."""

    def worker_stage(self, codec, gradient, state, ctx):
        return WorkerOut(compensate(codec, self.worker, gradient, None, ctx).payload, {})

    def server_stage(self, codec, pieces, state, ctx):
        out = compensate(codec, self.server, mean(pieces), None, ctx)
        return ServerOut(out.payload, out.decoded, {})
