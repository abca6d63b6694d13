"""TensorFlow codecs: every compressor spec's ``compress`` and ``decompress`` on TF tensors.

Payloads are byte-identical to :mod:`horovod_squeeze.reference` and to the PyTorch codecs.

Example::

    import tensorflow as tf
    import horovod_squeeze as hs
    from horovod_squeeze.tensorflow import codecs

    grad = tf.random.normal([1000])
    payload = codecs.compress(hs.TopK(0.01), grad)          # uint8, 10 indices + 10 values
    approx = codecs.decompress(hs.TopK(0.01), payload, 1000)
"""
import tensorflow as tf

from horovod_squeeze._codecs import Codec
from horovod_squeeze.compressors import Compressor
from horovod_squeeze.tensorflow._ops import TensorFlowOps

__all__ = ["compress", "decompress", "split_linear", "join_linear", "xp"]

_codec = Codec(TensorFlowOps())
compress = _codec.compress
decompress = _codec.decompress
xp = _codec.xp  # the array operations, for framework-neutral code such as horovod_squeeze.passes


def split_linear(spec: Compressor, payload: tf.Tensor, numel: int):
    """A linear compressor's payload as (header bytes, summable float values) for an allreduce."""
    section, start, stop = next(s for s in spec.layout(numel).spans() if s[0].name == "values")
    dtype, item = (tf.float16, 2) if section.kind == "float16" else (tf.float32, 4)
    return payload[:start], tf.bitcast(tf.reshape(payload[start:stop], [-1, item]), dtype)


def join_linear(header: tf.Tensor, values: tf.Tensor) -> tf.Tensor:
    """Inverse of :func:`split_linear`: the payload with (reduced) values after its header."""
    return tf.concat([header, tf.reshape(tf.bitcast(values, tf.uint8), [-1])], axis=0)
