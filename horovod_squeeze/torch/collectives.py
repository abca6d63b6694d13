"""The Horovod collectives the exchanges use, behind one small object so they can be replaced.

Everything crosses ranks through Horovod: nothing here opens a connection of its own.
"""
from __future__ import annotations

import torch


class HorovodCollectives:
    """Asynchronous Horovod collectives on one process set, and a ``wait`` that returns results."""

    def __init__(self, process_set=None):
        import horovod.torch as hvd

        self._hvd = hvd
        self.process_set = process_set if process_set is not None else hvd.global_process_set

    @property
    def rank(self) -> int:
        return self.process_set.rank()

    @property
    def size(self) -> int:
        return self.process_set.size()

    def alltoall(self, tensor: torch.Tensor, name: str):
        """Equal split along dim 0: piece j goes to rank j; returns rank-ordered received pieces."""
        return self._hvd.alltoall_async(tensor, name=name, process_set=self.process_set)

    def allgather(self, tensor: torch.Tensor, name: str):
        return self._hvd.allgather_async(tensor, name=name, process_set=self.process_set)

    def allreduce_average(self, tensor: torch.Tensor, name: str):
        return self._hvd.allreduce_async(tensor, name=name, op=self._hvd.Average,
                                         process_set=self.process_set)

    def wait(self, handle) -> torch.Tensor:
        output = self._hvd.synchronize(handle)
        # alltoall returns (received tensor, received splits)
        return output[0] if isinstance(output, tuple) else output
