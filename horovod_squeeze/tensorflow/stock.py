"""Error feedback through Horovod's own ``compression=`` hook, for linear compressors.

Horovod's hook receives a gradient without its variable, keeps no state, and its allreduce
*averages* what the hook returns, so only compressors whose compact values can be averaged are
correct through it (``Identity``, ``FP16``, and ``RandK`` with a random stream shared by all
ranks). :class:`StockCompression` adds the residuals, one set per variable::

    compression = hstf.StockCompression(hs.ErrorFeedback(hs.FP16()), model.trainable_variables)
    tape = hvd.DistributedGradientTape(tape, compression=compression)

TensorFlow gives the hook no way to tell which variable a gradient belongs to, so it relies on
Horovod calling it once per gradient in variable order (which its tape and Keras optimizer do); a
variable without a gradient is skipped by matching shapes. Everything else (sign, top-k,
quantizers) needs :func:`horovod_squeeze.tensorflow.DistributedGradientTape`.
"""
from __future__ import annotations

import tensorflow as tf

from horovod_squeeze.algorithms import Algorithm
from horovod_squeeze import stock
from horovod_squeeze.stock import check_algorithm, stream_id
from horovod_squeeze.tensorflow import codecs

__all__ = ["StockCompression", "stream_id"]


class StockCompression:
    """A Horovod ``Compressor`` (``compress``/``decompress``) with per-variable algorithm state.

    Args:
      algorithm: ``ErrorFeedback``, ``DoubleSqueeze`` (the server stage runs replicated on every
        rank after the allreduce) or ``NoFeedback``, around a linear worker compressor.
      variables: the variables whose gradients Horovod will average, in the order it sees them
        (``model.trainable_variables``).

    ``state[i]`` holds variable i's named state (``algorithm.state()``) as ``tf.Variable``\\ s.
    """

    def __init__(self, algorithm: Algorithm, variables):
        self.algorithm = check_algorithm(algorithm,
                                         "horovod_squeeze.tensorflow.DistributedGradientTape")
        self.variables = list(variables)
        if not self.variables:
            raise ValueError("StockCompression needs the variables whose gradients it compresses")
        with tf.init_scope():
            self.state = [{spec.name: tf.Variable(tf.zeros([v.shape.num_elements()]),
                                                  trainable=False)
                           for spec in algorithm.state()} for v in self.variables]
            self.steps = [tf.Variable(0, dtype=tf.int64, trainable=False) for _ in self.variables]
        self._next = 0

    def _index(self, tensor) -> int:
        """The next variable, in order, whose shape is the gradient's."""
        for offset in range(len(self.variables)):
            i = (self._next + offset) % len(self.variables)
            if self.variables[i].shape == tensor.shape:
                self._next = i + 1
                return i
        raise ValueError(f"StockCompression got a gradient of shape {tensor.shape} that matches "
                         "none of its variables; pass the variables Horovod averages")

    def compress(self, tensor):
        i = self._index(tensor)
        flat = tf.reshape(tf.cast(tensor, tf.float32), [-1])
        values, steps = stock.start(codecs.on(), self.algorithm, flat, dict(self.state[i]),
                                    step=tf.identity(self.steps[i]), name=self.variables[i].name)
        return values, (i, steps, tensor.shape, tensor.dtype)

    def decompress(self, values, ctx):
        i, steps, shape, dtype = ctx
        result = stock.finish(steps, tf.reshape(values, [-1]))
        for key, value in result.state.items():
            self.state[i][key].assign(value)
        self.steps[i].assign_add(1)
        return tf.cast(tf.reshape(result.output, shape), dtype)
