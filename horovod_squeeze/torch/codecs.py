"""PyTorch codecs: every compressor spec's ``compress`` and ``decompress`` on torch tensors.

Payloads are byte-identical to :mod:`horovod_squeeze.reference` and to the TensorFlow codecs, and
stay on the input's device (:func:`on` gives the codec of one device).

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
from horovod_squeeze.torch._ops import TorchOps

__all__ = ["compress", "decompress", "on"]

_codecs: dict[torch.device, Codec] = {}


def on(device=None) -> Codec:
    """The codec whose tensors live on ``device`` (default: the CPU)."""
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _codecs:
        _codecs[device] = Codec(TorchOps(device))
    return _codecs[device]


def compress(spec, x: torch.Tensor, *, nonce: int = 0, name: str = "tensor",
             segments=None) -> torch.Tensor:
    """``x`` as its uint8 wire payload, on ``x``'s device (``segments``: the lengths of its real
    segments; ``None``: one, the whole tensor)."""
    return on(_device(x, name)).compress(spec, x, nonce=nonce, name=name, segments=segments)


def decompress(spec, payload: torch.Tensor, numel: int, *, name: str = "payload",
               segments=None, dtype: str = "float32") -> torch.Tensor:
    """A payload back to a flat tensor of ``numel`` entries (``dtype``: ``"float32"`` or
    ``"float64"``), on the payload's device."""
    return on(_device(payload, name)).decompress(spec, payload, numel, name=name,
                                                 segments=segments, dtype=dtype)


def _device(x, name: str) -> torch.device:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    return x.device
