"""Keras callbacks for compressed training, working on ``tf_keras`` (``TF_USE_LEGACY_KERAS=1``).

Horovod's own Keras callbacks import Keras 3's backend when Keras 3 is installed beside
``tf_keras`` (as with TensorFlow 2.16+), and ``MetricAverageCallback`` then fails at the end of the
first epoch; these use TensorFlow and Horovod's TensorFlow ops directly.

Order matters where noted: Keras calls callbacks in list order.

Example::

    callbacks = [
        hsk.callbacks.BroadcastGlobalVariablesCallback(root_rank=0),
        hsk.callbacks.WarmupCallback(warmup_epochs=1),
        hsk.callbacks.ResidualRescaleCallback(),
        hsk.callbacks.MetricAverageCallback(),
        hsk.callbacks.CompressionStatsCallback(),
        hsk.callbacks.ResidualCheckpointCallback(),
    ]
    if hvd.rank() == 0:
        callbacks.append(tf.keras.callbacks.ModelCheckpoint("ckpt/{epoch}", save_weights_only=True))
"""
from __future__ import annotations

import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf

from horovod_squeeze.tensorflow import state

__all__ = ["BroadcastGlobalVariablesCallback", "MetricAverageCallback",
           "CompressionStatsCallback", "WarmupCallback", "ResidualRescaleCallback",
           "ResidualCheckpointCallback", "DecentralizedCallback"]

Callback = tf.keras.callbacks.Callback


def _squeeze(callback, model):
    """The compressed exchange of ``model``'s optimizer; an error if it has none."""
    squeeze = getattr(getattr(model, "optimizer", None), "_squeeze", None)
    if squeeze is None:
        raise ValueError(f"{type(callback).__name__} needs a model compiled with "
                         "horovod_squeeze.tensorflow.keras.DistributedOptimizer and an algorithm")
    return squeeze


def _when_built(callback, model, action) -> None:
    """``action(engine)`` as soon as the engine exists: now for a built model (its engine is built
    from the trainable variables), else just before the first exchange."""
    squeeze = _squeeze(callback, model)
    if model.built and squeeze.engine is None:
        squeeze.build(model.trainable_variables)
    squeeze.when_built(action)


def _optimizer_variables(optimizer) -> list:
    variables = optimizer.variables
    return list(variables() if callable(variables) else variables)


class BroadcastGlobalVariablesCallback(Callback):
    """Broadcasts model and optimizer variables from ``root_rank`` so all ranks start alike.

    Model variables are broadcast when training begins; optimizer variables, which Keras creates
    during the first step, again after the first batch (as Horovod does). Residuals are per rank and
    are never broadcast. Put it first in the list.
    """

    def __init__(self, root_rank: int = 0):
        super().__init__()
        self.root_rank = root_rank
        self._done = False

    def on_train_begin(self, logs=None):
        # A model without an input shape has no weights before its first batch: the broadcast
        # after that batch covers them.
        if self.model.built and self.model.variables:
            hvd.broadcast_variables(self.model.variables, root_rank=self.root_rank)

    def on_train_batch_end(self, batch, logs=None):
        if self._done:
            return
        hvd.broadcast_variables(self.model.variables +
                                _optimizer_variables(self.model.optimizer),
                                root_rank=self.root_rank)
        self._done = True


class MetricAverageCallback(Callback):
    """Averages the epoch's metrics over ranks, so rank 0 reports (and checkpoints on) all ranks.

    Put it before callbacks that read epoch metrics (``ModelCheckpoint``, ``ReduceLROnPlateau``).
    """

    def on_epoch_end(self, epoch, logs=None):
        if not logs:
            return
        for name in sorted(logs):  # the same order, so the same collective names, on every rank
            value = logs[name]
            if isinstance(value, (int, float, np.floating, np.integer)) or (
                    tf.is_tensor(value) and value.shape.rank == 0):
                averaged = hvd.allreduce(tf.constant(float(value), tf.float64), op=hvd.Average,
                                         name=f"squeeze.metric.{name}")
                logs[name] = float(averaged.numpy())


