"""TensorFlow codecs: every compressor spec's ``compress`` and ``decompress`` on TF tensors.

Payloads are byte-identical to :mod:`horovod_squeeze.reference` and to the PyTorch codecs. They work
eagerly and inside ``tf.function``; TensorFlow places the operations (:func:`on` returns the one
codec whatever the device, for symmetry with PyTorch).

Example::

    import tensorflow as tf
    import horovod_squeeze as hs
    from horovod_squeeze.tensorflow import codecs

    grad = tf.random.normal([1000])
    payload = codecs.compress(hs.TopK(0.01), grad)          # uint8, 10 indices + 10 values
    approx = codecs.decompress(hs.TopK(0.01), payload, 1000)
"""
from horovod_squeeze._codecs import Codec
from horovod_squeeze.tensorflow._ops import TensorFlowOps

__all__ = ["compress", "decompress", "on"]

_codec = Codec(TensorFlowOps())
compress = _codec.compress
decompress = _codec.decompress


def on(device=None) -> Codec:
    """The codec (TensorFlow places its operations by the enclosing ``tf.device`` scope)."""
    del device
    return _codec
