"""The compressed gradient exchange for TensorFlow: one call per step, eager or in ``tf.function``.

TensorFlow hands Horovod every gradient of a step at once, so one call of the engine,
``engine(grads)``, runs every bucket's passes; Horovod's ops overlap them in its background thread. The layout
is :mod:`horovod_squeeze.buckets`, each rank's computation between collectives is
:mod:`horovod_squeeze.passes`, as in the PyTorch engine.

State is ``tf.Variable``\\ s created once, in the constructor (lifted out of any ``tf.function``
being traced). The per-rank residuals and the step counter are deliberately *not* tracked: they
differ between ranks, so they must neither be broadcast from rank 0 nor be saved from rank 0 alone.
Checkpoints carry a gathered copy instead (:mod:`horovod_squeeze.tensorflow.state`).
"""
from __future__ import annotations

import itertools

import numpy as np
import tensorflow as tf

from horovod_squeeze import passes
from horovod_squeeze.algorithms import Algorithm
from horovod_squeeze.buckets import UNCOMPRESSED, make_buckets
from horovod_squeeze.exchange import PassBytes, check_configuration, fp32_allreduce_bytes
from horovod_squeeze.telemetry import StepStats, bucket_bytes, residual_norms
from horovod_squeeze.tensorflow import codecs
from horovod_squeeze.tensorflow.collectives import HorovodCollectives

__all__ = ["SqueezeEngine", "StepStats", "UNCOMPRESSED"]

_engine_ids = itertools.count()


