"""``DistributedGradientTape``: Horovod's tape with an error-compensated compressed exchange.

The tape is Horovod's own (``horovod.tensorflow.DistributedGradientTape``); only its
``_allreduce_grads`` is replaced. Training loops create a new tape every step, so the replacement
is cached by configuration, as Horovod caches its own: residuals live as long as the process.
"""
from __future__ import annotations

import horovod.tensorflow as hvd
import tensorflow as tf
from horovod.tensorflow.compression import Compression

from horovod_squeeze.algorithms import MODEL_INCREMENT, Algorithm
from horovod_squeeze.compressors import Compressor
from horovod_squeeze.model_step import check_plain_sgd
from horovod_squeeze.plan import EngineOptions, check_algorithm
from horovod_squeeze.tensorflow.gradients import SqueezeGradients

__all__ = ["DistributedGradientTape"]

_cached_gradients: dict[tuple, SqueezeGradients] = {}


def DistributedGradientTape(gradtape, device_dense="", device_sparse="",
                            compression=Compression.none, sparse_as_dense=False, op=hvd.Average,
                            gradient_predivide_factor=1.0, num_groups=0, groups=None,
                            process_set=hvd.global_process_set, scale_local_gradients=True, *,
                            exchange="sharded", bucket_cap_mb=25.0, min_compress_numel=1024,
                            warmup_steps=0, log_every=0, optimizer=None, precision=None):
    """Wraps ``gradtape`` so ``gradient()`` averages through a compressed, error-compensated exchange.

    Arguments are Horovod's (``horovod.tensorflow.DistributedGradientTape``), except:

    Args:
      compression: an algorithm, e.g. ``hs.DoubleSqueeze(hs.ScaledSign())``. Horovod's own
        ``Compression.none`` / ``Compression.fp16`` (or :class:`StockCompression`) give Horovod's
        tape unchanged.
      exchange, bucket_cap_mb, min_compress_numel, warmup_steps, log_every, precision: see
        :class:`horovod_squeeze.plan.EngineOptions` (``precision``: by default float64 when every
        variable is float64, else float32).
      optimizer: the optimizer that will apply the gradients, required for an algorithm whose
        output is a model increment and ignored for the others. Such an algorithm takes the model
        step itself and needs the optimizer's learning rate, so the optimizer must be plain SGD:
        ``tf.keras.optimizers.SGD`` with ``momentum=0``, ``nesterov=False``, no ``weight_decay``
        (Keras decouples it from the gradient: put an L2 term in the loss) and no clipping
        (anything else is a ``ValueError``). ``gradient()`` then returns ``-increment / lr``, with
        ``lr`` the rate the optimizer's next ``apply_gradients`` uses (a schedule at its
        ``iterations``), so ``optimizer.apply_gradients(zip(grads, variables))`` adds the increment
        up to one float32 rounding (of ``-increment / lr`` times ``lr``), the same on every rank.

    The returned tape also has ``squeeze``: the
    :class:`~horovod_squeeze.tensorflow.gradients.SqueezeGradients` shared by every tape of this
    configuration; its ``engine`` has ``last_stats``, ``state_norms()`` and the algorithm's ``state``.

    Example::

        import horovod.tensorflow as hvd
        import horovod_squeeze as hs
        import horovod_squeeze.tensorflow as hstf

        @tf.function
        def train_step(x, y):
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=True))
            tape = hstf.DistributedGradientTape(tape, compression=hs.DoubleSqueeze(hs.ScaledSign()))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))

    With an algorithm that updates the model, pass the (plain SGD) optimizer too:
    ``hstf.DistributedGradientTape(tape, compression=algorithm, optimizer=optimizer)``.
    """
    if isinstance(compression, Compressor):
        check_algorithm(compression)
    if not isinstance(compression, Algorithm):
        return hvd.DistributedGradientTape(
            gradtape, device_dense, device_sparse, compression, sparse_as_dense, op,
            gradient_predivide_factor, num_groups, groups, process_set, scale_local_gradients)
    _check_horovod_options(op, gradient_predivide_factor, num_groups, groups, compression)
    updates_model = compression.output == MODEL_INCREMENT
    if updates_model:
        if optimizer is None:
            raise ValueError(f"{compression!r} takes the model step itself (it outputs a model "
                             "increment) and needs the learning rate of the optimizer that "
                             "applies the gradients: pass optimizer=, a plain "
                             "tf.keras.optimizers.SGD")
        _check_plain_sgd(compression, optimizer)
    tape = hvd.DistributedGradientTape(
        gradtape, device_dense, device_sparse, Compression.none, sparse_as_dense, op,
        gradient_predivide_factor, process_set=process_set,
        scale_local_gradients=scale_local_gradients)
    options = EngineOptions(exchange, bucket_cap_mb, min_compress_numel, warmup_steps, log_every,
                            precision)
    # The cached wrapper keeps the optimizer alive, so its id is not reused while the key exists.
    key = (compression, op, gradient_predivide_factor, process_set.process_set_id, options,
           id(optimizer) if updates_model else None)
    if key not in _cached_gradients:
        _cached_gradients[key] = SqueezeGradients(
            compression, op_is_sum=op == hvd.Sum,
            gradient_predivide_factor=gradient_predivide_factor, process_set=process_set,
            options=options,
            learning_rate=(lambda: _learning_rate(optimizer)) if updates_model else None,
            increment_as_gradient=updates_model)
    squeeze = _cached_gradients[key]
    tape._allreduce_grads = squeeze
    tape.squeeze = squeeze
    return tape


def _check_horovod_options(op, gradient_predivide_factor, num_groups, groups, algorithm) -> None:
    if op not in (hvd.Average, hvd.Sum):
        raise ValueError("compressed exchanges average gradients; op must be hvd.Average or hvd.Sum")
    if num_groups or groups is not None:
        raise ValueError("groups/num_groups select Horovod's allreduce fusion; compressed "
                         "exchanges fuse gradients into buckets instead: use bucket_cap_mb")
    if gradient_predivide_factor <= 0:
        raise ValueError(f"gradient_predivide_factor must be > 0, got {gradient_predivide_factor}")


#: The optimizer an algorithm that updates the model supports (horovod_squeeze.model_step).
_PLAIN_SGD = ("tf.keras.optimizers.SGD with momentum=0, nesterov=False, no weight_decay (Keras "
              "decouples it from the gradient: put an L2 term in the loss instead) and no "
              "clipnorm, clipvalue or global_clipnorm (they would clip the model step)")


def _check_plain_sgd(algorithm, optimizer) -> None:
    """Refuses any optimizer but plain SGD for an algorithm that takes the model step itself."""
    settings = {key: getattr(optimizer, key, None)
                for key in ("momentum", "nesterov", "weight_decay", "clipnorm", "clipvalue",
                            "global_clipnorm")}
    check_plain_sgd(algorithm, optimizer, is_sgd=isinstance(optimizer, tf.keras.optimizers.SGD),
                    settings=settings, plain_sgd=_PLAIN_SGD)


def _learning_rate(optimizer) -> tf.Tensor:
    """The rate ``optimizer``'s next ``apply_gradients`` steps with, as float32: a schedule at
    ``iterations``, since ``optimizer.learning_rate`` keeps the last step's rate until
    ``apply_gradients`` evaluates the schedule, after the exchange."""
    rate = optimizer._learning_rate
    if isinstance(rate, tf.keras.optimizers.schedules.LearningRateSchedule):
        rate = rate(optimizer.iterations)
    return tf.cast(rate, tf.float32)
