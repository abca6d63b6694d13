"""``ECLKOptimizer``: error-compensated loopless Katyusha over Horovod, for finite sums.

The parameters hold ``y``, the method's output sequence, between steps. A step evaluates this
rank's stochastic closure twice, at ``x`` and at the snapshot ``w`` (the same samples: the closure
decides which, and must pick the same ones both times), compresses ``eta/L (g - h)`` with error
feedback and averages the ranks' payloads over an allgather (:class:`~horovod_squeeze.ErrorFeedback`
through :class:`~horovod_squeeze.torch.engine.SqueezeEngine`), moves the shift by EF21 fed this
rank's full local gradient at ``w``, and takes the accelerated step
(:class:`horovod_squeeze.algorithms.eclk.ECLK`). The full closure runs at the start and whenever
the shared coin moves the snapshot.
"""
from __future__ import annotations

import torch

from horovod_squeeze.algorithms.eclk import ECLK
from horovod_squeeze.plan import working_precision
from horovod_squeeze.torch.engine import SqueezeEngine

__all__ = ["ECLKOptimizer"]

_UPLINK, _SHIFT = "eclk.uplink", "eclk.shift"


class ECLKOptimizer(torch.optim.Optimizer):
    """ECLK on ``params``: ``step(closure, full_closure)`` once per round.

    Args:
      params: the model's parameters (float32 or float64; float64 keeps every state in float64).
      algorithm: an :class:`~horovod_squeeze.ECLK` (e.g. ``hs.ECLK.by_theory(...)``).
      collectives: Horovod's (default, after ``hvd.init()``) or :mod:`horovod_squeeze.fake`'s.

    ``step(closure, full_closure)``: ``closure()`` returns the loss of this round's samples and
    ``full_closure()`` the loss of all of this rank's data; both compute it from the parameters as
    they are when called, and the optimizer runs their backward. Returns the stochastic loss at
    ``x``. Telemetry: ``snapshots`` (how many times ``w`` moved), ``bytes_sent`` (payload bytes
    this rank sent, both compressed messages).

    Example::

        import horovod.torch as hvd
        import horovod_squeeze as hs
        import horovod_squeeze.torch as hst

        hvd.init()
        optimizer = hst.ECLKOptimizer(model.parameters(), hs.ECLK.by_theory(
            hs.TopK(0.1), L=L, mu=mu, samples=len(my_rows)))
        for step in range(steps):
            batch = sample(step)
            optimizer.step(lambda: loss(model, batch), lambda: loss(model, my_rows))
    """

    def __init__(self, params, algorithm: ECLK, *, collectives=None):
        if not isinstance(algorithm, ECLK):
            raise TypeError(f"ECLKOptimizer: algorithm must be horovod_squeeze.ECLK(...), got "
                            f"{algorithm!r}")
        super().__init__(params, {})
        self._params = [p for group in self.param_groups for p in group["params"]]
        if not self._params:
            raise ValueError("ECLKOptimizer: no parameters")
        numel = sum(p.numel() for p in self._params)
        algorithm.check(numel)
        self.algorithm = algorithm
        precision = working_precision(str(p.dtype) for p in self._params)
        self._dtype = getattr(torch, precision)
        if collectives is None:
            from horovod_squeeze.torch.collectives import HorovodCollectives

            collectives = HorovodCollectives()
        options = {"collectives": collectives, "device": self._params[0].device,
                   "exchange": "allgather", "min_compress_numel": 0, "precision": precision}
        self._uplink = SqueezeEngine(algorithm.uplink(), [(_UPLINK, (numel,))], **options)
        shift = algorithm.shift_learning()
        self._shift = None if shift is None else SqueezeEngine(shift, [(_SHIFT, (numel,))],
                                                               **options)
        self._round = 0
        self._vectors: dict[str, torch.Tensor] | None = None  # y, z, w, grad_at_w, mean_shift
        self.snapshots = 0
        self.bytes_sent = 0

    # --- the flat model ---------------------------------------------------------------------

    def _flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1).to(self._dtype) for p in self._params])

    def _load(self, flat: torch.Tensor) -> None:
        with torch.no_grad():
            start = 0
            for p in self._params:
                p.copy_(flat[start:start + p.numel()].reshape(p.shape))
                start += p.numel()

    def _gradient_at(self, point: torch.Tensor, closure):
        """``closure``'s loss and gradient with the parameters set to ``point``."""
        self._load(point)
        self.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = closure()
            loss.backward()
        grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p))
                          .reshape(-1).to(self._dtype) for p in self._params])
        return loss.detach(), grad

    def _shift_estimate(self) -> torch.Tensor:
        """``h_t``, this rank's shift (zero without one)."""
        if self._shift is None:
            return torch.zeros_like(self._vectors["y"])
        return self._shift.state[0]["worker_estimate"]

    # --- the step -----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None, full_closure=None):
        if closure is None or full_closure is None:
            raise TypeError("ECLKOptimizer.step needs closure (this round's samples) and "
                            "full_closure (all of this rank's data)")
        algorithm = self.algorithm
        if self._vectors is None:
            start = self._flat()
            _, full = self._gradient_at(start, full_closure)
            self._vectors = {"y": start, "z": start.clone(), "w": start.clone(),
                             "grad_at_w": full, "mean_shift": torch.zeros_like(start)}
        v = self._vectors
        x = algorithm.point(v["y"], v["z"], v["w"])
        loss, at_x = self._gradient_at(x, closure)
        _, at_w = self._gradient_at(v["w"], closure)
        estimator = at_x - at_w + v["grad_at_w"]
        self._uplink.submit(_UPLINK, (estimator - self._shift_estimate()) * algorithm.step_scale)
        averaged = self._uplink.result(_UPLINK)
        self.bytes_sent += self._uplink.last_stats.bytes.sent
        update = averaged + v["mean_shift"] * algorithm.step_scale
        if self._shift is not None:
            self._shift.submit(_SHIFT, v["grad_at_w"])
            v["mean_shift"] = self._shift.result(_SHIFT)
            self.bytes_sent += self._shift.last_stats.bytes.sent
        z_next = algorithm.mirror_step(v["z"], x, update)
        y_next = algorithm.output(x, z_next, v["z"])
        if algorithm.snapshot(self._round):
            v["w"] = v["y"]
            _, v["grad_at_w"] = self._gradient_at(v["w"], full_closure)
            self.snapshots += 1
        v["y"], v["z"] = y_next, z_next
        self._load(y_next)
        self._round += 1
        return loss
