"""TensorFlow binding of horovod-squeeze: codecs, ``DistributedGradientTape``, residual state and
decentralized ``Gossip``.

Keras lives in :mod:`horovod_squeeze.tensorflow.keras`.
"""
from horovod_squeeze.tensorflow import state
from horovod_squeeze.tensorflow.codecs import compress, decompress
from horovod_squeeze.tensorflow.decentralized import Gossip
from horovod_squeeze.tensorflow.stock import StockCompression
from horovod_squeeze.tensorflow.tape import DistributedGradientTape

__all__ = ["DistributedGradientTape", "Gossip", "StockCompression", "compress", "decompress", "state"]
