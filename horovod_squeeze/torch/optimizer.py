"""``DistributedOptimizer``: Horovod's optimizer with an error-compensated compressed exchange.

Built from Horovod's own ``_DistributedOptimizer`` (its class is assembled from that class's dict,
as Horovod does), so hooks during backward, ``synchronize()``, ``skip_synchronize()``,
``backward_passes_per_step``, ``zero_grad`` checks and parameters without gradients behave exactly
as in Horovod. Only the per-parameter allreduce is replaced: gradients go to a
:class:`~horovod_squeeze.torch.engine.SqueezeEngine`, and the handle Horovod waits on is a callable
that returns the averaged gradient.
"""
from __future__ import annotations

import horovod.torch as hvd
import torch
from horovod.torch.compression import Compression
from horovod.torch.optimizer import _DistributedOptimizer

from horovod_squeeze.algorithms import MODEL_INCREMENT, Algorithm
from horovod_squeeze.compressors import Compressor
from horovod_squeeze.plan import EngineOptions, check_algorithm
from horovod_squeeze.torch.collectives import HorovodCollectives
from horovod_squeeze.torch import state as squeeze_state
from horovod_squeeze.torch.engine import SqueezeEngine, StepStats

__all__ = ["DistributedOptimizer"]


class _SqueezeOptimizer(_DistributedOptimizer):
    def __init__(self, params, named_parameters, algorithm, backward_passes_per_step, op,
                 gradient_predivide_factor, process_set, engine_options):
        _DistributedOptimizer.__init__(self, params, named_parameters, Compression.none,
                                       backward_passes_per_step=backward_passes_per_step, op=op,
                                       gradient_predivide_factor=gradient_predivide_factor,
                                       process_set=process_set)
        trained = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        self._squeeze = SqueezeEngine(
            algorithm, [(self._parameter_names[p], p.shape) for p in trained],
            collectives=HorovodCollectives(process_set),
            device=trained[0].device if trained else None,
            learning_rate=self._squeeze_learning_rate, **engine_options)
        # Average is what the algorithms compute; Sum is the same times the number of ranks.
        self._squeeze_postscale = gradient_predivide_factor * (
            process_set.size() if op == hvd.Sum else 1.0)
        self._squeeze_prescale = 1.0 / gradient_predivide_factor

    def _allreduce_grad_async(self, p):
        if p.grad is None:
            # As in Horovod: another rank may have a gradient for it, so contribute zeros.
            p.grad = p.data.new(p.size()).zero_()
        if p.grad.is_sparse:
            raise ValueError(f"{self._parameter_names[p]}: sparse gradients cannot be compressed; "
                             "use dense gradients (e.g. sparse=False in torch.nn.Embedding)")
        name = self._parameter_names[p]
        grad = p.grad if self._squeeze_prescale == 1.0 else p.grad * self._squeeze_prescale
        self._squeeze.submit(name, grad)
        return self._squeeze_result(name), None

    def _squeeze_learning_rate(self) -> float:
        rates = {group["lr"] for group in self.param_groups}
        if len(rates) > 1 and self._squeeze.algorithm.output == MODEL_INCREMENT:
            raise ValueError(f"{self._squeeze.algorithm!r} updates the model with one learning "
                             f"rate; the parameter groups have {sorted(rates)}")
        return float(next(iter(rates)))

    def step(self, closure=None):
        """As Horovod's; an algorithm whose output is a model increment adds it to the parameters
        instead of running the wrapped optimizer's step."""
        if self._squeeze.algorithm.output != MODEL_INCREMENT:
            return _DistributedOptimizer.step(self, closure)
        loss = closure() if closure is not None else None
        if self._should_synchronize:
            self.synchronize()
        self._synchronized = False
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.add_(p.grad)
        return loss

    def _squeeze_result(self, name):
        def handle():
            averaged = self._squeeze.result(name)
            return averaged if self._squeeze_postscale == 1.0 else averaged * self._squeeze_postscale
        return handle

    @property
    def compression_stats(self) -> StepStats | None:
        """Bytes and timings of the last step on this rank (``None`` before the first step)."""
        return self._squeeze.last_stats

    @property
    def squeeze_engine(self) -> SqueezeEngine:
        return self._squeeze

    def state_norms(self) -> dict[str, dict[str, float]]:
        """Per parameter name: the norm of each of this rank's algorithm state tensors."""
        return self._squeeze.state_norms()

    def state_dict(self):
        """The wrapped optimizer's state plus every rank's algorithm state; a collective: call it
        on every rank."""
        state = super(self.__class__, self).state_dict()
        state["squeeze"] = squeeze_state.gather(self._squeeze)
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        squeeze = state_dict.pop("squeeze", None)
        _DistributedOptimizer.load_state_dict(self, state_dict)
        if squeeze is not None:
            squeeze_state.restore(self._squeeze, squeeze)


