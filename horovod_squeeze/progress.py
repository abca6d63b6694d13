"""Progress that reads well both in a terminal and in a ``horovodrun`` log.

``horovodrun`` pipes every rank's output and prefixes each line (``[0]<stderr>:``), so a tqdm bar,
which redraws itself with carriage returns, becomes hundreds of fragments in one log line. This
shows tqdm's bar only when the stream is a terminal, and otherwise writes one plain line per item
(at most one per ``min_interval`` seconds, but always the first and the last), on rank 0 only.

Example::

    from horovod_squeeze.progress import progress

    bar = progress(range(epochs), desc="epochs", enabled=hvd.rank() == 0)
    for epoch in bar:
        ...
        bar.set_postfix(loss=f"{loss:.4f}")     # epochs 3/30 loss=0.1234 (12.5 s)
"""
from __future__ import annotations

import sys
import time

__all__ = ["progress", "keras_verbose"]


def progress(iterable, *, desc: str, enabled: bool = True, total: int | None = None,
             stream=None, min_interval: float = 0.0):
    """``iterable`` with progress: tqdm's bar on a terminal, else :class:`LineProgress`."""
    stream = sys.stderr if stream is None else stream
    if enabled and _is_terminal(stream):
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, total=total, file=stream)
    return LineProgress(iterable, desc=desc, enabled=enabled, total=total, stream=stream,
                        min_interval=min_interval)


def keras_verbose(enabled: bool, stream=None) -> int:
    """``verbose`` for Keras ``fit``: its bar on a terminal, one line per epoch otherwise, nothing
    where not ``enabled`` (ranks other than 0)."""
    if not enabled:
        return 0
    return 1 if _is_terminal(sys.stdout if stream is None else stream) else 2


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class LineProgress:
    """One line per finished item: ``desc done/total key=value ... (elapsed s)``; tqdm's
    ``set_postfix`` and ``write`` work as they do there."""

    def __init__(self, iterable, *, desc, enabled=True, total=None, stream=None,
                 min_interval=0.0):
        self.iterable, self.desc, self.enabled = iterable, desc, enabled
        self.total = total if total is not None else _length(iterable)
        self.stream = sys.stderr if stream is None else stream
        self.min_interval = min_interval
        self.postfix: dict[str, str] = {}

    def __iter__(self):
        started = last = time.perf_counter()
        done = 0
        for item in self.iterable:
            yield item
            done += 1
            now = time.perf_counter()
            if done == 1 or done == self.total or now - last >= self.min_interval:
                self._line(done, now - started)
                last = now

    def set_postfix(self, refresh: bool = True, **values) -> None:
        del refresh  # lines are written when an item finishes
        self.postfix = {key: str(value) for key, value in values.items()}

    def write(self, message: str) -> None:
        if self.enabled:
            print(message, file=self.stream, flush=True)

    def _line(self, done: int, elapsed: float) -> None:
        count = f"{done}/{self.total}" if self.total is not None else str(done)
        fields = "".join(f" {key}={value}" for key, value in self.postfix.items())
        self.write(f"{self.desc} {count}{fields} ({elapsed:.1f} s)")


def _length(iterable) -> int | None:
    try:
        return len(iterable)
    except TypeError:
        return None
