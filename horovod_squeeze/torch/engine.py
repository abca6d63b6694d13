"""The compressed exchange for PyTorch: buckets launched during backward, state on the gradient's
device.

When a bucket's last gradient arrives, its exchange starts (:class:`~horovod_squeeze.driver.InFlight`
launches its first collective asynchronously); :meth:`SqueezeEngine.finish` resumes every bucket in
turn until all are done, so one bucket's pass 2 overlaps the others'. What runs is
:class:`~horovod_squeeze.plan.Plan`; this module moves tensors, keeps state and times the parts.
"""
from __future__ import annotations

import logging

import torch

from horovod_squeeze import resume
from horovod_squeeze.algorithms.base import Algorithm
from horovod_squeeze.driver import InFlight, run_to_end, single
from horovod_squeeze.exchange import Collective, PassBytes
from horovod_squeeze.plan import EngineOptions, Plan
from horovod_squeeze.telemetry import StepStats, state_norms
from horovod_squeeze.torch import codecs

__all__ = ["SqueezeEngine", "StepStats"]

logger = logging.getLogger("horovod_squeeze")


class SqueezeEngine:
    """Compressed exchange of named gradients, with the algorithm's state per bucket.

    Tune these: the options of :class:`~horovod_squeeze.plan.EngineOptions`.

    Internal state: ``step`` (drives warm-up and the random streams) and ``state[bucket][name]``,
    this rank's tensors of each named state (``plan.state_specs()``: the worker momentum's, given
    ``momentum``, and the algorithm's), in the plan's precision, created on ``device`` and moved to
    the gradients' device if they arrive elsewhere. Residuals in gradient units are rescaled by
    ``old / new`` when the ``learning_rate`` callable's value changes between steps.

    Non-finite gradients: if any rank's gradients hold NaN or Inf, every rank skips the step: the
    results are NaN on every rank (so AMP's ``GradScaler`` sees an overflow and lowers its scale),
    the state and the step counter stay as they were, ``skipped_last_step`` is set,
    ``skipped_steps`` counts it and rank 0 logs the ranks. What travels that step is zeros, so
    every collective still matches.

    Statistics: ``last_stats`` (bytes and timings of the last step), :meth:`state_norms`.
    Checkpoints: :mod:`horovod_squeeze.torch.state`; :meth:`load_later` takes saved state without
    a collective, and the first step's agreement (:meth:`agree`, see :mod:`horovod_squeeze.resume`)
    applies it the same way on every rank.
    """

    def __init__(self, algorithm: Algorithm, named_shapes, *, collectives, device=None,
                 learning_rate=None, momentum=None, momentum_source=None, momentum_scale=None,
                 **options):
        self.plan = Plan(algorithm, named_shapes, collectives.size, EngineOptions(**options),
                         momentum=momentum, stacklevel=3)
        self.comm = collectives
        self._scope = collectives.new_scope()
        self.learning_rate = learning_rate  # a callable giving the optimizer's, or None
        # name -> the wrapped optimizer's momentum (or None): where the worker momentum starts
        # when warm-up ends.
        self.momentum_source = momentum_source
        # name -> what the worker momentum is multiplied by before it is sent (Adam's frozen
        # preconditioner), or None.
        self.momentum_scale = momentum_scale
        self.last_rate = None  # the learning rate of the last step (what residuals are in)
        self.step = 0
        device = torch.device("cpu" if device is None else device)
        self.dtype = getattr(torch, self.plan.precision)  # what state and arithmetic use
        self.state = {b.index: {name: torch.zeros(numel, dtype=self.dtype, device=device)
                                for name, numel in self.plan.state_layout(b).items()}
                      for b in self.plan.buckets}
        self._bucket_of = {name: b for b in self.plan.buckets for name in b.names}
        self._shape_of = {name: shape for b in self.plan.buckets
                          for name, shape in zip(b.names, b.shapes)}
        self._grads: dict[int, dict[str, torch.Tensor]] = {b.index: {} for b in self.plan.buckets}
        self._dtypes: dict[str, torch.dtype] = {}
        self._flights: list = []
        self._results: dict[str, torch.Tensor] = {}
        self.last_stats: StepStats | None = None
        self._pending: resume.Pending | None = None  # loaded, waiting for the agreement
        self._agreed = False
        self.skipped_steps = 0
        self.skipped_last_step = False
        self._nonfinite = None  # this step: whether this rank's gradients so far had NaN or Inf
        self._verdict: InFlight | None = None  # every rank's flag, gathered

    algorithm = property(lambda self: self.plan.algorithm)
    exchange = property(lambda self: self.plan.exchange)
    buckets = property(lambda self: self.plan.buckets)

    # --- the exchange -----------------------------------------------------------------------------

    def submit(self, name: str, grad: torch.Tensor) -> None:
        """Hands over one parameter's gradient; starts its bucket's exchange once it is complete."""
        bucket = self._bucket_of[name]
        grads = self._grads[bucket.index]
        if name in grads:
            raise RuntimeError(f"gradient of {name!r} submitted twice in one step")
        if not grad.dtype.is_floating_point:
            raise TypeError(f"gradient of {name!r}: expected a floating-point tensor, got "
                            f"{grad.dtype}")
        shape = self._shape_of[name]
        if tuple(grad.shape) != shape:
            raise ValueError(f"gradient of {name!r} has shape {tuple(grad.shape)}, its "
                             f"parameter {shape}")
        grads[name] = grad
        if len(grads) == len(bucket.names):
            self._launch(bucket)

    def result(self, name: str) -> torch.Tensor:
        """The averaged gradient (or model increment) of ``name``; finishes the step on first use."""
        if self._flights:
            self.finish()
        return self._results.pop(name)

    @property
    def compressing(self) -> bool:
        """Whether this step runs the algorithm (and the worker momentum): warm-up is over."""
        return self.step >= self.plan.options.warmup_steps

    def _begin_step(self) -> None:
        """Rescales residuals in gradient units when the learning rate changed since the last
        step, so ``lr * residual`` (what they will move the model by) stays the same."""
        if self.learning_rate is None or not self.plan.gradient_state():
            return
        rate = self.learning_rate()
        if rate <= 0:  # nothing moves the model now; rescale against the last positive rate
            return
        if self.last_rate is not None and rate != self.last_rate:
            self.scale_state_(self.last_rate / rate)
        self.last_rate = rate

    def _start_momentum(self, bucket, state: dict) -> None:
        """At the first step after warm-up, the worker momentum takes over the optimizer's."""
        parts = []
        for name, shape, _, _ in bucket.spans():
            source = None if self.momentum_source is None else self.momentum_source(name)
            parts.append(torch.zeros(shape, dtype=self.dtype, device=state["momentum"].device)
                         if source is None
                         else source.detach().to(state["momentum"].device, self.dtype))
        state["momentum"].copy_(torch.cat([p.reshape(-1) for p in parts]))

    def _momentum_scale(self, bucket, device: torch.device) -> torch.Tensor | None:
        if self.plan.momentum is None or self.momentum_scale is None:
            return None
        return torch.cat([self.momentum_scale(name).detach().reshape(-1).to(device, self.dtype)
                          for name in bucket.names])

    def _launch(self, bucket) -> None:
        if not self._flights:
            self.agree()
            self._begin_step()
        grads = self._grads[bucket.index]
        self._dtypes.update({name: grads[name].dtype for name in bucket.names})
        flat = torch.cat([grads[name].detach().reshape(-1).to(self.dtype)
                          for name in bucket.names])
        # A flag, not an error: every rank must hear of it. Zeros travel instead (no sync).
        bad = ~torch.isfinite(flat).all()
        flat.masked_fill_(bad, 0.0)
        self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad
        self._grads[bucket.index] = {}
        state = self._state_on(bucket, flat.device)
        if self.plan.momentum is not None and self.step == self.plan.options.warmup_steps:
            self._start_momentum(bucket, state)
        rate = None if self.learning_rate is None else self.learning_rate()
        scale = self._momentum_scale(bucket, flat.device) if self.compressing else None
        steps = self.plan.run(codecs.on(flat.device), bucket, flat, state, step=self.step,
                              rank=self.comm.rank, warm=not self.compressing, learning_rate=rate,
                              momentum_scale=scale)
        self._flights.append((bucket, InFlight(self.comm, steps, f"{self._scope}.b{bucket.index}")))
        if len(self._flights) == len(self.plan.buckets):  # the last bucket: the flag is final
            self._verdict = InFlight(self.comm, single(Collective(
                "allgather", self._nonfinite.float().reshape(1), "flags")), f"{self._scope}.finite")

    def _state_on(self, bucket, device: torch.device) -> dict:
        state = self.state[bucket.index]
        for name, tensor in state.items():
            if tensor.device != device:  # the model moved after the optimizer was built
                state[name] = tensor.to(device)
        return state

    def finish(self) -> None:
        """Completes every launched bucket, stores its state and results; advances the step (or
        skips it on every rank, if any rank's gradients were not finite)."""
        flights = self._flights + [(None, self._verdict)]
        while any(not flight.done for _, flight in flights):
            for _, flight in flights:
                if not flight.done:
                    flight.resume()
        flags = self._verdict.result.cpu().tolist()
        self._verdict, self._nonfinite = None, None
        self.skipped_last_step = any(flags)
        if self.skipped_last_step:
            self._skip([rank for rank, flag in enumerate(flags) if flag])
            return
        timing = [0.0, 0.0, 0.0]
        for bucket, flight in self._flights:
            for name, value in flight.result.state.items():
                self.state[bucket.index][name].copy_(value)
            for name, shape, start, stop in bucket.spans():
                self._results[name] = flight.result.output[start:stop].reshape(shape).to(
                    self._dtypes[name])
            timing = [timing[0] + flight.compute_seconds, timing[1] + flight.wait_seconds,
                      timing[2] + flight.finish_seconds]
        self._flights = []
        self._end_step(timing)

    def _skip(self, ranks: list[int]) -> None:
        """Drops the step on every rank: no state stored, the step not counted, NaN results."""
        for bucket, flight in self._flights:
            output = flight.result.output
            for name, shape, _, _ in bucket.spans():
                self._results[name] = torch.full(shape, float("nan"), dtype=self._dtypes[name],
                                                 device=output.device)
        self._flights = []
        self.skipped_steps += 1
        if self.comm.rank == 0:
            logger.warning("step %d: NaN or Inf in the gradients of rank(s) %s; every rank skips "
                           "the step, the algorithm's state unchanged (%d skipped so far)",
                           self.step, ranks, self.skipped_steps)

    def _end_step(self, timing) -> None:
        warm = self.step < self.plan.options.warmup_steps
        self.last_stats = StepStats(self.step, self.plan.step_bytes(warm, self.comm.rank),
                                    self.plan.fp32_bytes, *timing)
        every = self.plan.options.log_every
        if every and self.comm.rank == 0 and (self.step + 1) % every == 0:
            logger.info("%s", self.last_stats.summary())
        self.step += 1

    # --- state --------------------------------------------------------------------------------------

    def agree(self) -> None:
        """Once, at the first step (or the first gather): every rank sends what it loaded and its
        configuration's fingerprint, and applies :func:`horovod_squeeze.resume.decide`'s decision.
        A collective; a ``ValueError`` on every rank if the configurations differ."""
        if self._agreed:
            return
        row = resume.agreement_row(self.plan, self._pending, self.step)
        device = next((t.device for s in self.state.values() for t in s.values()),
                      torch.device("cpu"))
        gathered = run_to_end(self.comm, single(Collective(
            "allgather", torch.tensor(row, device=device), "rows")), f"{self._scope}.agree")
        decision = resume.decide(gathered.cpu().numpy().reshape(self.comm.size, len(row)),
                                 self.comm.rank)
        if decision.action == "restore":
            self._apply(self._pending)
        elif decision.action == "reset":
            for tensors in self.state.values():
                for tensor in tensors.values():
                    tensor.zero_()
            self.step, self.last_rate = decision.step, None
            if self.comm.rank == 0:
                logger.warning("%s", decision.message)
        self._pending, self._agreed = None, True

    def load_later(self, saved: dict) -> None:
        """Takes saved state (one rank's, or every rank's) without a collective: checked now
        (``ValueError``), applied at the agreement; after it, applied now if restorable."""
        pending = resume.prepare(self.plan, saved, self.comm.rank)
        if not self._agreed:
            self._pending = pending
        elif pending.source == resume.FOREIGN:
            raise ValueError(
                f"this is rank {self.comm.rank} of {self.comm.size}, and the state was saved by "
                f"rank {saved['rank']} of {saved['world_size']}: load it before the first step, "
                "so every rank can agree to start from zero state, or load this rank's own file")
        else:
            self._apply(pending)

    def local_state(self) -> dict:
        """This rank's state, step and rate (:func:`horovod_squeeze.resume.to_local`), or what
        was loaded while it waits for the agreement; no collective."""
        if self._pending is not None:
            return self._pending.saved
        live = {i: {n: t.detach().cpu().clone() for n, t in s.items()}
                for i, s in self.state.items()}
        return resume.to_local(self.plan, live, self.comm.rank, self.step, self.last_rate)

    def _apply(self, pending: resume.Pending) -> None:
        for index, tensors in pending.state.items():
            for name, array in tensors.items():
                live = self.state[index][name]
                live.copy_(torch.as_tensor(array).to(live.device, live.dtype))
        self.step, self.last_rate = pending.step, pending.learning_rate

    def state_norms(self) -> dict[str, dict[str, float]]:
        """Per parameter: the norm of each of this rank's state tensors (a sharded server tensor:
        the shard this rank owns)."""
        return state_norms(self.plan, self._numpy_state(), self.comm.rank)

    def scale_state_(self, factor: float) -> None:
        """Multiplies the state in gradient units by ``factor`` (e.g. old / new learning rate)."""
        for bucket_state in self.state.values():
            for name, tensor in bucket_state.items():
                if name in self.plan.gradient_state():
                    tensor.mul_(factor)

    def _numpy_state(self) -> dict:
        return {i: {n: t.cpu().numpy() for n, t in s.items()} for i, s in self.state.items()}

