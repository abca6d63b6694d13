"""Data-parallel Keras ``model.fit`` on scikit-learn's digits with Horovod and horovod-squeeze.

Run on 4 local ranks with DoubleSqueeze and 1-bit scaled-sign compression (``tf_keras``, so
``TF_USE_LEGACY_KERAS=1``):

    TF_USE_LEGACY_KERAS=1 horovodrun -np 4 --gloo python examples/keras_digits.py \
        --algorithm doublesqueeze --compressor scaledsign

The same network, data split, flags and schedule as ``examples/pytorch_digits.py``; ``--algorithm
none`` is Horovod's fp32 allreduce. The callbacks broadcast rank 0's initial weights, average the
epoch metrics over ranks, report bytes per step and residual norms, optionally warm up
uncompressed (``--warmup-epochs``) and keep every rank's residuals in ``--checkpoint-dir``
checkpoints. Only rank 0 shows progress: a bar on a terminal, a line per epoch in a log.
"""
import math
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import horovod.tensorflow.keras as hvd  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import horovod_squeeze.tensorflow.keras as hsk  # noqa: E402
from horovod_squeeze.progress import keras_verbose  # noqa: E402
from common import (  # noqa: E402
    algorithm, argument_parser, digits_split, engine_options, learning_rate, report,
)


# Registered: Horovod rebuilds the optimizer from its config, schedule included.
@tf.keras.utils.register_keras_serializable("horovod_squeeze_examples")
class WarmupCosine(tf.keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up over the first epoch, then cosine decay to zero (as the PyTorch example)."""

    def __init__(self, peak, steps_per_epoch, total_steps):
        self.peak, self.steps_per_epoch, self.total_steps = peak, steps_per_epoch, total_steps

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warmup = (step + 1) / self.steps_per_epoch
        cosine = 0.5 * (1 + tf.cos(math.pi * step / self.total_steps))
        return self.peak * tf.minimum(warmup, cosine)

    def get_config(self):
        return {"peak": self.peak, "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps}


def digits_net():
    return tf.keras.Sequential([
        tf.keras.layers.Conv2D(16, 3, padding="same", activation="relu", input_shape=(8, 8, 1)),
        tf.keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        tf.keras.layers.MaxPooling2D(2),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(128, activation="relu"),
        tf.keras.layers.Dense(10),
    ])


def main():
    parser = argument_parser(__doc__.split("\n")[0])
    parser.add_argument("--warmup-epochs", type=int, default=0,
                        help="uncompressed epochs first (WarmupCallback)")
    parser.add_argument("--checkpoint-dir", help="rank 0 saves weights, optimizer and every "
                        "rank's residuals here each epoch")
    args = parser.parse_args()
    hvd.init()
    tf.keras.utils.set_random_seed(args.seed)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)

    x_train, x_test, y_train, y_test = digits_split(args.seed)
    x_train, y_train = x_train[hvd.rank()::hvd.size(), ..., None], y_train[hvd.rank()::hvd.size()]
    steps_per_epoch = len(x_train) // args.batch_size
    schedule = WarmupCosine(learning_rate(args) * hvd.size(), steps_per_epoch,
                            args.epochs * steps_per_epoch)
    if args.optimizer == "sgd":
        optimizer = tf.keras.optimizers.SGD(schedule, momentum=args.momentum)
    else:
        optimizer = tf.keras.optimizers.Adam(schedule)
    compression = algorithm(args)
    if compression is None:
        optimizer = hvd.DistributedOptimizer(optimizer)
    else:
        optimizer = hsk.DistributedOptimizer(optimizer, compression=compression,
                                             **engine_options(args))
    model = digits_net()
    model.compile(optimizer=optimizer, metrics=["accuracy"],
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    callbacks = [hsk.callbacks.BroadcastGlobalVariablesCallback(root_rank=0),
                 hsk.callbacks.MetricAverageCallback()]
    if compression is not None:
        # The schedule moves the rate every step: keep what the residuals owe worth the same.
        callbacks += [hsk.callbacks.ResidualRescaleCallback(),
                      hsk.callbacks.CompressionStatsCallback()]
        if args.warmup_epochs:
            callbacks.append(hsk.callbacks.WarmupCallback(warmup_epochs=args.warmup_epochs))
        if args.checkpoint_dir:
            callbacks.append(hsk.callbacks.ResidualCheckpointCallback())
    if args.checkpoint_dir and hvd.rank() == 0:
        callbacks.append(tf.keras.callbacks.ModelCheckpoint(
            os.path.join(args.checkpoint_dir, "epoch{epoch:03d}"), save_weights_only=True))
    # Every rank holds the same model, so each computes the same held-out loss after each epoch.
    history = model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs,
                        steps_per_epoch=steps_per_epoch, callbacks=callbacks,
                        validation_data=(x_test[..., None], y_test),
                        verbose=keras_verbose(hvd.rank() == 0))

    _, accuracy = model.evaluate(x_test[..., None], y_test, verbose=0)
    accuracy = float(hvd.allreduce(np.float64(accuracy), name="test_accuracy"))
    if hvd.rank() == 0:
        stats = getattr(optimizer, "compression_stats", None)
        report(args, accuracy, stats, model.count_params(), hvd.size(), compression,
               steps_per_epoch=steps_per_epoch, test_losses=history.history["val_loss"])


if __name__ == "__main__":
    main()
