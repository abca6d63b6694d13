"""``DistributedGradientTape``: Horovod's tape with an error-compensated compressed exchange.

The tape is Horovod's own (``horovod.tensorflow.DistributedGradientTape``); only its
``_allreduce_grads`` is replaced. Training loops create a new tape every step, so the replacement
is cached by configuration, as Horovod caches its own: residuals live as long as the process.
"""
from __future__ import annotations

import horovod.tensorflow as hvd
from horovod.tensorflow.compression import Compression

from horovod_squeeze.algorithms import MODEL_INCREMENT, Algorithm
from horovod_squeeze.compressors import Compressor
from horovod_squeeze.plan import EngineOptions, check_algorithm
from horovod_squeeze.tensorflow.gradients import SqueezeGradients

__all__ = ["DistributedGradientTape"]

_cached_gradients: dict[tuple, SqueezeGradients] = {}


def DistributedGradientTape(gradtape, device_dense="", device_sparse="",
                            compression=Compression.none, sparse_as_dense=False, op=hvd.Average,
                            gradient_predivide_factor=1.0, num_groups=0, groups=None,
                            process_set=hvd.global_process_set, scale_local_gradients=True, *,
                            exchange="sharded", bucket_cap_mb=25.0, min_compress_numel=1024,
                            warmup_steps=0, log_every=0):
    """Wraps ``gradtape`` so ``gradient()`` averages through a compressed, error-compensated exchange.

    Arguments are Horovod's (``horovod.tensorflow.DistributedGradientTape``), except:

    Args:
      compression: an algorithm, e.g. ``hs.DoubleSqueeze(hs.ScaledSign())``. Horovod's own
        ``Compression.none`` / ``Compression.fp16`` (or :class:`StockCompression`) give Horovod's
        tape unchanged.
      exchange, bucket_cap_mb, min_compress_numel, warmup_steps, log_every: see
        :class:`horovod_squeeze.plan.EngineOptions`.


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
    """
    if isinstance(compression, Compressor):
        check_algorithm(compression)
    if not isinstance(compression, Algorithm):
        return hvd.DistributedGradientTape(
            gradtape, device_dense, device_sparse, compression, sparse_as_dense, op,
            gradient_predivide_factor, num_groups, groups, process_set, scale_local_gradients)
    _check_horovod_options(op, gradient_predivide_factor, num_groups, groups, compression)
    tape = hvd.DistributedGradientTape(
        gradtape, device_dense, device_sparse, Compression.none, sparse_as_dense, op,
        gradient_predivide_factor, process_set=process_set,
        scale_local_gradients=scale_local_gradients)
    options = EngineOptions(exchange, bucket_cap_mb, min_compress_numel, warmup_steps, log_every)
    key = (compression, op, gradient_predivide_factor, process_set.process_set_id, options)
    if key not in _cached_gradients:
        _cached_gradients[key] = SqueezeGradients(
            compression, op_is_sum=op == hvd.Sum,
            gradient_predivide_factor=gradient_predivide_factor, process_set=process_set,
            options=options)
    squeeze = _cached_gradients[key]
    tape._allreduce_grads = squeeze
    tape.squeeze = squeeze
    return tape


def _check_horovod_options(op, gradient_predivide_factor, num_groups, groups, algorithm) -> None:
    if algorithm.output == MODEL_INCREMENT:
        raise NotImplementedError(
            f"{algorithm!r} outputs a model increment, which needs the optimizer's learning rate; "
            "TensorFlow supports averaged-gradient algorithms only so far (PyTorch's "
            "DistributedOptimizer applies model increments)")
    if op not in (hvd.Average, hvd.Sum):
        raise ValueError("compressed exchanges average gradients; op must be hvd.Average or hvd.Sum")
    if num_groups or groups is not None:
        raise ValueError("groups/num_groups select Horovod's allreduce fusion; compressed "
                         "exchanges fuse gradients into buckets instead: use bucket_cap_mb")
    if gradient_predivide_factor <= 0:
        raise ValueError(f"gradient_predivide_factor must be > 0, got {gradient_predivide_factor}")
