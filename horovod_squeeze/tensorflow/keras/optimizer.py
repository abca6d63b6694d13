"""Keras ``DistributedOptimizer``: Horovod's Keras optimizer with a compressed exchange.

Built by Horovod's own ``horovod.tensorflow.keras.DistributedOptimizer`` (so ``model.fit``,
``backward_passes_per_step``, local variables and serialization behave as in Horovod); only its
``_allreduce_grads`` is replaced by a :class:`~horovod_squeeze.tensorflow.gradients.SqueezeGradients`.
The engine becomes a tracked attribute of the optimizer when it is built, so its residual snapshot
travels in the optimizer's checkpoints.
"""
from __future__ import annotations

import horovod.tensorflow as hvd
import horovod.tensorflow.keras as hvd_keras
import tensorflow as tf
from horovod.tensorflow.compression import Compression

from horovod_squeeze.algorithms import MODEL_INCREMENT, Algorithm
from horovod_squeeze.compressors import Compressor
from horovod_squeeze.momentum import (
    WorkerMomentum, adam_scale, frozen_adam_update, warmup_steps_for,
)
from horovod_squeeze.plan import EngineOptions, check_algorithm
from horovod_squeeze.telemetry import StepStats
from horovod_squeeze.tensorflow import codecs
from horovod_squeeze.tensorflow.gradients import SqueezeGradients
from horovod_squeeze.tensorflow.tape import (
    _check_horovod_options, _check_plain_sgd, _learning_rate,
)

__all__ = ["DistributedOptimizer"]


class _SqueezeOptimizer:
    """What the wrapped optimizer adds to Horovod's, mirroring the PyTorch optimizer."""

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """The wrapped optimizer rebuilt from ``config``, wrapped again with the same algorithm and
        options, and a fresh engine (Horovod's class alone would rebuild it around a plain
        allreduce)."""
        inner = cls.__bases__[0].from_config(config, custom_objects=custom_objects)
        return DistributedOptimizer(inner, **cls._squeeze_arguments)

    def build_squeeze(self, variables):
        """Builds the engine for ``variables`` now (callbacks do this at the start of ``fit``, so
        a checkpoint's residuals are restored before the first step)."""
        return self._squeeze.build(variables)

    @property
    def squeeze_engine(self):
        return self._squeeze.engine

    @property
    def compression_stats(self) -> StepStats | None:
        """Bytes of the last step on this rank (``None`` before the first step)."""
        engine = self._squeeze.engine
        return None if engine is None else engine.last_stats

    def state_norms(self) -> dict[str, dict[str, float]]:
        """Per variable name: the norm of each of this rank's algorithm state tensors."""
        engine = self._squeeze.engine
        return {} if engine is None else engine.state_norms()

    def update_step(self, gradient, variable):
        """Nothing when every rank skipped the step (some rank's gradients had NaN or Inf);
        otherwise :meth:`_squeeze_update_step`."""
        engine = self._squeeze.engine
        if engine is None:
            return self._squeeze_update_step(gradient, variable)
        if tf.executing_eagerly():
            if not bool(engine.last_skipped):
                self._squeeze_update_step(gradient, variable)
            return None

        def run():
            self._squeeze_update_step(gradient, variable)
            return tf.constant(True)

        tf.cond(engine.last_skipped, lambda: tf.constant(False), run)
        return None

    def _squeeze_update_step(self, gradient, variable):
        """The wrapped optimizer's step; for an algorithm that updates the model, adding its
        increment (a local variable's gradient, which did not go through the exchange, takes the
        wrapped plain SGD's step); after warm-up with worker momentum, SGD's step without its
        momentum (the exchange carried it) or Adam's frozen-variance step
        (:func:`horovod_squeeze.momentum.frozen_adam_update`)."""
        original = super(type(self), self).update_step
        if self._squeeze.algorithm.output == MODEL_INCREMENT:
            # Horovod keeps local variables in its aggregation helper when it has one.
            if variable.ref() in (self._agg_helper or self)._local_vars:
                return original(gradient, variable)
            variable.assign_add(gradient)
            return
        engine = self._squeeze.engine
        if self._squeeze_momentum_kind is None or engine is None:
            return original(gradient, variable)

        def momentum_step():
            lr = tf.cast(self.learning_rate, variable.dtype)
            if self._squeeze_momentum_kind == "sgd":
                variable.assign_add(-gradient * lr)
                return
            variable.assign(frozen_adam_update(
                variable, gradient, step=tf.cast(self.iterations + 1, variable.dtype),
                learning_rate=lr, beta1=self.beta_1))

        if tf.executing_eagerly():
            if bool(engine.last_compressed):
                return momentum_step()
            return original(gradient, variable)

        def branch(step):
            def run():
                step()
                return tf.constant(True)
            return run

        tf.cond(engine.last_compressed, branch(momentum_step),
                branch(lambda: original(gradient, variable)))


