"""PyTorch codecs: every compressor spec's ``compress`` and ``decompress`` on torch tensors.

Payloads are byte-identical to :mod:`horovod_squeeze.reference` and to the TensorFlow codecs.

Example::

    import torch
    import horovod_squeeze as hs
    from horovod_squeeze.torch import codecs

    grad = torch.randn(1000)
    payload = codecs.compress(hs.TopK(0.01), grad)          # uint8, 10 indices + 10 values
    approx = codecs.decompress(hs.TopK(0.01), payload, grad.numel())
"""
from horovod_squeeze._codecs import Codec
from horovod_squeeze.torch._ops import TorchOps

__all__ = ["compress", "decompress"]

_codec = Codec(TorchOps())
compress = _codec.compress
decompress = _codec.decompress
