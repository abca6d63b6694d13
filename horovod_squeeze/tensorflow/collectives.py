"""The Horovod collectives the TensorFlow engine uses, behind one small object.

TensorFlow's Horovod ops are asynchronous inside the runtime already, so these return results, with the static
shape that graph mode loses (``numel`` entries).
"""
from __future__ import annotations

import tensorflow as tf

from horovod_squeeze._collectives import ProcessSetCollectives


class HorovodCollectives(ProcessSetCollectives):
    """Horovod collectives on one process set, named so that every rank matches them."""

    def __init__(self, process_set=None):
        import horovod.tensorflow as hvd

        super().__init__(hvd, process_set)

    def alltoall(self, tensor: tf.Tensor, name: str) -> tf.Tensor:
        """Equal split along dim 0: piece j goes to rank j; returns rank-ordered received pieces."""
        out = self._hvd.alltoall(tensor, name=name, ignore_name_scope=True,
                                 process_set=self.process_set)
        return tf.reshape(out, tensor.shape)

    def allgather(self, tensor: tf.Tensor, name: str) -> tf.Tensor:
        out = self._hvd.allgather(tensor, name=name, ignore_name_scope=True,
                                  process_set=self.process_set)
        return tf.reshape(out, [self.size * int(tensor.shape[0])])

    def allreduce_average(self, tensor: tf.Tensor, name: str) -> tf.Tensor:
        out = self._hvd.allreduce(tensor, name=name, op=self._hvd.Average,
                                  ignore_name_scope=True, process_set=self.process_set)
        return tf.reshape(out, tensor.shape)
