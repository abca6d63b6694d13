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
import torch

from horovod_squeeze._codecs import Codec
from horovod_squeeze.compressors import Compressor
from horovod_squeeze.torch._ops import TorchOps

__all__ = ["compress", "decompress", "split_linear", "join_linear", "xp"]

_codec = Codec(TorchOps())
compress = _codec.compress
decompress = _codec.decompress
xp = _codec.xp  # the array operations, for framework-neutral code such as horovod_squeeze.passes


def split_linear(spec: Compressor, payload: torch.Tensor, numel: int):
    """A linear compressor's payload as (header bytes, summable float values) for an allreduce."""
    section, start, stop = next(s for s in spec.layout(numel).spans() if s[0].name == "values")
    dtype = torch.float16 if section.kind == "float16" else torch.float32
    return payload[:start], payload[start:stop].clone().view(dtype)


def join_linear(header: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`split_linear`: the payload with (reduced) values after its header."""
    return torch.cat([header, values.contiguous().view(torch.uint8)])
