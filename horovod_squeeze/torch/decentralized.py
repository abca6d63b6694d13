"""``DecentralizedOptimizer``: local steps and compressed gossip with neighbours, no allreduce.

Each ``step()`` takes the wrapped optimizer's local step on this rank's own gradients, then one
gossip step of a :class:`~horovod_squeeze.algorithms.gossip.GossipAlgorithm` over MPI neighbour
collectives (:mod:`horovod_squeeze.neighbors`): the parameters, laid end to end, are compressed
once and sent to each neighbour in the topology, and mixed with what the neighbours sent.
"""
from __future__ import annotations

import logging
import math

import horovod.torch as hvd
import torch
from horovod.torch.optimizer import _DistributedOptimizer

from horovod_squeeze.algorithms.gossip import GossipAlgorithm
from horovod_squeeze.decentralized import (
    agree_on_restore, check_setup, checkpoint, gossip_step, message_nbytes, restorable,
)
from horovod_squeeze.neighbors import NeighborExchange, world
from horovod_squeeze.plan import working_precision
from horovod_squeeze.topology import Topology
from horovod_squeeze.torch import codecs

__all__ = ["DecentralizedOptimizer"]

_log = logging.getLogger("horovod_squeeze")


class _GossipOptimizer:
    def __init__(self, param_groups, named_parameters, algorithm, topology, comm, precision,
                 consensus_every):
        super(self.__class__, self).__init__(param_groups)
        names = {p: name for name, p in (named_parameters or [])}
        self._gossip_parameters = [p for group in self.param_groups for p in group["params"]
                                   if p.requires_grad]
        if not self._gossip_parameters:
            raise ValueError("DecentralizedOptimizer: the optimizer has no trainable parameters")
        self._gossip_algorithm = algorithm
        self._gossip_topology = topology
        self._gossip_precision = precision
        self._gossip_dtype = getattr(torch, precision)
        self._gossip_device = self._gossip_parameters[0].device
        self._gossip_sizes = tuple(p.numel() for p in self._gossip_parameters)
        size = sum(self._gossip_sizes)
        algorithm.check(max(self._gossip_sizes))
        self._gossip_codec = codecs.on(self._gossip_device)
        self._gossip_state = {name: torch.zeros(size, dtype=self._gossip_dtype,
                                                device=self._gossip_device)
                              for name in algorithm.state_names()}
        self._gossip_exchange = NeighborExchange(topology, comm)
        self._gossip_step_count = 0
        self._gossip_pending = None  # a loaded checkpoint, applied at the next step
        self._gossip_consensus_every = consensus_every
        self.last_consensus_distance: float | None = None
        self.skipped_steps = 0
        self.message_nbytes = message_nbytes(algorithm, size, self._gossip_sizes)
        self.absent_neighbors: tuple[int, ...] = ()
        self._gossip_exchange.agree(
            algorithm=repr(algorithm), precision=precision, sizes=self._gossip_sizes,
            names=[names.get(p, "") for p in self._gossip_parameters],
            message_nbytes=self.message_nbytes)

    # --- the step ---------------------------------------------------------------------------

    # GradScaler then calls step() on every rank, setting grad_scale and found_inf, instead of
    # skipping it on a rank whose gradients overflowed, which would leave its neighbours waiting.
    _step_supports_amp_scaling = True

    def step(self, closure=None):
        if self._gossip_pending is not None:
            self._gossip_restore()
        loss = None
        if closure is not None:
            # It computes this step's gradients: evaluated first, so the check below sees them.
            with torch.enable_grad():
                loss = closure()
        # GradScaler's attributes are for this step, not the wrapped optimizer's (plain SGD
        # refuses them); GradScaler deletes them afterwards, so they are put back.
        amp = {name: self.__dict__.pop(name) for name in ("grad_scale", "found_inf")
               if name in self.__dict__}
        overflow = amp.get("found_inf")
        finite = (overflow is None or not bool(overflow)) and self._gossip_gradients_finite()
        try:
            if finite:
                self._gossip_unscale(amp.get("grad_scale"))
                # Optimizers that require a closure get one that returns the loss already
                # computed, not a second forward and backward.
                super(self.__class__, self).step(None if closure is None else lambda: loss)
        finally:
            self.__dict__.update(amp)
        if not finite:
            # This rank's gradients alone are bad (each rank has its own): it skips its local step
            # but still gossips its (finite) model, so no neighbour waits and the graph stays whole.
            self.skipped_steps += 1
            _log.warning("rank %d: gradients not finite (NaN or Inf) at step %d: local step "
                         "skipped, gossip kept", self._gossip_exchange.rank,
                         self._gossip_step_count)
        with torch.no_grad():
            model = torch.cat([p.detach().reshape(-1).to(self._gossip_dtype)
                               for p in self._gossip_parameters])
            result = gossip_step(
                self._gossip_algorithm, self._gossip_codec, model, self._gossip_state,
                topology=self._gossip_topology, rank=self._gossip_exchange.rank,
                step=self._gossip_step_count, finite=bool(torch.isfinite(model).all()),
                exchange=self._gossip_send, segments=self._gossip_sizes,
                precision=self._gossip_precision)
            for p, value in zip(self._gossip_parameters,
                                result.model.split(self._gossip_sizes)):
                p.copy_(value.reshape(p.shape))
        self._gossip_state = result.state
        self.absent_neighbors = result.absent
        self._gossip_step_count += 1
        every = self._gossip_consensus_every
        if every and self._gossip_step_count % every == 0:
            self.last_consensus_distance = self.consensus_distance()
            _log.info("gossip step %d: consensus distance %.4g", self._gossip_step_count,
                      self.last_consensus_distance)
        return loss

    def _gossip_gradients_finite(self) -> bool:
        grads = [p.grad for p in self._gossip_parameters if p.grad is not None]
        if not grads:
            return True
        return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    def _gossip_unscale(self, grad_scale) -> None:
        """Gradients GradScaler left scaled (it did not unscale them first) divided by its scale."""
        if grad_scale is None:
            return
        for p in self._gossip_parameters:
            if p.grad is not None:
                p.grad.div_(grad_scale.to(p.grad.device))

    def _gossip_send(self, message):
        received = self._gossip_exchange.allgather(message.cpu().numpy())
        return [torch.from_numpy(row).to(self._gossip_device) for row in received]

    # --- what users read ----------------------------------------------------------------------

    @property
    def topology(self) -> Topology:
        return self._gossip_topology

    @property
    def neighbors(self) -> tuple[int, ...]:
        """The ranks this rank exchanges with."""
        return self._gossip_exchange.neighbors

    @property
    def gossip_algorithm(self) -> GossipAlgorithm:
        return self._gossip_algorithm

    @property
    def bytes_sent_per_step(self) -> int:
        """Bytes this rank sends per step: one message to each neighbour."""
        return self.message_nbytes * len(self.neighbors)

    def state_norms(self) -> dict[str, float]:
        """The L2 norm of each state tensor of this rank (e.g. DeepSqueeze's ``model_error``)."""
        return {name: float(torch.linalg.vector_norm(value.double()))
                for name, value in self._gossip_state.items()}

    def consensus_distance(self) -> float:
        """``mean_i ||x_i - mean_j x_j||^2`` over the ranks' models, as ``mean_i ||x_i||^2 -
        ||mean_i x_i||^2`` in float64: one Horovod allreduce, a collective (every rank calls it at
        the same step; ``consensus_every`` does it every N steps)."""
        with torch.no_grad():
            model = torch.cat([p.detach().reshape(-1).double() for p in self._gossip_parameters])
            averaged = hvd.allreduce(torch.cat([model, torch.sum(model ** 2).reshape(1)]),
                                     op=hvd.Average, name="squeeze.gossip.consensus")
            return max(0.0, float(averaged[-1] - torch.sum(averaged[:-1] ** 2)))

    # --- checkpoints --------------------------------------------------------------------------

    def state_dict(self):
        """The wrapped optimizer's state plus, under ``"gossip"``, this rank's gossip state and
        step (:func:`horovod_squeeze.decentralized.checkpoint`); no collective. The ranks' models
        differ, so each rank saves its own (model and optimizer)."""
        state = super(self.__class__, self).state_dict()
        state["gossip"] = checkpoint(
            self._gossip_algorithm, self._gossip_topology, self._gossip_exchange.rank,
            self._gossip_step_count, self._gossip_sizes,
            {name: value.cpu().numpy().copy() for name, value in self._gossip_state.items()})
        return state

    def load_state_dict(self, state_dict):
        """Loads the wrapped optimizer's state now and the gossip state at the next step, where
        every rank decides alike: each rank's own state restores exactly if every rank loaded its
        own; otherwise every rank restarts from zero state at the largest saved step (a warning),
        which keeps what neighbours believe of each other consistent. ``ValueError`` now for a
        checkpoint of another algorithm or model."""
        state_dict = dict(state_dict)
        saved = state_dict.pop("gossip", None)
        if saved is not None:
            restorable(saved, self._gossip_algorithm, self._gossip_topology,
                       self._gossip_exchange.rank, self._gossip_sizes)
        super(self.__class__, self).load_state_dict(state_dict)
        self._gossip_pending = saved

    def _gossip_restore(self) -> None:
        saved, self._gossip_pending = self._gossip_pending, None
        state, self._gossip_step_count = agree_on_restore(
            saved, self._gossip_algorithm, self._gossip_topology, self._gossip_exchange,
            self._gossip_sizes)
        self._gossip_state = {
            name: (torch.zeros_like(value) if state is None else
                   torch.as_tensor(state[name], dtype=self._gossip_dtype).to(self._gossip_device))
            for name, value in self._gossip_state.items()}

