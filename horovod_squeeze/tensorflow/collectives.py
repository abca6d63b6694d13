"""The Horovod collectives the TensorFlow engine uses, behind one small object.

TensorFlow's Horovod ops are asynchronous inside the runtime already, so these return results, with the static
shape that graph mode loses: every rank knows every piece's size (``splits``, or equal pieces).
"""
from __future__ import annotations

import tensorflow as tf

from horovod_squeeze._collectives import ProcessSetCollectives


class HorovodCollectives(ProcessSetCollectives):
    """Horovod collectives on one process set, named so that every rank matches them."""

    def __init__(self, process_set=None):
        import horovod.tensorflow as hvd

        super().__init__(hvd, process_set)

    def alltoall(self, tensor: tf.Tensor, name: str, splits=None) -> tf.Tensor:
        """Piece j (``splits[j]`` entries, the same list on every rank, or an equal split) goes to
        rank j; returns the rank-ordered received pieces."""
        if splits is None:
            out = self._hvd.alltoall(tensor, name=name, ignore_name_scope=True,
                                     process_set=self.process_set)
            return tf.reshape(out, tensor.shape)
        out, _ = self._hvd.alltoall(tensor, splits=tf.constant(splits, tf.int32), name=name,
                                    ignore_name_scope=True, process_set=self.process_set)
        return tf.reshape(out, [self.size * splits[self.rank]])

    def allgather(self, tensor: tf.Tensor, name: str, splits=None) -> tf.Tensor:
        """Every rank's tensor in rank order: ``splits[r]`` entries from rank r (or equal pieces)."""
        out = self._hvd.allgather(tensor, name=name, ignore_name_scope=True,
                                  process_set=self.process_set)
        total = self.size * int(tensor.shape[0]) if splits is None else sum(splits)
        return tf.reshape(out, [total])

    def allreduce_average(self, tensor: tf.Tensor, name: str) -> tf.Tensor:
        out = self._hvd.allreduce(tensor, name=name, op=self._hvd.Average,
                                  ignore_name_scope=True, process_set=self.process_set)
        return tf.reshape(out, tensor.shape)
