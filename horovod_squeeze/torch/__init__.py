"""PyTorch binding of horovod-squeeze: codecs and the compressed ``DistributedOptimizer``."""
from horovod_squeeze.torch import state
from horovod_squeeze.torch.codecs import compress, decompress
from horovod_squeeze.torch.optimizer import DistributedOptimizer
from horovod_squeeze.torch.stock import StockCompression

__all__ = ["DistributedOptimizer", "StockCompression", "compress", "decompress", "state"]