def DecentralizedOptimizer(optimizer: torch.optim.Optimizer, named_parameters=None, *,
                           algorithm: GossipAlgorithm, topology="ring", comm=None,
                           precision: str | None = None, consensus_every: int = 0):
    """Wraps ``optimizer`` for decentralized training: local steps, then gossip with neighbours.

    No server and no allreduce in the training step: ``step()`` runs the wrapped optimizer on this
    rank's own gradients (no averaging), then ``algorithm``'s gossip step with this rank's
    neighbours in ``topology`` over MPI neighbour collectives.

    Args:
      optimizer: any ``torch.optim.Optimizer`` (momentum and Adam keep their state per rank).
      named_parameters: as Horovod's; the names enter the check that every rank built the same
        model.
      algorithm: ``hs.DeepSqueeze(C, consensus_step=...)``, ``hs.ChocoSGD(C, ...)`` or
        ``hs.DPSGD()``.
      topology: a :class:`~horovod_squeeze.topology.Topology`, or the name of a built-in graph
        over all ranks: ``"ring"``, ``"torus"``, ``"exponential"``, ``"fully_connected"``.
      comm: the mpi4py communicator (default ``MPI.COMM_WORLD``, checked to hold ``hvd.size()``
        ranks: launch with ``horovodrun --mpi`` or ``mpirun``; ``--gloo`` has no MPI to share).
      precision: ``"float32"`` or ``"float64"``, the dtype of the algorithm's state and
        arithmetic (default: float64 when every parameter is float64).
      consensus_every: every that many steps, measure the consensus distance (one allreduce of
        the model: ``last_consensus_distance``, and logged); 0: never.

    Telemetry: ``bytes_sent_per_step``, ``message_nbytes`` (to each neighbour), ``neighbors``,
    ``state_norms()``, ``consensus_distance()``, ``skipped_steps``, ``absent_neighbors``.
    Checkpoints: ``state_dict()`` holds this rank's gossip state; each rank saves and loads its own.

    ``step(closure)`` evaluates ``closure`` once, first (it computes this step's gradients), and
    returns its loss; LBFGS, which re-evaluates its closure, is refused.

    A rank whose gradients are not finite skips its local step (``skipped_steps``, a logged
    warning) and still gossips (with ``torch.amp.GradScaler`` too: ``scaler.step(optimizer)``
    calls ``step()`` on every rank, and this rank's overflow skips only its local step); one whose model is not finite raises ``FloatingPointError`` after
    the exchange (its neighbours mix without it), so no rank is left waiting.

    Example::

        import horovod.torch as hvd
        import horovod_squeeze as hs
        import horovod_squeeze.torch as hst

        hvd.init()
        optimizer = hst.DecentralizedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
            algorithm=hs.DeepSqueeze(hs.ScaledSign(), consensus_step=0.2), topology="ring")
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    """
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError("DecentralizedOptimizer: LBFGS re-evaluates its closure at the points it "
                         "tries, but a gossip step evaluates the closure once, to check this "
                         "rank's gradients before the local step; use a first-order optimizer")
    comm = world(hvd.size()) if comm is None else comm
    if precision is None:
        precision = working_precision(str(p.dtype) for group in optimizer.param_groups
                                      for p in group["params"] if p.requires_grad)
    topology = check_setup(algorithm, topology, comm.Get_size(), precision, consensus_every)
    # Horovod's module, as its own optimizer class has: hvd.broadcast_optimizer_state then
    # initializes a fresh optimizer's state with the wrapped optimizer's step, not with a gossip
    # step.
    methods = {name: value for name, value in _GossipOptimizer.__dict__.items()
               if name not in ("__dict__", "__weakref__")}  # the wrapped class's own apply
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,),
               {**methods, "__module__": _DistributedOptimizer.__module__})
    return cls(optimizer.param_groups, named_parameters, algorithm, topology, comm, precision,
               consensus_every)