class CompressionStatsCallback(Callback):
    """Adds bytes per step, the ratio to fp32 allreduce and residual norms to the Keras logs.

    Batch logs get ``squeeze_bytes`` and ``squeeze_ratio``; epoch logs also get
    ``squeeze_<state>_norm`` for each of the algorithm's named state (for DoubleSqueeze
    ``squeeze_worker_residual_norm`` and ``squeeze_server_residual_norm``; this rank's, over all
    variables). With ``log_dir``, rank 0 also writes them to TensorBoard. Put it before
    ``TensorBoard`` and ``ProgbarLogger`` callbacks so they see the values.
    """

    def __init__(self, log_dir: str | None = None):
        super().__init__()
        self.log_dir = log_dir
        self._writer = None

    def on_train_begin(self, logs=None):
        _squeeze(self, self.model)
        if self.log_dir and hvd.rank() == 0:
            try:
                import tensorboard  # noqa: F401  (tf.summary writes nothing without it)
            except ImportError as error:
                raise ImportError("CompressionStatsCallback(log_dir=...) writes TensorBoard "
                                  "summaries: pip install tensorboard") from error
            self._writer = tf.summary.create_file_writer(self.log_dir)

    def _stats(self, logs):
        stats = self.model.optimizer.compression_stats
        if stats is not None and logs is not None:
            logs["squeeze_bytes"] = float(stats.bytes.sent)
            logs["squeeze_ratio"] = float(stats.compression_ratio)
        return stats

    def on_train_batch_end(self, batch, logs=None):
        self._stats(logs)

    def on_epoch_end(self, epoch, logs=None):
        logs = {} if logs is None else logs
        stats = self._stats(logs)
        squares: dict[str, float] = {}
        for per_state in self.model.optimizer.state_norms().values():
            for name, norm in per_state.items():
                squares[name] = squares.get(name, 0.0) + norm * norm
        keys = ["squeeze_bytes", "squeeze_ratio"]
        for name, square in squares.items():
            logs[f"squeeze_{name}_norm"] = float(np.sqrt(square))
            keys.append(f"squeeze_{name}_norm")
        if self._writer is not None and stats is not None:
            with self._writer.as_default(step=epoch):
                for key in keys:
                    tf.summary.scalar(key, logs[key])
            self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class WarmupCallback(Callback):
    """Uncompressed averaging for the first ``warmup_epochs`` epochs or ``warmup_steps`` steps.

    Counted from the start of this ``fit`` (``initial_epoch`` included), then every step is
    compressed. Residuals stay zero while warming up.
    """

    def __init__(self, warmup_epochs: int = 0, warmup_steps: int = 0):
        super().__init__()
        if warmup_epochs < 0 or warmup_steps < 0 or (warmup_epochs and warmup_steps):
            raise ValueError("give one of warmup_epochs and warmup_steps, >= 0")
        self.warmup_epochs = warmup_epochs
        self.warmup_steps = warmup_steps

    def on_train_begin(self, logs=None):
        if self.warmup_steps:
            _when_built(self, self.model, lambda engine: engine.warmup_steps.assign(
                int(engine.step.numpy()) + self.warmup_steps))

    def on_epoch_begin(self, epoch, logs=None):
        if self.warmup_epochs:
            until = np.iinfo(np.int64).max if epoch < self.warmup_epochs else 0
            _when_built(self, self.model, lambda engine: engine.warmup_steps.assign(until))


class ResidualRescaleCallback(Callback):
    """Keeps residuals worth the same update when the learning rate changes.

    Residuals hold gradient not yet applied, in gradient units; when the learning rate moves from
    ``a`` to ``b``, the algorithm's state in gradient units is scaled by ``a / b`` so that
    ``lr * residual`` is unchanged. Checks
    before every batch, so it sees changes made by ``LearningRateScheduler`` (epoch begin, put this
    after it) and by learning-rate schedules (per step).
    """

    def __init__(self):
        super().__init__()
        self._last = None

    def _learning_rate(self) -> float:
        optimizer = self.model.optimizer
        rate = optimizer.learning_rate
        if isinstance(rate, tf.keras.optimizers.schedules.LearningRateSchedule):
            rate = rate(optimizer.iterations)
        return float(tf.keras.backend.get_value(rate))

    def on_train_begin(self, logs=None):
        self._squeeze = _squeeze(self, self.model)
        self._last = None

    def on_train_batch_begin(self, batch, logs=None):
        rate = self._learning_rate()
        engine = self._squeeze.engine
        if self._last is not None and rate != self._last and engine is not None:
            if rate <= 0:
                raise ValueError(f"learning rate became {rate}: residuals in gradient units "
                                 "cannot be rescaled to it")
            engine.scale_state_(self._last / rate)
        self._last = rate


class ResidualCheckpointCallback(Callback):
    """Saves every rank's residuals with the optimizer's checkpoint and restores them on resume.

    At the end of each epoch (every ``every_epochs``) it gathers the residuals into the engine's
    snapshot variables, which ``ModelCheckpoint(save_weights_only=True)`` (TF format) and
    ``tf.train.Checkpoint`` save with the optimizer: put it *before* ``ModelCheckpoint``, on every
    rank. When training begins after ``model.load_weights(...)`` on every rank, each rank takes
    its residuals back, so training resumes exactly where the checkpoint was taken.
    """

    def __init__(self, every_epochs: int = 1):
        super().__init__()
        if every_epochs < 1:
            raise ValueError(f"every_epochs must be >= 1, got {every_epochs}")
        self.every_epochs = every_epochs
        self.restored = False

    def on_train_begin(self, logs=None):
        self.restored = False

        def restore(engine):
            self.restored = state.restore(engine)

        _when_built(self, self.model, restore)

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every_epochs == 0:
            state.gather(_squeeze(self, self.model).engine)


class DecentralizedCallback(Callback):
    """Decentralized training under ``model.fit``: after every batch (the compiled optimizer's local
    step, a plain Keras optimizer, no averaging) one gossip step of ``algorithm`` with this rank's
    neighbours in ``topology`` (:class:`horovod_squeeze.tensorflow.decentralized.Gossip`, built on
    the first batch). Place it after :class:`BroadcastGlobalVariablesCallback`. Launch with
    ``horovodrun --mpi``.

    Example::

        model.compile(optimizer=tf.keras.optimizers.SGD(0.1), loss=...)
        gossip = hsk.callbacks.DecentralizedCallback(
            hs.DeepSqueeze(hs.ScaledSign(), consensus_step=0.2), topology="ring")
        model.fit(x, y, callbacks=[hsk.callbacks.BroadcastGlobalVariablesCallback(0), gossip])
        print(gossip.gossip.bytes_sent_per_step)
    """

    def __init__(self, algorithm, topology="ring", *, comm=None, precision=None,
                 consensus_every=0):
        super().__init__()
        self._arguments = (algorithm, topology, comm, precision, consensus_every)
        self.gossip = None

    def on_train_batch_end(self, batch, logs=None):
        if self.gossip is None:
            from horovod_squeeze.tensorflow.decentralized import Gossip

            algorithm, topology, comm, precision, consensus_every = self._arguments
            self.gossip = Gossip(self.model.trainable_variables, algorithm, topology, comm=comm,
                                 precision=precision, consensus_every=consensus_every)
        self.gossip()
