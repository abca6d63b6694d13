"""Keras (``tf_keras``) binding: the compressed ``DistributedOptimizer`` and callbacks.

Use with ``TF_USE_LEGACY_KERAS=1``: Horovod supports ``tf_keras``, not Keras 3.
"""
from horovod_squeeze.tensorflow.keras import callbacks
from horovod_squeeze.tensorflow.keras.optimizer import DistributedOptimizer

__all__ = ["DistributedOptimizer", "callbacks"]