def DistributedOptimizer(optimizer: torch.optim.Optimizer, named_parameters=None,
                         compression=Compression.none, backward_passes_per_step: int = 1,
                         op=hvd.Average, gradient_predivide_factor: float = 1.0,
                         process_set=hvd.global_process_set, *, exchange="sharded",
                         bucket_cap_mb=25.0, min_compress_numel=1024, warmup_steps=0,
                         log_every=0):
    """Wraps ``optimizer`` so gradients are averaged through a compressed, error-compensated exchange.

    Arguments are Horovod's (``horovod.torch.DistributedOptimizer``), except:

    Args:
      compression: an algorithm, e.g. ``hs.DoubleSqueeze(hs.ScaledSign())``,
        ``hs.ErrorFeedback(hs.TopK(0.01))`` or ``hs.NoFeedback(...)``. Horovod's own
        ``Compression.none`` / ``Compression.fp16`` give Horovod's optimizer unchanged.
      exchange, bucket_cap_mb, min_compress_numel, warmup_steps, log_every: see
        :class:`horovod_squeeze.plan.EngineOptions` (logs go to the ``horovod_squeeze`` logger).

    The algorithm's state lives on the parameters' device (CUDA tensors ride Horovod's NCCL path).

    Example::

        import horovod.torch as hvd
        import horovod_squeeze as hs
        import horovod_squeeze.torch as hst

        hvd.init()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1 * hvd.size(), momentum=0.9)
        optimizer = hst.DistributedOptimizer(
            optimizer, named_parameters=model.named_parameters(),
            compression=hs.DoubleSqueeze(hs.ScaledSign()))
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    ``state_dict()`` gathers every rank's algorithm state (call it on all ranks, as
    ``hvd.broadcast_optimizer_state`` does); ``load_state_dict`` restores it exactly at the same
    world size and redistributes it, sums preserved, at another.
    """
    if isinstance(compression, Compressor):
        check_algorithm(compression)
    if not isinstance(compression, Algorithm):
        return hvd.DistributedOptimizer(optimizer, named_parameters=named_parameters,
                                        compression=compression,
                                        backward_passes_per_step=backward_passes_per_step, op=op,
                                        gradient_predivide_factor=gradient_predivide_factor,
                                        process_set=process_set)
    if op not in (hvd.Average, hvd.Sum):
        raise ValueError("compressed exchanges average gradients; op must be hvd.Average or hvd.Sum")
    if backward_passes_per_step <= 0:
        raise ValueError("backward_passes_per_step must be > 0")
    if gradient_predivide_factor != 1.0 and op != hvd.Average:
        raise ValueError("gradient_predivide_factor not supported with op != Average")
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,),
               {**_DistributedOptimizer.__dict__, **_SqueezeOptimizer.__dict__})
    return cls(optimizer.param_groups, named_parameters, compression, backward_passes_per_step, op,
               gradient_predivide_factor, process_set,
               vars(EngineOptions(exchange, bucket_cap_mb, min_compress_numel, warmup_steps,
                                  log_every)))
