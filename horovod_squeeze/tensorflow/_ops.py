"""TensorFlow implementation of the codecs' :class:`~horovod_squeeze._codecs.ArrayOps`.

Works eagerly and inside ``tf.function``: sizes come from static shapes, checks on values become
run-time assertions in graphs, and branches on values become ``tf.cond``.
"""
from __future__ import annotations

import tensorflow as tf

from horovod_squeeze._codecs import ArrayOps

_DTYPES = {"float32": tf.float32, "float64": tf.float64, "float16": tf.float16,
           "int64": tf.int64, "int32": tf.int32, "uint8": tf.uint8, "bool": tf.bool}
_INT_BYTES = {"int32": 4, "uint32": 4, "uint16": 2, "uint8": 1}
_FLOAT_WIRE = {"float32": tf.float32, "float16": tf.float16}
_BIT_WEIGHTS = [1, 2, 4, 8, 16, 32, 64, 128]


class TensorFlowOps(ArrayOps):
    def flat_float32(self, x, name):
        x = tf.convert_to_tensor(x)
        if not x.dtype.is_floating:
            raise TypeError(f"{name}: compressors take floating-point tensors, got dtype {x.dtype.name}")
        if not x.shape.is_fully_defined():
            raise ValueError(f"{name}: compressors need a static shape, got {x.shape}")
        return tf.cast(tf.reshape(x, [-1]), tf.float32)

    def cast(self, x, kind):
        return tf.cast(x, _DTYPES[kind])

    def constant(self, values, kind):
        if tf.is_tensor(values) or (isinstance(values, list) and any(map(tf.is_tensor, values))):
            return tf.cast(tf.stack(values) if isinstance(values, list) else values, _DTYPES[kind])
        return tf.constant(values, dtype=_DTYPES[kind])

    def arange(self, n):
        return tf.range(n, dtype=tf.int64)

    def abs(self, x):
        return tf.abs(x)

    def floor(self, x):
        return tf.floor(x)

    def sqrt(self, x):
        return tf.sqrt(x)

    def minimum(self, x, y):
        return tf.minimum(x, y)

    def clip(self, x, bound):
        return tf.clip_by_value(x, -bound, bound)

    def where(self, condition, x, y):
        return tf.where(condition, x, y)

    def sum64(self, x, axis=None):
        return tf.reduce_sum(tf.cast(x, tf.float64), axis=axis)

    def power_sum64(self, x, p, axis=None):
        x = tf.cast(x, tf.float64)
        return tf.reduce_sum(tf.abs(x) if p == 1 else tf.square(x), axis=axis)

    def signed(self, positive, magnitude):
        positive = tf.cast(positive, tf.bool)
        return tf.where(positive, magnitude, -magnitude)

    def max(self, x, axis=None):
        return tf.reduce_max(x, axis=axis)

    def count(self, mask):
        return tf.reduce_sum(tf.cast(mask, tf.int64))

    def cumsum(self, mask):
        return tf.cumsum(tf.cast(mask, tf.int64))

    def reshape(self, x, shape):
        return tf.reshape(x, shape)

    def pad(self, x, numel):
        return tf.pad(x, [[0, numel - x.shape[0]]])

    def repeat(self, x, repeats):
        return tf.repeat(x, repeats)

    def slice(self, x, start, stop, step=1):
        return x[start:stop:step]

    def kth_largest(self, x, k):
        return tf.reduce_min(tf.math.top_k(x, k, sorted=False).values)

    def k_smallest_indices(self, keys, k):
        return tf.cast(tf.math.top_k(-keys, k, sorted=False).indices, tf.int64)

    def sort(self, x):
        return tf.sort(x)

    def nonzero(self, mask):
        return tf.reshape(tf.where(mask), [-1])

    def gather(self, x, indices):
        return tf.gather(x, indices)

    def scatter(self, numel, indices, values):
        return tf.scatter_nd(tf.reshape(indices, [-1, 1]), values, [numel])

    def concat(self, parts):
        return tf.concat(parts, axis=0) if parts else tf.zeros([0], tf.uint8)

    def float32_bits(self, x):
        return tf.cast(tf.bitcast(x, tf.int32), tf.int64) & 0xFFFFFFFF

    def float32_from_bits(self, bits):
        return tf.bitcast(tf.cast(bits, tf.int32), tf.float32)

    def to_bytes(self, x, kind):
        if kind in _FLOAT_WIRE:
            return tf.reshape(tf.bitcast(tf.cast(x, _FLOAT_WIRE[kind]), tf.uint8), [-1])
        # Little-endian: the low bytes of each int64 are the narrower integer.
        wide = tf.bitcast(tf.reshape(tf.cast(x, tf.int64), [-1]), tf.uint8)
        return tf.reshape(wide[:, :_INT_BYTES[kind]], [-1])

    def from_bytes(self, data, kind):
        if kind in _FLOAT_WIRE:
            item = 4 if kind == "float32" else 2
            values = tf.bitcast(tf.reshape(data, [-1, item]), _FLOAT_WIRE[kind])
            return tf.cast(values, tf.float32)
        width = _INT_BYTES[kind]
        narrow = tf.reshape(data, [-1, width])
        return tf.bitcast(tf.pad(narrow, [[0, 0], [0, 8 - width]]), tf.int64)

    def pack_bits(self, codes, width):
        if width == 1:
            bits = tf.cast(codes, tf.int32)
        else:
            powers = tf.constant([1 << j for j in range(width)], tf.int64)
            bits = tf.reshape(tf.cast((tf.reshape(codes, [-1, 1]) // powers) % 2, tf.int32), [-1])
        bits = tf.pad(bits, [[0, -bits.shape[0] % 8]])
        packed = tf.reduce_sum(tf.reshape(bits, [-1, 8]) * tf.constant(_BIT_WEIGHTS, tf.int32), 1)
        return tf.cast(packed, tf.uint8)

    def unpack_bits(self, data, width, count):
        weights = tf.constant(_BIT_WEIGHTS, tf.int64)
        bits = (tf.reshape(tf.cast(data, tf.int64), [-1, 1]) // weights) % 2
        bits = tf.reshape(bits, [-1])[:count * width]
        if width == 1:
            return tf.cast(bits, tf.bool)
        powers = tf.constant([1 << j for j in range(width)], tf.int64)
        return tf.reduce_sum(tf.reshape(bits, [count, width]) * powers, axis=1)

    def payload_size(self, payload):
        if not isinstance(payload, (tf.Tensor, tf.Variable)):
            return type(payload).__name__, ()
        return payload.dtype.name, tuple(payload.shape.as_list())

    def check(self, condition, error):
        if tf.executing_eagerly():
            if not bool(condition):
                raise error()
        else:
            tf.debugging.Assert(condition, [str(error())])

    def cond(self, predicate, if_true, if_false):
        if tf.executing_eagerly():
            return if_true() if bool(predicate) else if_false()
        return tf.cond(predicate, if_true, if_false)
