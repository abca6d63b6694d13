"""PyTorch binding of horovod-squeeze: codecs, the compressed ``DistributedOptimizer`` and the
``DecentralizedOptimizer``."""
from horovod_squeeze.torch import state
from horovod_squeeze.torch.codecs import compress, decompress
from horovod_squeeze.torch.decentralized import DecentralizedOptimizer
from horovod_squeeze.torch.finite_sum import FiniteSumOptimizer
from horovod_squeeze.torch.optimizer import DistributedOptimizer
from horovod_squeeze.torch.stock import StockCompression

__all__ = ["DecentralizedOptimizer", "DistributedOptimizer", "FiniteSumOptimizer", "StockCompression", "compress", "decompress", "state"]
