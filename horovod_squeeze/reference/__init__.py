"""NumPy reference implementations: the oracle every framework binding is tested against."""
from horovod_squeeze.reference.codecs import compress, decompress

__all__ = ["compress", "decompress"]
