"""The compressed exchange for TensorFlow: one call per step, eager or in ``tf.function``.

TensorFlow hands Horovod every gradient of a step at once, so one call of the engine,
``engine(grads)``, runs every bucket's exchange to its end while tracing
(:func:`~horovod_squeeze.driver.run_to_end`); Horovod's ops overlap them in its background thread.
What runs is :class:`~horovod_squeeze.plan.Plan`, as in the PyTorch engine.

State is ``tf.Variable``\\ s created once, in the constructor (lifted out of any ``tf.function``
being traced). The per-rank state and the step counter are deliberately *not* tracked: they differ
between ranks, so they must neither be broadcast from rank 0 nor be saved from rank 0 alone.
Checkpoints carry a gathered snapshot instead (:mod:`horovod_squeeze.tensorflow.state`).
"""
from __future__ import annotations

import sys

import numpy as np
import tensorflow as tf

from horovod_squeeze import resume
from horovod_squeeze.algorithms.base import Algorithm
from horovod_squeeze.driver import run_to_end, single
from horovod_squeeze.exchange import Collective
from horovod_squeeze.plan import EngineOptions, Plan
from horovod_squeeze.telemetry import StepStats, state_norms
from horovod_squeeze.tensorflow import codecs
from horovod_squeeze.tensorflow.collectives import HorovodCollectives

__all__ = ["SqueezeEngine", "StepStats"]


