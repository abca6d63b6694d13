"""The exchange driver: runs an exchange's generator over injected collectives.

An exchange (:meth:`horovod_squeeze.exchange.Exchange.run`) yields :class:`Collective` requests and
receives their results. Collectives are any object with ``rank``, ``size``,
``launch(op, tensor, name, splits=None) -> handle`` and ``wait(handle) -> tensor`` (``splits`` as
:class:`~horovod_squeeze.exchange.Collective` describes it): Horovod's (asynchronous
handles in PyTorch; tensors in TensorFlow, whose runtime overlaps them itself) or the in-process fake
of :mod:`horovod_squeeze.fake`. PyTorch launches each bucket's first collective during backward and
resumes all buckets in turn at ``synchronize()``, so one bucket's pass 2 overlaps the others';
TensorFlow runs each bucket to its end (:func:`run_to_end`) while tracing.
"""
from __future__ import annotations

import time
from typing import Any, Generator

from horovod_squeeze.exchange import Collective

__all__ = ["InFlight", "run_to_end", "single"]


class InFlight:
    """One exchange between its collectives: started at construction, ``resume()`` until ``done``.

    Times the work between collectives on this rank: ``compute_seconds`` up to the last collective,
    ``finish_seconds`` after it (decoding), ``wait_seconds`` in ``wait``.
    """

    def __init__(self, collectives, steps: Generator[Collective, Any, Any], prefix: str):
        self._comm, self._steps, self._prefix = collectives, steps, prefix
        self._handle = None
        self.done = False
        self.result = None
        self.compute_seconds = self.finish_seconds = self.wait_seconds = 0.0
        self._advance(None)

    def _advance(self, value) -> None:
        start = time.perf_counter()
        try:
            request = self._steps.send(value)
        except StopIteration as finished:
            self.finish_seconds += time.perf_counter() - start
            self.done, self.result, self._handle = True, finished.value, None
            return
        self.compute_seconds += time.perf_counter() - start
        self._handle = self._comm.launch(request.op, request.tensor,
                                         f"{self._prefix}.{request.name}", splits=request.splits)

    def resume(self) -> None:
        """Waits for the collective in flight and runs the exchange up to its next one (or end)."""
        if self.done:
            raise RuntimeError("the exchange has finished")
        start = time.perf_counter()
        value = self._comm.wait(self._handle)
        self.wait_seconds += time.perf_counter() - start
        self._advance(value)


def run_to_end(collectives, steps: Generator[Collective, Any, Any], prefix: str):
    """Runs an exchange to its end, one collective at a time; returns its result."""
    flight = InFlight(collectives, steps, prefix)
    while not flight.done:
        flight.resume()
    return flight.result


def single(collective: Collective):
    """One collective as an exchange generator (the engines' small control messages)."""
    return (yield collective)