def _momentum_kind(optimizer, worker_momentum: bool) -> str | None:
    """Which worker momentum the wrapped optimizer gets: "sgd", "adam" or None."""
    if not worker_momentum:
        return None
    if isinstance(optimizer, tf.keras.optimizers.SGD):
        return "sgd" if optimizer.momentum else None
    if isinstance(optimizer, (tf.keras.optimizers.Adam, tf.keras.optimizers.AdamW)):
        return "adam"
    return None


def _worker_momentum(optimizer, kind: str | None) -> WorkerMomentum | None:
    if kind is None:
        return None
    if kind == "adam":
        if optimizer.amsgrad:
            raise ValueError("worker momentum does not support Adam's amsgrad (its maximum of "
                             "variances is not frozen); pass worker_momentum=False")
        return WorkerMomentum.adam(optimizer.beta_1, optimizer.beta_2)
    return WorkerMomentum(optimizer.momentum, nesterov=optimizer.nesterov)


def DistributedOptimizer(optimizer, name=None, device_dense="", device_sparse="",
                         compression=Compression.none, sparse_as_dense=False,
                         gradient_predivide_factor=1.0, op=hvd.Average,
                         backward_passes_per_step=1, average_aggregated_gradients=False,
                         num_groups=0, groups=None, process_set=hvd.global_process_set,
                         scale_local_gradients=True, *, exchange="sharded", bucket_cap_mb=25.0,
                         min_compress_numel=1024, warmup_steps=None, log_every=0,
                         worker_momentum=True, precision=None):
    """Wraps a ``tf_keras`` optimizer so gradients average through a compressed exchange.

    Arguments are Horovod's (``horovod.tensorflow.keras.DistributedOptimizer``), except
    ``compression``, an algorithm such as ``hs.DoubleSqueeze(hs.ScaledSign())`` (Horovod's own
    compressions give Horovod's optimizer unchanged), the engine options of
    :func:`horovod_squeeze.tensorflow.DistributedGradientTape` (``warmup_steps`` defaults to 0, or
    to 100 exact steps for Adam; ``precision`` to float64 when every variable is float64), and ``worker_momentum``, as in
    :func:`horovod_squeeze.torch.DistributedOptimizer`: with ``SGD`` (momentum > 0, Nesterov
    included), ``Adam`` or ``AdamW``, each worker's momentum (Adam's first moment) is what is
    compressed after warm-up, and Adam's variance is frozen when warm-up ends. Keras keeps SGD's
    velocity with the learning rate inside; the worker momentum starts from it divided by the
    current rate, and is in gradient units, as PyTorch's.

    An algorithm whose output is a model increment takes the model step itself: the engine gets
    the optimizer's learning rate (a schedule evaluated at ``iterations``, as ``apply_gradients``
    does), each variable gets its increment added instead of the wrapped step, and ``iterations``
    advances as usual. It supports plain SGD only: ``tf.keras.optimizers.SGD`` with
    ``momentum=0``, ``nesterov=False``, no ``weight_decay`` (Keras decouples it from the gradient:
    put an L2 term in the loss instead) and no ``clipnorm``/``clipvalue``/``global_clipnorm``;
    any other optimizer is refused with a ``ValueError`` (see :mod:`horovod_squeeze.model_step`).

    Example (run with ``TF_USE_LEGACY_KERAS=1``)::

        import horovod.tensorflow.keras as hvd
        import horovod_squeeze as hs
        import horovod_squeeze.tensorflow.keras as hsk

        hvd.init()
        optimizer = hsk.DistributedOptimizer(tf.keras.optimizers.SGD(0.1 * hvd.size()),
                                             compression=hs.DoubleSqueeze(hs.ScaledSign()))
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
        model.fit(x, y, callbacks=[hsk.callbacks.BroadcastGlobalVariablesCallback(0),
                                   hsk.callbacks.MetricAverageCallback()])
    """
    arguments = {key: value for key, value in locals().items() if key != "optimizer"}
    if isinstance(compression, Compressor):
        check_algorithm(compression)
    compressed = isinstance(compression, Algorithm)
    if compressed:
        _check_horovod_options(op, gradient_predivide_factor, num_groups, groups, compression)
        _check_plain_sgd(compression, optimizer)
    distributed = hvd_keras.DistributedOptimizer(
        optimizer, name=name, device_dense=device_dense, device_sparse=device_sparse,
        compression=Compression.none if compressed else compression,
        sparse_as_dense=sparse_as_dense, gradient_predivide_factor=gradient_predivide_factor,
        op=op, backward_passes_per_step=backward_passes_per_step,
        average_aggregated_gradients=average_aggregated_gradients, num_groups=num_groups,
        groups=groups, process_set=process_set, scale_local_gradients=scale_local_gradients)
    if not compressed:
        return distributed

    kind = _momentum_kind(optimizer, worker_momentum)
    warmup_steps = warmup_steps_for(kind, warmup_steps)

    def track(engine):  # a tracked attribute: the engine's snapshot is saved with the optimizer
        distributed._squeeze_engine = engine

    def slot(variables):
        """Variable -> the index of its optimizer slots, which exist before the first step."""
        distributed.build(variables)
        return lambda variable: distributed._index_dict[distributed._var_key(variable)]

    def momentum_source(variables):
        slot_of = slot(variables)

        def source(variable):
            index = slot_of(variable)
            if kind == "adam":
                return distributed._momentums[index]
            # Keras keeps SGD's velocity as -lr * momentum.
            return -distributed.momentums[index] / tf.cast(distributed.learning_rate, tf.float32)
        return source

    def momentum_scale(variables):  # Adam's preconditioner; T0 is the last warm-up step
        slot_of = slot(variables)

        def scale(variable):
            index = slot_of(variable)
            engine = distributed._squeeze.engine
            return adam_scale(codecs.on().xp, distributed._velocities[index],
                              variance_step=tf.cast(engine.warmup_steps, tf.float32),
                              beta2=distributed.beta_2, eps=distributed.epsilon)
        return scale

    squeeze = SqueezeGradients(
        compression, op_is_sum=op == hvd.Sum, gradient_predivide_factor=gradient_predivide_factor,
        process_set=process_set,
        options=EngineOptions(exchange, bucket_cap_mb, min_compress_numel, warmup_steps,
                              log_every, precision),
        on_build=track, momentum=_worker_momentum(optimizer, kind),
        momentum_source=momentum_source if kind else None,
        momentum_scale=momentum_scale if kind == "adam" else None,
        learning_rate=(lambda: _learning_rate(distributed))
        if compression.output == MODEL_INCREMENT else None)
    distributed._squeeze_momentum_kind = kind
    distributed._squeeze = squeeze
    distributed._allreduce_grads = squeeze
    helper = distributed._agg_helper
    if helper is not None:  # backward_passes_per_step > 1: Horovod's helper calls the exchange
        attribute = "allreduce_grads" if hasattr(helper, "allreduce_grads") else "_allreduce_grads"
        setattr(helper, attribute, squeeze)
    # Horovod made this class for this optimizer alone, and its methods call
    # super(self.__class__, self), so the additions go into it rather than into a subclass.
    for attribute, value in vars(_SqueezeOptimizer).items():
        if not attribute.startswith("__"):
            setattr(type(distributed), attribute, value)
    type(distributed)._squeeze_arguments = arguments
    return distributed
