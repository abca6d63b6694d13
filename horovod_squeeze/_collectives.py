"""What both frameworks' collectives share: the process set they run on, its rank and size, and
the ``launch``/``wait`` pair the exchange driver (:mod:`horovod_squeeze.driver`) calls.

Everything crosses ranks through Horovod: nothing in horovod_squeeze opens a connection of its own.
"""
from __future__ import annotations

import itertools

OPS = ("alltoall", "allgather", "allreduce_average")

# One count per process: every rank creates its engines in the same order, so the same names.
_scopes = itertools.count()


class ProcessSetCollectives:
    """Collectives on one Horovod process set; ``hvd`` is ``horovod.torch`` or
    ``horovod.tensorflow``. Subclasses define one method per op of :data:`OPS`."""

    def __init__(self, hvd, process_set=None):
        self._hvd = hvd
        self.process_set = process_set if process_set is not None else hvd.global_process_set

    @property
    def rank(self) -> int:
        return self.process_set.rank()

    @property
    def size(self) -> int:
        return self.process_set.size()

    def new_scope(self) -> str:
        """A name prefix for one engine's collectives, distinct within the process."""
        return f"squeeze{next(_scopes)}"

    def launch(self, op: str, tensor, name: str, splits=None):
        """Starts collective ``op`` (one of :data:`OPS`); returns what :meth:`wait` takes.

        ``splits``: every rank's piece of an ``alltoall`` or ``allgather``, as
        :class:`~horovod_squeeze.exchange.Collective` describes it (``None``: equal pieces).
        """
        if op not in OPS:
            raise ValueError(f"unknown collective {op!r}; expected one of {OPS}")
        if splits is None:
            return getattr(self, op)(tensor, name)
        if op == "allreduce_average":
            raise ValueError(f"collective {name!r}: allreduce_average takes no splits")
        return getattr(self, op)(tensor, name, tuple(splits))

    def wait(self, handle):
        """The result of a launched collective (here the launch returned it already)."""
        return handle
