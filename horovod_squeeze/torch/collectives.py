"""The Horovod collectives the PyTorch engine uses, behind one small object so they can be replaced."""
from __future__ import annotations

import torch

from horovod_squeeze._collectives import ProcessSetCollectives


class HorovodCollectives(ProcessSetCollectives):
    """Asynchronous Horovod collectives on one process set, and a ``wait`` that returns results."""

    def __init__(self, process_set=None):
        import horovod.torch as hvd

        super().__init__(hvd, process_set)

    def alltoall(self, tensor: torch.Tensor, name: str, splits=None):
        """Piece j (``splits[j]`` entries, or an equal split) goes to rank j; returns the
        rank-ordered received pieces."""
        if splits is not None:
            splits = torch.tensor(splits, dtype=torch.int32)  # Horovod reads splits on the CPU
        return self._hvd.alltoall_async(tensor, splits=splits, name=name,
                                        process_set=self.process_set)

    def allgather(self, tensor: torch.Tensor, name: str, splits=None):
        """Every rank's tensor, concatenated in rank order (Horovod gathers pieces of different
        lengths by itself: ``splits`` only describes them)."""
        return self._hvd.allgather_async(tensor, name=name, process_set=self.process_set)

    def allreduce_average(self, tensor: torch.Tensor, name: str):
        return self._hvd.allreduce_async(tensor, name=name, op=self._hvd.Average,
                                         process_set=self.process_set)

    def wait(self, handle) -> torch.Tensor:
        output = self._hvd.synchronize(handle)
        # alltoall returns (received tensor, received splits)
        return output[0] if isinstance(output, tuple) else output
