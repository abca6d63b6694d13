"""``DistributedOptimizer``: Horovod's optimizer with an error-compensated compressed exchange.

Built from Horovod's own ``_DistributedOptimizer`` (its class is assembled from that class's dict,
as Horovod does), so hooks during backward, ``synchronize()``, ``skip_synchronize()``,
``backward_passes_per_step``, ``zero_grad`` checks and parameters without gradients behave exactly
as in Horovod. Only the per-parameter allreduce is replaced: gradients go to a
:class:`~horovod_squeeze.torch.engine.SqueezeEngine`, and the handle Horovod waits on is a callable
that returns the averaged gradient.
"""
from __future__ import annotations

import warnings

import horovod.torch as hvd
import torch
from horovod.torch.compression import Compression
from horovod.torch.optimizer import _DistributedOptimizer

from horovod_squeeze.algorithms import MODEL_INCREMENT, Algorithm
from horovod_squeeze.compressors import Compressor
from horovod_squeeze.model_step import check_plain_sgd
from horovod_squeeze.momentum import (
    WorkerMomentum, adam_scale, frozen_adam_update, warmup_steps_for,
)
from horovod_squeeze.plan import EngineOptions, check_algorithm, working_precision
from horovod_squeeze.torch.collectives import HorovodCollectives
from horovod_squeeze.torch import codecs
from horovod_squeeze.torch import state as squeeze_state
from horovod_squeeze.torch.engine import SqueezeEngine, StepStats

__all__ = ["DistributedOptimizer"]