class _Untracked:
    """A plain holder: what it keeps is invisible to tf.Module's variable and checkpoint tracking."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


class SqueezeEngine(tf.Module):
    """Compressed exchange of a fixed list of named gradients, with worker and server residuals.

    Tune these (as for the PyTorch engine):
      algorithm: ``DoubleSqueeze(C)``, ``ErrorFeedback(C)`` or ``NoFeedback(C)``.
      exchange: ``"sharded"`` (alltoall + allgather), ``"allgather"`` or ``"allreduce"`` (linear
        compressors only).
      bucket_cap_mb: fuse gradients into buckets of at most this many MB of float32.
      min_compress_numel: tensors smaller than this are averaged uncompressed, in one fused bucket.
      warmup_steps: the first steps are averaged uncompressed (a variable: callbacks may move it).
      log_every: print a summary line every this many steps on rank 0 (0: never).
      checkpoint_residuals: keep a gathered copy of every rank's residuals for checkpoints
        (``ranks x`` the worker residuals' memory, in host memory).
    """

    def __init__(self, algorithm: Algorithm, named_shapes, *, collectives=None,
                 exchange: str = "sharded", bucket_cap_mb: float = 25.0,
                 min_compress_numel: int = 1024, warmup_steps: int = 0, log_every: int = 0,
                 checkpoint_residuals: bool = True):
        super().__init__(name="squeeze_engine")
        named_shapes = [(name, tuple(int(d) for d in shape)) for name, shape in named_shapes]
        check_configuration(algorithm, named_shapes, exchange, warmup_steps=warmup_steps,
                            log_every=log_every)
        comm = collectives if collectives is not None else HorovodCollectives()
        buckets = make_buckets(named_shapes, exchange, bucket_cap_mb=bucket_cap_mb,
                               min_compress_numel=min_compress_numel)
        index = {name: i for i, (name, _) in enumerate(named_shapes)}
        self._config = _Untracked(algorithm=algorithm, exchange=exchange, comm=comm,
                                  buckets=buckets, names=[n for n, _ in named_shapes],
                                  index=index, log_every=log_every,
                                  prefix=f"squeeze{next(_engine_ids)}")
        with tf.init_scope():
            size = comm.size
            self._local = _Untracked(
                step=tf.Variable(0, dtype=tf.int64, trainable=False, name="step"),
                warmup_steps=tf.Variable(warmup_steps, dtype=tf.int64, trainable=False,
                                         name="warmup_steps"),
                last_compressed=tf.Variable(False, trainable=False, name="last_compressed"),
                worker=[tf.Variable(tf.zeros([b.worker_numel(size)]), trainable=False,
                                    name=f"worker_residual_{b.index}") for b in buckets],
                server=[tf.Variable(tf.zeros([b.server_numel(size)]), trainable=False,
                                    name=f"server_residual_{b.index}") for b in buckets])
            if checkpoint_residuals:
                with tf.device("/cpu:0"):
                    self.snapshot_step = tf.Variable(-1, dtype=tf.int64, trainable=False,
                                                     name="snapshot_step")
                    self.worker_snapshots = [
                        tf.Variable(tf.zeros([size, b.numel if b.compressed else 0]),
                                    trainable=False, name=f"worker_snapshot_{b.index}")
                        for b in buckets]
                    self.server_snapshots = [
                        tf.Variable(tf.zeros([b.numel if b.compressed else 0]), trainable=False,
                                    name=f"server_snapshot_{b.index}") for b in buckets]

    # --- configuration and state, read-only views ---------------------------------------------------

    algorithm = property(lambda self: self._config.algorithm)
    exchange = property(lambda self: self._config.exchange)
    buckets = property(lambda self: self._config.buckets)
    comm = property(lambda self: self._config.comm)
    names = property(lambda self: list(self._config.names))
    step = property(lambda self: self._local.step)
    warmup_steps = property(lambda self: self._local.warmup_steps)
    worker_residuals = property(lambda self: list(self._local.worker))
    server_residuals = property(lambda self: list(self._local.server))

    # --- the exchange -----------------------------------------------------------------------------

    @tf.autograph.experimental.do_not_convert  # plain Python control flow: it runs at trace time
    def __call__(self, grads: list) -> list:
        """Averaged gradients, in the order of ``names``; ``None`` stays ``None`` (and sends zeros,
        because other ranks may have a gradient there)."""
        cfg = self._config
        if len(grads) != len(cfg.names):
            raise ValueError(f"expected {len(cfg.names)} gradients, got {len(grads)}")
        flats = [self._flat(bucket, grads) for bucket in cfg.buckets]
        step = tf.identity(self._local.step)
        compressed = [b for b in cfg.buckets if b.compressed]
        averaged = {b.index: self._plain(b, flats[b.index])
                    for b in cfg.buckets if not b.compressed}
        if compressed:
            compress = step >= self._local.warmup_steps
            run = lambda: [self._compressed(b, flats[b.index], step) for b in compressed]  # noqa
            warm = lambda: [self._plain(b, flats[b.index]) for b in compressed]  # noqa
            if tf.executing_eagerly():
                results = run() if bool(compress) else warm()
            else:
                results = tf.cond(compress, run, warm)
            averaged.update(zip((b.index for b in compressed), results))
            self._local.last_compressed.assign(compress)
        self._log(step)
        with tf.control_dependencies([tf.group(list(averaged.values()))]):
            self._local.step.assign_add(1)
        out = [None] * len(grads)
        for bucket in cfg.buckets:
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
                parts.append(tf.zeros([int(np.prod(shape))]))
                continue
            if isinstance(grad, tf.IndexedSlices):
                grad = tf.convert_to_tensor(grad)
            if not grad.dtype.is_floating:
                raise TypeError(f"gradient of {name!r}: expected a floating-point tensor, "
                                f"got {grad.dtype.name}")
            if tuple(grad.shape) != shape:
                raise ValueError(f"gradient of {name!r} has shape {tuple(grad.shape)}, "
                                 f"its variable {shape}")
            parts.append(tf.reshape(tf.cast(grad, tf.float32), [-1]))
        # A data dependency, so no residual or step update can run before the check fails.
        return tf.debugging.check_numerics(
            tf.concat(parts, axis=0), f"{bucket.describe()}: gradient has NaN or Inf values")

    def _collective_name(self, bucket, what: str) -> str:
        return f"{self._config.prefix}.b{bucket.index}.{what}"

    def _plain(self, bucket, flat) -> tf.Tensor:
        return self.comm.allreduce_average(flat, self._collective_name(bucket, "plain"))

    def _compressed(self, bucket, flat, step) -> tf.Tensor:
        cfg, comm = self._config, self.comm
        worker, server = self._local.worker[bucket.index], self._local.server[bucket.index]
        if bucket.exchange == "sharded":
            sent = _keep(worker, passes.sharded_pass1(codecs, cfg.algorithm, bucket, flat, worker,
                                                      step=step, rank=comm.rank, size=comm.size))
            received = comm.alltoall(sent.payload, self._collective_name(bucket, "pass1"))
            sent = _keep(server, passes.sharded_pass2(codecs, cfg.algorithm, bucket, received,
                                                      server, step=step, rank=comm.rank,
                                                      size=comm.size))
            gathered = comm.allgather(sent.payload, self._collective_name(bucket, "pass2"))
            return passes.sharded_decode(codecs, cfg.algorithm, bucket, gathered, size=comm.size)
        if bucket.exchange == "allgather":
            sent = _keep(worker, passes.replicated_pass1(codecs, cfg.algorithm, bucket, flat,
                                                         worker, step=step, rank=comm.rank))
            gathered = comm.allgather(sent.payload, self._collective_name(bucket, "pass1"))
            pieces = passes.split_payloads(codecs, cfg.algorithm, gathered, bucket.numel, comm.size)
        else:  # allreduce of a linear compressor's values; ranks share the random stream
            sent = _keep(worker, passes.replicated_pass1(codecs, cfg.algorithm, bucket, flat,
                                                         worker, step=step, rank=0))
            header, values = codecs.split_linear(cfg.algorithm.compressor, sent.payload,
                                                 bucket.numel)
            values = comm.allreduce_average(values, self._collective_name(bucket, "pass1"))
            pieces = [codecs.decompress(cfg.algorithm.compressor,
                                        codecs.join_linear(header, values), bucket.numel)]
        out = passes.replicated_server(codecs, cfg.algorithm, bucket, pieces, server, step=step)
        if out.residual is not None:
            server.assign(out.residual)
        return out.decoded

    def _log(self, step) -> None:
        every = self._config.log_every
        if not every or self.comm.rank != 0:
            return
        due = tf.equal((step + 1) % every, 0)
        compressed, plain = self.stats_of(True), self.stats_of(False)

        def report():
            line = tf.where(self._local.last_compressed, compressed.details(), plain.details())
            tf.print("horovod_squeeze: step", step, line)
            return tf.constant(True)

        if tf.executing_eagerly():
            if bool(due):
                report()
        else:
            tf.cond(due, report, lambda: tf.constant(False))

    # --- telemetry ----------------------------------------------------------------------------------

    def stats_of(self, compressed: bool, step: int = -1) -> StepStats:
        """Bytes this rank sends in a compressed (or warm-up) step: a function of the layout."""
        size, total = self.comm.size, PassBytes(0, 0, 0, 0)
        for bucket in self.buckets:
            total += bucket_bytes(self.algorithm.compressor, bucket, size, compressed)
        numel = sum(b.numel for b in self.buckets)
        return StepStats(step, total, fp32_allreduce_bytes(numel, size))

    @property
    def last_stats(self) -> StepStats | None:
        """Bytes of the last step on this rank (``None`` before the first); no timings: they would
        have to be taken inside the graph."""
        step = int(self._local.step.numpy())
        if step == 0:
            return None
        return self.stats_of(bool(self._local.last_compressed.numpy()), step - 1)

    def residual_norms(self) -> dict[str, tuple[float, float]]:
        """Per variable name: (this rank's worker residual norm, norm of the server residual it
        owns)."""
        return residual_norms(self.buckets,
                              {b.index: self._local.worker[b.index].numpy() for b in self.buckets},
                              {b.index: self._local.server[b.index].numpy() for b in self.buckets},
                              rank=self.comm.rank, num_ranks=self.comm.size)

    def scale_residuals(self, factor: float) -> None:
        """Multiplies every residual by ``factor`` (e.g. old / new learning rate)."""
        for residual in self._local.worker + self._local.server:
            residual.assign(residual * factor)


def _keep(residual: tf.Variable, sent: passes.Sent) -> passes.Sent:
    if sent.residual is not None:
        residual.assign(sent.residual)
    return sent
