"""TensorFlow binding of horovod-squeeze."""
from horovod_squeeze.tensorflow.codecs import compress, decompress

__all__ = ["compress", "decompress"]
