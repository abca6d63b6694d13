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
from horovod_squeeze.stock import (
    check_algorithm, stock_server_stage, stock_worker_stage, stream_id,
)
from horovod_squeeze.tensorflow import codecs

__all__ = ["StockCompression", "stream_id"]


class StockCompression:
    """A Horovod ``Compressor`` (``compress``/``decompress``) with per-variable residuals.

    Args:
      algorithm: ``ErrorFeedback``, ``DoubleSqueeze`` (the server stage runs replicated on every
        rank after the allreduce) or ``NoFeedback``, around a linear compressor.
      variables: the variables whose gradients Horovod will average, in the order it sees them
        (``model.trainable_variables``).
    """

    def __init__(self, algorithm: Algorithm, variables):
        check_algorithm(algorithm, "horovod_squeeze.tensorflow.DistributedGradientTape")
        self.algorithm = algorithm
        self.variables = list(variables)
        if not self.variables:
            raise ValueError("StockCompression needs the variables whose gradients it compresses")
        with tf.init_scope():
            numels = [v.shape.num_elements() for v in self.variables]
            self.worker_residuals = [tf.Variable(tf.zeros([n]), trainable=False) for n in numels]
            self.server_residuals = [tf.Variable(tf.zeros([n]), trainable=False) for n in numels]
            self.steps = [tf.Variable(0, dtype=tf.int64, trainable=False) for _ in numels]
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
        name = self.variables[i].name
        flat = tf.reshape(tf.cast(tensor, tf.float32), [-1])
        step = tf.identity(self.steps[i])
        out = stock_worker_stage(codecs, self.algorithm, flat, self.worker_residuals[i],
                                 step=step, name=name)
        if out.residual is not None:
            self.worker_residuals[i].assign(out.residual)
        header, values = codecs.split_linear(self.algorithm.compressor, out.payload,
                                             flat.shape[0])
        return values, (i, step, header, tensor.shape, tensor.dtype)

    def decompress(self, values, ctx):
        i, step, header, shape, dtype = ctx
        name = self.variables[i].name
        payload = codecs.join_linear(header, tf.reshape(values, [-1]))
        mean = codecs.decompress(self.algorithm.compressor, payload, shape.num_elements(),
                                 name=name)
        out = stock_server_stage(codecs, self.algorithm, mean, self.server_residuals[i],
                                 step=step, name=name)
        if out.residual is not None:
            self.server_residuals[i].assign(out.residual)
        self.steps[i].assign_add(1)
        return tf.cast(tf.reshape(out.decoded, shape), dtype)
