"""What both frameworks' collectives share: the process set they run on, and its rank and size.

Everything crosses ranks through Horovod: nothing in horovod_squeeze opens a connection of its own.
"""
from __future__ import annotations


class ProcessSetCollectives:
    """Collectives on one Horovod process set; ``hvd`` is ``horovod.torch`` or
    ``horovod.tensorflow``."""

    def __init__(self, hvd, process_set=None):
        self._hvd = hvd
        self.process_set = process_set if process_set is not None else hvd.global_process_set

    @property
    def rank(self) -> int:
        return self.process_set.rank()

    @property
    def size(self) -> int:
        return self.process_set.size()