class _Untracked:
    """A plain holder: what it keeps is invisible to tf.Module's variable and checkpoint tracking."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


class SqueezeEngine(tf.Module):
    """Compressed exchange of a fixed list of named gradients, with the algorithm's state.

    Tune these: the options of :class:`~horovod_squeeze.plan.EngineOptions` (``warmup_steps``
    becomes a variable that callbacks may move).

    Internal state: ``step``, and ``state[bucket][name]`` (``tf.Variable``\\ s in the plan's
    precision, on ``device``) for each named state (``plan.state_specs()``: the worker momentum's,
    given ``momentum``, which starts from ``momentum_source(name)`` when warm-up ends and is sent
    times ``momentum_scale(name)`` if given, and the algorithm's); ``snapshot`` (tracked, a
    string) holds every rank's state serialized for checkpoints.
    """

    def __init__(self, algorithm: Algorithm, named_shapes, *, collectives=None, device=None,
                 learning_rate=None, momentum=None, momentum_source=None, momentum_scale=None,
                 **options):
        super().__init__(name="squeeze_engine")
        comm = collectives if collectives is not None else HorovodCollectives()
        plan = Plan(algorithm, named_shapes, comm.size, EngineOptions(**options),
                    momentum=momentum, stacklevel=3)
        names = [name for name, _ in named_shapes]
        self._config = _Untracked(plan=plan, comm=comm, names=names,
                                  index={name: i for i, name in enumerate(names)},
                                  learning_rate=learning_rate, momentum_source=momentum_source,
                                  momentum_scale=momentum_scale,
                                  prefix=comm.new_scope(), agreed=False,
                                  dtype=tf.as_dtype(plan.precision))
        with tf.init_scope(), tf.device(device):
            self._local = _Untracked(
                step=tf.Variable(0, dtype=tf.int64, trainable=False, name="step"),
                warmup_steps=tf.Variable(plan.options.warmup_steps, dtype=tf.int64,
                                         trainable=False, name="warmup_steps"),
                last_compressed=tf.Variable(False, trainable=False, name="last_compressed"),
                last_skipped=tf.Variable(False, trainable=False, name="last_skipped"),
                skipped_steps=tf.Variable(0, dtype=tf.int64, trainable=False,
                                          name="skipped_steps"),
                state={b.index: {name: tf.Variable(tf.zeros([numel], self._config.dtype),
                                                   trainable=False,
                                                   name=f"{name}_{b.index}")
                                 for name, numel in plan.state_layout(b).items()}
                       for b in plan.buckets})
            with tf.device("/cpu:0"):
                self.snapshot = tf.Variable("", trainable=False, name="state_snapshot")

    # --- configuration and state, read-only views ---------------------------------------------------

    plan = property(lambda self: self._config.plan)
    algorithm = property(lambda self: self._config.plan.algorithm)
    exchange = property(lambda self: self._config.plan.exchange)
    buckets = property(lambda self: self._config.plan.buckets)
    comm = property(lambda self: self._config.comm)
    names = property(lambda self: list(self._config.names))
    step = property(lambda self: self._local.step)
    warmup_steps = property(lambda self: self._local.warmup_steps)
    state = property(lambda self: self._local.state)
    #: Whether the last step ran the algorithm (and the worker momentum): a boolean variable.
    last_compressed = property(lambda self: self._local.last_compressed)
    #: Whether every rank skipped the last step (some rank's gradients had NaN or Inf), and how
    #: many steps were skipped: variables.
    last_skipped = property(lambda self: self._local.last_skipped)
    skipped_steps = property(lambda self: self._local.skipped_steps)

    # --- the exchange -----------------------------------------------------------------------------

    def agree(self) -> None:
        """Once, eagerly (the wrappers call it when they build the engine): every rank allgathers
        a fingerprint of its configuration, and ranks built differently fail together with the
        same ``ValueError`` (:func:`horovod_squeeze.resume.decide`)."""
        cfg = self._config
        if cfg.agreed:
            return
        row = resume.agreement_row(cfg.plan, None, 0)
        with tf.device("/cpu:0"):
            gathered = run_to_end(cfg.comm, single(Collective(
                "allgather", tf.constant(row, tf.int64), "rows")), f"{cfg.prefix}.agree")
        resume.decide(np.reshape(gathered.numpy(), (cfg.comm.size, len(row))), cfg.comm.rank)
        cfg.agreed = True

    @tf.autograph.experimental.do_not_convert  # plain Python control flow: it runs at trace time
    def __call__(self, grads: list) -> list:
        """Averaged gradients (or model increments), in the order of ``names``; ``None`` stays
        ``None`` (and sends zeros, because other ranks may have a gradient there).

        If any rank's gradients hold NaN or Inf, every rank skips the step: NaN results, state and
        step unchanged, ``last_skipped`` set and ``skipped_steps`` counted, rank 0 prints the ranks.
        """
        cfg = self._config
        if len(grads) != len(cfg.names):
            raise ValueError(f"expected {len(cfg.names)} gradients, got {len(grads)}")
        if not cfg.agreed and tf.executing_eagerly():
            self.agree()
        flats = {b.index: self._flat(b, grads) for b in cfg.plan.buckets}
        skip = tf.constant(False)
        if flats:  # a flag every rank hears of; zeros travel instead of what is not finite
            bad = tf.logical_not(tf.reduce_all(
                tf.stack([tf.reduce_all(tf.math.is_finite(f)) for f in flats.values()])))
            flags = run_to_end(cfg.comm, single(Collective(
                "allgather", tf.reshape(tf.cast(bad, tf.float32), [1]), "flags")),
                f"{cfg.prefix}.finite")
            skip = tf.reduce_any(flags > 0)
            flats = {i: tf.where(bad, tf.zeros_like(f), f) for i, f in flats.items()}
            self._report_skip(skip, flags)
        step = tf.identity(self._local.step)
        rate = None if cfg.learning_rate is None else tf.cast(cfg.learning_rate(), cfg.dtype)
        # What changes after warm-up: compressed buckets, and every bucket with worker momentum.
        switching = [b for b in cfg.plan.buckets
                     if b.compressed or cfg.plan.momentum is not None]
        averaged = {b.index: self._run(b, flats[b.index], step, rate, skip, warm=True)
                    for b in cfg.plan.buckets if b not in switching}
        if switching:
            warm = step < self._local.warmup_steps
            run = lambda: [self._run(b, flats[b.index], step, rate, skip,  # noqa: E731
                                     warm=False) for b in switching]
            plain = lambda: [self._run(b, flats[b.index], step, rate, skip,  # noqa: E731
                                       warm=True) for b in switching]
            if tf.executing_eagerly():
                results = plain() if bool(warm) else run()
            else:
                results = tf.cond(warm, plain, run)
            averaged.update(zip((b.index for b in switching), results))
            self._local.last_compressed.assign(tf.logical_not(warm))
        self._log(step)
        averaged = {i: tf.where(skip, tf.fill(tf.shape(a), tf.constant(np.nan, a.dtype)), a)
                    for i, a in averaged.items()}
        with tf.control_dependencies([tf.group(list(averaged.values()))]):
            self._local.step.assign_add(tf.where(skip, tf.constant(0, tf.int64), 1))
            self._local.skipped_steps.assign_add(tf.where(skip, tf.constant(1, tf.int64), 0))
            self._local.last_skipped.assign(skip)
        out = [None] * len(grads)
        for bucket in cfg.plan.buckets:
            for name, shape, start, stop in bucket.spans():
                i = cfg.index[name]
                if grads[i] is not None:
                    value = tf.reshape(averaged[bucket.index][start:stop], shape)
                    out[i] = tf.cast(value, grads[i].dtype)
        return out

    def _flat(self, bucket, grads) -> tf.Tensor:
        parts = []
        for name, shape, _, _ in bucket.spans():
            grad = grads[self._config.index[name]]
            if grad is None:
                parts.append(tf.zeros([int(np.prod(shape))], self._config.dtype))
                continue
            if isinstance(grad, tf.IndexedSlices):
                grad = tf.convert_to_tensor(grad)
            if not grad.dtype.is_floating:
                raise TypeError(f"gradient of {name!r}: expected a floating-point tensor, "
                                f"got {grad.dtype.name}")
            if tuple(grad.shape) != shape:
                raise ValueError(f"gradient of {name!r} has shape {tuple(grad.shape)}, "
                                 f"its variable {shape}")
            parts.append(tf.reshape(tf.cast(grad, self._config.dtype), [-1]))
        return tf.concat(parts, axis=0)

    def _run(self, bucket, flat, step, rate, skip, *, warm: bool) -> tf.Tensor:
        cfg = self._config
        state = self._local.state[bucket.index]
        current = {name: variable.value() for name, variable in state.items()}
        before = dict(current)  # what a skipped step leaves
        scale = None
        if cfg.plan.momentum is not None and not warm:
            kept = current["momentum"]
            # Read the optimizer's momentum only on the step where warm-up ends.
            current["momentum"] = tf.cond(step == self._local.warmup_steps,
                                          lambda: self._momentum_start(bucket), lambda: kept)
            if cfg.momentum_scale is not None:
                scale = tf.concat([tf.reshape(tf.cast(cfg.momentum_scale(name), cfg.dtype),
                                              [-1]) for name in bucket.names], axis=0)
        steps = cfg.plan.run(codecs.on(), bucket, flat, current, step=step,
                             rank=cfg.comm.rank, warm=warm, learning_rate=rate,
                             momentum_scale=scale)
        result = run_to_end(cfg.comm, steps, f"{cfg.prefix}.b{bucket.index}")
        for name, value in result.state.items():
            state[name].assign(tf.where(skip, before[name], value))
        return result.output

    def _momentum_start(self, bucket) -> tf.Tensor:
        """Where the worker momentum starts when warm-up ends: the optimizer's momentum."""
        source = self._config.momentum_source
        parts = []
        for name, shape, start, stop in bucket.spans():
            value = None if source is None else source(name)
            parts.append(tf.zeros([stop - start], self._config.dtype) if value is None
                         else tf.reshape(tf.cast(value, self._config.dtype), [-1]))
        return tf.concat(parts, axis=0)

    def _report_skip(self, skip, flags) -> None:
        if self.comm.rank != 0:
            return

        _run_if(skip, lambda: tf.print(
            "horovod_squeeze: step", self._local.step, ": NaN or Inf in the gradients of rank(s)",
            tf.reshape(tf.where(flags > 0), [-1]), "; every rank skips the step, the algorithm's "
            "state unchanged", output_stream=sys.stderr))

    def _log(self, step) -> None:
        every = self._config.plan.options.log_every
        if not every or self.comm.rank != 0:
            return
        due = tf.equal((step + 1) % every, 0)
        compressed, plain = self.stats_of(True), self.stats_of(False)

        _run_if(due, lambda: tf.print("horovod_squeeze: step", step, tf.where(
            self._local.last_compressed, compressed.details(), plain.details())))

    # --- telemetry and state --------------------------------------------------------------------------

    def stats_of(self, compressed: bool, step: int = -1) -> StepStats:
        """Bytes this rank sends in a compressed (or warm-up) step: a function of the layout."""
        plan = self._config.plan
        return StepStats(step, plan.step_bytes(warm=not compressed, rank=self.comm.rank),
                         plan.fp32_bytes)

    @property
    def last_stats(self) -> StepStats | None:
        """Bytes of the last step on this rank (``None`` before the first); no timings: they would
        have to be taken inside the graph."""
        step = int(self._local.step.numpy())
        if step == 0:
            return None
        return self.stats_of(bool(self._local.last_compressed.numpy()), step - 1)

    def state_norms(self) -> dict[str, dict[str, float]]:
        """Per variable name: the norm of each of this rank's state tensors (a sharded server
        tensor: the shard this rank owns)."""
        numpy = {i: {n: v.numpy() for n, v in s.items()} for i, s in self._local.state.items()}
        return state_norms(self._config.plan, numpy, self.comm.rank)

    def scale_state_(self, factor: float) -> None:
        """Multiplies the state in gradient units by ``factor`` (e.g. old / new learning rate)."""
        for bucket_state in self._local.state.values():
            for name, variable in bucket_state.items():
                if name in self._config.plan.gradient_state():
                    variable.assign(variable * factor)



def _run_if(condition, action) -> None:
    """``action()`` where ``condition`` holds: at once when eager, as a ``tf.cond`` in a graph."""
    if tf.executing_eagerly():
        if bool(condition):
            action()
        return

    def run():
        action()
        return tf.constant(True)

    tf.cond(condition, run, lambda: tf.constant(False))