class _SqueezeOptimizer(_DistributedOptimizer):
    def __init__(self, params, named_parameters, algorithm, backward_passes_per_step, op,
                 gradient_predivide_factor, sparse_as_dense, process_set, engine_options,
                 momentum_kind):
        _DistributedOptimizer.__init__(self, params, named_parameters, Compression.none,
                                       backward_passes_per_step=backward_passes_per_step, op=op,
                                       gradient_predivide_factor=gradient_predivide_factor,
                                       sparse_as_dense=sparse_as_dense, process_set=process_set)
        trained = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        self._squeeze_momentum_kind = momentum_kind  # None, "sgd" or "adam"
        self._squeeze_group_of = {p: group for group in self.param_groups for p in group["params"]}
        self._squeeze_parameter = {self._parameter_names[p]: p for p in trained}
        self._squeeze = SqueezeEngine(
            algorithm, [(self._parameter_names[p], p.shape) for p in trained],
            collectives=HorovodCollectives(process_set),
            device=trained[0].device if trained else None,
            learning_rate=self._squeeze_learning_rate,
            momentum=_worker_momentum(self.param_groups, momentum_kind),
            momentum_source=self._squeeze_momentum_source,
            momentum_scale=self._squeeze_adam_scale if momentum_kind == "adam" else None,
            **engine_options)
        # Average is what the algorithms compute; Sum is the same times the number of ranks.
        self._squeeze_postscale = gradient_predivide_factor * (
            process_set.size() if op == hvd.Sum else 1.0)
        self._squeeze_prescale = 1.0 / gradient_predivide_factor

    def _allreduce_grad_async(self, p):
        if p.grad is None:
            # As in Horovod: another rank may have a gradient for it, so contribute zeros.
            p.grad = p.data.new(p.size()).zero_()
        name = self._parameter_names[p]
        grad = p.grad
        if grad.is_sparse:
            if not self.sparse_as_dense:
                return self._squeeze_sparse(p, name)
            grad = grad.to_dense()
        if self._squeeze_prescale != 1.0:
            grad = grad * self._squeeze_prescale
        if self._squeeze_worker_momentum_now() or self._squeeze.algorithm.output == MODEL_INCREMENT:
            grad = self._squeeze_with_l2(p, grad)
        self._squeeze.submit(name, grad)
        return self._squeeze_result(name), None

    def _squeeze_sparse(self, p, name):
        """A sparse gradient takes Horovod's sparse path, uncompressed, as under Horovod's
        optimizer; its bucket gets zeros (which leave its state at zero)."""
        if self._squeeze.algorithm.output == MODEL_INCREMENT or self._squeeze_worker_momentum_now():
            raise ValueError(
                f"{name}: a sparse gradient is averaged uncompressed, outside "
                f"{self._squeeze.algorithm!r}'s model step and the worker momentum; pass "
                "sparse_as_dense=True (or use dense gradients, e.g. sparse=False in "
                "torch.nn.Embedding)")
        handle = hvd.sparse_allreduce_async(p.grad, name=f"squeeze.sparse.{name}", op=self.op,
                                            process_set=self.process_set)
        self._squeeze.submit(name, torch.zeros(p.shape, dtype=p.dtype, device=p.device))

        def result():
            self._squeeze.result(name)  # the zeros' bucket: finishes the step with the others
            return handle()  # Horovod's sparse handle is a callable
        return result, None

    def _squeeze_learning_rate(self) -> float:
        rates = {group["lr"] for group in self.param_groups}
        if len(rates) > 1 and self._squeeze.algorithm.output == MODEL_INCREMENT:
            raise ValueError(f"{self._squeeze.algorithm!r} updates the model with one learning "
                             f"rate; the parameter groups have {sorted(rates)}")
        return float(self.param_groups[0]["lr"])

    # --- worker momentum (see horovod_squeeze.momentum) --------------------------------------------

    def _squeeze_worker_momentum_now(self) -> bool:
        return self._squeeze.plan.momentum is not None and self._squeeze.compressing

    def _squeeze_with_l2(self, p, grad):
        """The gradient plus SGD's or Adam's L2 term ``wd * p``, which the optimizer adds before
        its momentum (so here, before the worker momentum), and which an algorithm that updates
        the model compresses as part of the gradient. AdamW decays the weights instead. The term
        is divided by the postscale, so the exchange's result holds ``wd * p`` once, as the
        wrapped optimizer would add it to Horovod's result."""
        group = self._squeeze_group_of[p]
        decoupled = self._squeeze_momentum_kind == "adam" and group["decoupled_weight_decay"]
        if not group["weight_decay"] or decoupled:
            return grad
        return grad + (group["weight_decay"] / self._squeeze_postscale) * p.detach()

    def _squeeze_momentum_source(self, name):
        """The wrapped optimizer's momentum of ``name`` when warm-up ends (None: none yet)."""
        if self._squeeze_momentum_kind == "adam":
            return self._squeeze_adam_state(name)["exp_avg"]
        return self.state.get(self._squeeze_parameter[name], {}).get("momentum_buffer")

    def _squeeze_adam_state(self, name) -> dict:
        """Adam's state of ``name``, which warm-up must have created: its variance is frozen."""
        state = self.state.get(self._squeeze_parameter[name], {})
        if "exp_avg_sq" not in state:
            raise RuntimeError(
                f"{name}: Adam's variance is frozen when warm-up ends, but this parameter had "
                "no gradient during the warm-up steps; raise warmup_steps")
        return state

    def _squeeze_adam_scale(self, name):
        """Adam's preconditioner of ``name`` with the variance frozen when warm-up ended."""
        p = self._squeeze_parameter[name]
        state, group = self._squeeze_adam_state(name), self._squeeze_group_of[p]
        variance_step = state.setdefault("variance_frozen_at", int(state["step"]))
        return adam_scale(codecs.on(p.device).xp, state["exp_avg_sq"],
                          variance_step=variance_step, beta2=group["betas"][1], eps=group["eps"])

    def step(self, closure=None):
        """As Horovod's, with four exceptions: nothing happens if any rank's gradients held NaN
        or Inf (every rank skips the step; see :class:`SqueezeEngine`); an algorithm whose output
        is a model increment
        adds it to the parameters instead of running the wrapped optimizer's step; with worker
        momentum, SGD steps with its own momentum and L2 term off (the exchange carried them) and
        Adam takes the frozen-variance step of :func:`horovod_squeeze.momentum.frozen_adam_update`
        on the exchanged direction."""
        output = self._squeeze.algorithm.output
        worker_momentum = self._squeeze_worker_momentum_now()
        if self._should_synchronize:
            if self._synchronized:
                warnings.warn("optimizer.step() called without optimizer.skip_synchronize() "
                              "context after optimizer.synchronize(). This can cause training "
                              "slowdown.")
            self.synchronize()
        self._synchronized = False
        if self._squeeze.skipped_last_step:
            return None  # some rank's gradients were not finite: every rank skips the step
        if output != MODEL_INCREMENT and not worker_momentum:
            return super(self.__class__, self).step(closure)
        loss = closure() if closure is not None else None
        if output == MODEL_INCREMENT:
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            p.add_(p.grad)
        elif self._squeeze_momentum_kind == "sgd":
            self._squeeze_sgd_step()
        else:
            self._squeeze_adam_step()
        return loss

    def _squeeze_sgd_step(self):
        """``p -= lr * averaged momentum``: the wrapped SGD's step with its momentum and L2 off."""
        saved = [(group["momentum"], group["nesterov"], group["weight_decay"])
                 for group in self.param_groups]
        for group in self.param_groups:
            group.update(momentum=0.0, nesterov=False, weight_decay=0.0)
        try:
            super(self.__class__, self).step()
        finally:
            for group, (momentum, nesterov, weight_decay) in zip(self.param_groups, saved):
                group.update(momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)

    @torch.no_grad()
    def _squeeze_adam_step(self):
        """Adam's step on the exchanged direction (see horovod_squeeze.momentum); ``exp_avg`` keeps
        the value it had when warm-up ended: the moments live in the engine's worker state."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state["step"] += 1
                p.copy_(frozen_adam_update(
                    p, p.grad, step=int(state["step"]), learning_rate=group["lr"],
                    beta1=group["betas"][0], weight_decay=group["weight_decay"],
                    decoupled=group["decoupled_weight_decay"]))

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

    def state_dict(self, all_ranks: bool = False):
        """The wrapped optimizer's state plus, under ``"squeeze"``, this rank's algorithm state:
        no collective, so rank 0 alone may save it, as Horovod's examples do. ``all_ranks=True``:
        every rank's algorithm state instead, a collective (call it on every rank), which
        restores every rank exactly at this or another world size."""
        state = super(self.__class__, self).state_dict()
        state["squeeze"] = (squeeze_state.gather(self._squeeze) if all_ranks
                            else self._squeeze.local_state())
        return state

    def load_state_dict(self, state_dict):
        """Loads the wrapped optimizer's state now, and the algorithm state at the first step,
        where every rank agrees how (see :mod:`horovod_squeeze.resume`); no collective."""
        state_dict = dict(state_dict)
        squeeze = state_dict.pop("squeeze", None)
        if squeeze is not None:
            self._squeeze.load_later(squeeze)  # checked before anything changes
        _DistributedOptimizer.load_state_dict(self, state_dict)


#: The wrapped optimizer an algorithm that updates the model supports (horovod_squeeze.model_step).
_PLAIN_SGD = ("torch.optim.SGD with momentum=0, nesterov=False and maximize=False in every "
             "parameter group (weight_decay is added to the gradient before compression)")


def _check_plain_sgd(algorithm: Algorithm, optimizer) -> None:
    """Refuses any optimizer but plain SGD for an algorithm that takes the model step itself."""
    settings = {key: next((group[key] for group in optimizer.param_groups if group.get(key)),
                          False)
                for key in ("momentum", "nesterov", "maximize")}
    check_plain_sgd(algorithm, optimizer, is_sgd=isinstance(optimizer, torch.optim.SGD),
                    settings=settings, plain_sgd=_PLAIN_SGD)


def _momentum_kind(optimizer, algorithm: Algorithm, worker_momentum: bool) -> str | None:
    """Which worker momentum the wrapped optimizer gets: "sgd", "adam" or None."""
    if not worker_momentum or algorithm.output == MODEL_INCREMENT:
        return None
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd" if any(group["momentum"] for group in optimizer.param_groups) else None
    if isinstance(optimizer, torch.optim.Adam):  # AdamW too
        return "adam"
    return None


def _one(param_groups, key: str, kind: str):
    values = {group[key] for group in param_groups}
    if len(values) > 1:
        raise ValueError(f"worker momentum needs one {key} for every parameter group, got "
                         f"{sorted(values)}; pass worker_momentum=False to keep the {kind} "
                         "optimizer's own momentum")
    return values.pop()


def _worker_momentum(param_groups, kind: str | None) -> WorkerMomentum | None:
    if kind is None:
        return None
    if _one(param_groups, "maximize", kind):
        raise ValueError("worker momentum does not support maximize=True; pass "
                         "worker_momentum=False")
    if kind == "adam":
        if _one(param_groups, "amsgrad", kind):
            raise ValueError("worker momentum does not support Adam's amsgrad (its maximum of "
                             "variances is not frozen); pass worker_momentum=False")
        return WorkerMomentum.adam(*_one(param_groups, "betas", kind))
    if _one(param_groups, "dampening", kind):
        raise ValueError("worker momentum does not support SGD's dampening; pass "
                         "worker_momentum=False")
    return WorkerMomentum(_one(param_groups, "momentum", kind),
                          nesterov=_one(param_groups, "nesterov", kind))


def DistributedOptimizer(optimizer: torch.optim.Optimizer, named_parameters=None,
                         compression=Compression.none, backward_passes_per_step: int = 1,
                         op=hvd.Average, gradient_predivide_factor: float = 1.0,
                         num_groups: int = 0, groups=None, sparse_as_dense: bool = False,
                         process_set=hvd.global_process_set, *, exchange="sharded",
                         bucket_cap_mb=25.0, min_compress_numel=1024, warmup_steps=None,
                         log_every=0, worker_momentum=True, precision=None):
    """Wraps ``optimizer`` so gradients are averaged through a compressed, error-compensated exchange.

    Arguments are Horovod's (``horovod.torch.DistributedOptimizer``), except:

    Args:
      compression: an algorithm, e.g. ``hs.DoubleSqueeze(hs.ScaledSign())``,
        ``hs.ErrorFeedback(hs.TopK(0.01))`` or ``hs.NoFeedback(...)``. Horovod's own
        ``Compression.none`` / ``Compression.fp16`` give Horovod's optimizer unchanged.
      num_groups, groups: checked as Horovod checks them, and otherwise without effect: they
        choose which allreduces Horovod fuses, and the engine's buckets fuse every gradient.
      sparse_as_dense: as Horovod's. Without it a sparse gradient (``nn.Embedding(sparse=True)``)
        is averaged by Horovod's sparse allreduce, uncompressed (its bucket gets zeros); that
        needs an algorithm that averages gradients and no worker momentum (else ``ValueError``).
      exchange, bucket_cap_mb, min_compress_numel, warmup_steps, log_every: see
        :class:`horovod_squeeze.plan.EngineOptions` (logs go to the ``horovod_squeeze`` logger).
        ``warmup_steps`` defaults to 0, or for Adam to
        :data:`horovod_squeeze.momentum.ADAM_WARMUP_STEPS` (100) exact steps.
      worker_momentum: with ``torch.optim.SGD`` (momentum > 0, Nesterov included) or
        ``Adam``/``AdamW``, after warm-up each worker applies the momentum (Adam's first moment)
        *before* compression, the exchanged momentum is what the optimizer applies, and its own
        momentum is off; Adam's variance is frozen at the end of warm-up (the 1-bit Adam scheme).
        Same hyperparameters as fp32 training. ``False`` applies the optimizer's momentum to the
        averaged gradient instead. See :mod:`horovod_squeeze.momentum`.
      precision: ``"float32"`` or ``"float64"``, the dtype of the algorithm's state and arithmetic
        (:class:`horovod_squeeze.plan.EngineOptions`); by default float64 when every parameter is
        float64, else float32.

    An algorithm whose output is a model increment (``algorithm.output == MODEL_INCREMENT``) takes
    the model step itself: ``step()`` adds the increment to the parameters and the wrapped
    optimizer only gives its learning rate (one for every parameter group). It supports plain SGD
    only: ``torch.optim.SGD`` with ``momentum=0``, ``nesterov=False`` and ``maximize=False``, its
    ``weight_decay`` added to the gradient before compression; any other optimizer is refused with
    a ``ValueError`` (see :mod:`horovod_squeeze.model_step`).

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

    ``state_dict()`` holds this rank's algorithm state and worker momentum, with no collective, so
    rank 0 alone may save it; ``state_dict(all_ranks=True)`` (a collective) holds every rank's.
    ``load_state_dict`` applies either at the first step, the same way on every rank
    (:mod:`horovod_squeeze.resume`): each rank's own state, or every rank's, restores exactly
    (every rank's redistributed, sums preserved, at another world size); rank 0's alone, loaded
    before ``hvd.broadcast_optimizer_state``, restarts every rank from zero state at the saved
    step, with a logged warning. When the learning rate
    changes (a scheduler), residuals in gradient units are rescaled by ``old / new`` before the
    next exchange, so what they will move the model by stays the same.
    """
    if isinstance(compression, Compressor):
        check_algorithm(compression)
    if not isinstance(compression, Algorithm):
        return hvd.DistributedOptimizer(optimizer, named_parameters=named_parameters,
                                        compression=compression,
                                        backward_passes_per_step=backward_passes_per_step, op=op,
                                        gradient_predivide_factor=gradient_predivide_factor,
                                        num_groups=num_groups, groups=groups,
                                        sparse_as_dense=sparse_as_dense, process_set=process_set)
    if op not in (hvd.Average, hvd.Sum):
        raise ValueError("compressed exchanges average gradients; op must be hvd.Average or hvd.Sum")
    if backward_passes_per_step <= 0:
        raise ValueError("backward_passes_per_step must be > 0")
    if gradient_predivide_factor != 1.0 and op != hvd.Average:
        raise ValueError("gradient_predivide_factor not supported with op != Average")
    _check_plain_sgd(compression, optimizer)
    kind = _momentum_kind(optimizer, compression, worker_momentum)
    warmup_steps = warmup_steps_for(kind, warmup_steps)
    if precision is None:
        precision = working_precision(str(p.dtype) for group in optimizer.param_groups
                                      for p in group["params"] if p.requires_grad)
    # Horovod's module, as Horovod's own class has: hvd.broadcast_optimizer_state then initializes
    # a fresh optimizer's state with the wrapped optimizer's step, not with a compressed exchange
    # that only the ranks without state would enter.
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,),
               {**_DistributedOptimizer.__dict__, **_SqueezeOptimizer.__dict__,
                "__module__": _DistributedOptimizer.__module__})
    _check_groups(num_groups, groups)
    return cls(optimizer.param_groups, named_parameters, compression, backward_passes_per_step, op,
               gradient_predivide_factor, sparse_as_dense, process_set,
               vars(EngineOptions(exchange, bucket_cap_mb, min_compress_numel, warmup_steps,
                                  log_every, precision)), kind)


def _check_groups(num_groups, groups) -> None:
    """Horovod's grouping options, checked as Horovod checks them. They only choose which
    allreduces Horovod fuses, and the engine's buckets fuse every gradient already."""
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 0:
        raise ValueError(f"num_groups must be an integer >= 0, got {num_groups!r}")
    if groups is None:
        return
    if isinstance(groups, list):
        seen = set()
        for group in groups:
            for tensor in group:
                if not isinstance(tensor, torch.Tensor):
                    raise ValueError("groups must consist of torch.Tensor")
                if id(tensor) in seen:
                    raise ValueError("a parameter can only appear once in groups")
                seen.add(id(tensor))
    elif isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
        raise ValueError(f"groups should be a positive integer or a list of lists of "
                         f"torch.Tensor, got {groups!r}")
