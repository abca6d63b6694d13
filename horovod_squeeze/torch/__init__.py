"""PyTorch binding of horovod-squeeze."""
from horovod_squeeze.torch.codecs import compress, decompress

__all__ = ["compress", "decompress"]
