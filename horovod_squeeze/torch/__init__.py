"""PyTorch binding of horovod-squeeze: codecs, the compressed ``DistributedOptimizer`` and the
``DecentralizedOptimizer``."""
from horovod_squeeze.torch import state
from horovod_squeeze.torch.codecs import compress, decompress
from horovod_squeeze.torch.decentralized import DecentralizedOptimizer
from horovod_squeeze.torch.eclk import ECLKOptimizer
from horovod_squeeze.torch.optimizer import DistributedOptimizer
from horovod_squeeze.torch.stock import StockCompression

__all__ = ["DecentralizedOptimizer", "DistributedOptimizer", "ECLKOptimizer", "StockCompression", "compress", "decompress", "state"]
