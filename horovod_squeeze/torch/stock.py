"""Error feedback through Horovod's own ``compression=`` hook, for linear compressors.

Horovod's hook receives a tensor without its name, keeps no state, and its allreduce *sums* what the
hook returns. So only compressors whose compact values can be summed are correct through it
(``Identity``, ``FP16``, and ``RandK`` with a random stream shared by all ranks); for those,
:class:`StockCompression` adds the residuals, keyed by parameter name::

    compression = hst.StockCompression(hs.ErrorFeedback(hs.RandK(0.05)), model.named_parameters())
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                         compression=compression)

Everything else (sign, top-k, quantizers) needs :func:`horovod_squeeze.torch.DistributedOptimizer`.
"""
from __future__ import annotations

import torch

from horovod_squeeze.algorithms import Algorithm
from horovod_squeeze import stock
from horovod_squeeze.stock import check_algorithm, stream_id
from horovod_squeeze.torch import codecs

__all__ = ["StockCompression", "stream_id"]


class StockCompression:
    """A Horovod ``Compressor`` (``compress``/``decompress``) with per-parameter algorithm state.

    Args:
      algorithm: ``ErrorFeedback``, ``DoubleSqueeze`` (the server stage runs replicated on every
        rank after the allreduce) or ``NoFeedback``, around a linear worker compressor.
      named_parameters: the model's ``named_parameters()``; tensors are matched to names by
        identity with ``param.grad``, which is what Horovod's optimizer passes to the hook.

    ``state[name]`` holds each parameter's named state (``algorithm.state()``), on its device.
    """

    def __init__(self, algorithm: Algorithm, named_parameters):
        self.algorithm = check_algorithm(algorithm, "horovod_squeeze.torch.DistributedOptimizer")
        self._parameters = list(named_parameters)
        self._name_of_grad: dict[int, tuple[str, torch.nn.Parameter]] = {}
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        self.steps: dict[str, int] = {}

    def _name(self, tensor: torch.Tensor) -> str:
        # ids of freed gradients are reused, so a hit counts only if it is still that .grad.
        name, param = self._name_of_grad.get(id(tensor), (None, None))
        if param is None or param.grad is not tensor:
            self._name_of_grad = {id(p.grad): (n, p) for n, p in self._parameters
                                  if p.grad is not None}
            name, param = self._name_of_grad.get(id(tensor), (None, None))
        if name is None:
            raise ValueError("StockCompression got a tensor that is not the .grad of any of its "
                             "named_parameters; pass the same named_parameters as to "
                             "hvd.DistributedOptimizer")
        return name

    def _state(self, name: str, like: torch.Tensor) -> dict[str, torch.Tensor]:
        if name not in self.state:
            self.state[name] = {spec.name: torch.zeros_like(like) for spec in self.algorithm.state()}
        return self.state[name]

    def compress(self, tensor: torch.Tensor):
        name = self._name(tensor)
        step = self.steps.get(name, 0)
        flat = tensor.detach().reshape(-1).to(torch.float32)
        values, steps = stock.start(codecs.on(flat.device), self.algorithm, flat,
                                    self._state(name, flat), step=step, name=name)
        return values, (name, steps, tensor.shape, tensor.dtype)

    def decompress(self, values: torch.Tensor, ctx):
        name, steps, shape, dtype = ctx
        result = stock.finish(steps, values)
        for key, value in result.state.items():
            self.state[name][key].copy_(value)
        self.steps[name] = self.steps.get(name, 0) + 1
        return result.output.reshape(shape).to(dtype)
