"""The compressed gradient exchange for PyTorch: buckets launched during backward, residual state.

When a bucket's last gradient arrives, pass 1 starts asynchronously; :meth:`SqueezeEngine.finish`
completes every bucket (server stage, pass 2, decode) when the optimizer synchronizes. The layout
is :mod:`horovod_squeeze.buckets`, each rank's computation between collectives is
:mod:`horovod_squeeze.passes`; this module moves tensors, keeps state and times the parts.
"""
from __future__ import annotations

import dataclasses
import logging
import time

import torch

from horovod_squeeze import passes
from horovod_squeeze.algorithms import Algorithm
from horovod_squeeze.buckets import UNCOMPRESSED, Bucket, make_buckets
from horovod_squeeze.exchange import PassBytes, check_configuration, fp32_allreduce_bytes
from horovod_squeeze.telemetry import StepStats, bucket_bytes, residual_norms
from horovod_squeeze.torch import codecs

__all__ = ["SqueezeEngine", "StepStats", "UNCOMPRESSED"]

logger = logging.getLogger("horovod_squeeze")


@dataclasses.dataclass
class _Bucket(Bucket):
    """A bucket and what is in flight for it during one step."""

    grads: dict = dataclasses.field(default_factory=dict)
    dtypes: dict = dataclasses.field(default_factory=dict)
    handle: object = None
    plain: bool = False  # averaged uncompressed this step


class SqueezeEngine:
    """Compressed exchange of named gradients, with per-bucket worker and server residuals.

    Tune these:
      algorithm: ``DoubleSqueeze(C)``, ``ErrorFeedback(C)`` or ``NoFeedback(C)``.
      exchange: ``"sharded"`` (alltoall + allgather), ``"allgather"`` or ``"allreduce"`` (linear
        compressors only).
      bucket_cap_mb: fuse gradients into buckets of at most this many MB of float32.
      min_compress_numel: tensors smaller than this are averaged uncompressed, in one fused bucket.
      warmup_steps: the first steps are averaged uncompressed (residuals stay zero).
      log_every: log a summary line every this many steps on rank 0 (0: never).

    Internal state (``state_dict``): the step counter, worker residuals (per bucket, over its padded
    length) and server residuals (this rank's shard, or a replicated copy without sharding).
    """

    def __init__(self, algorithm: Algorithm, named_shapes: list[tuple[str, torch.Size]], *,
                 collectives, exchange: str = "sharded", bucket_cap_mb: float = 25.0,
                 min_compress_numel: int = 1024, warmup_steps: int = 0, log_every: int = 0):
        check_configuration(algorithm, named_shapes, exchange, warmup_steps=warmup_steps,
                            log_every=log_every)
        self.algorithm = algorithm
        self.exchange = exchange
        self.warmup_steps = warmup_steps
        self.log_every = log_every
        self.comm = collectives
        self.step = 0
        self.buckets = make_buckets(named_shapes, exchange, bucket_cap_mb=bucket_cap_mb,
                                    min_compress_numel=min_compress_numel, bucket_type=_Bucket)
        self._bucket_of = {name: b for b in self.buckets for name in b.names}
        size = self.comm.size
        self.worker_residuals = {b.index: torch.zeros(b.worker_numel(size)) for b in self.buckets}
        self.server_residuals = {b.index: torch.zeros(b.server_numel(size)) for b in self.buckets}
        self._results: dict[str, torch.Tensor] = {}
        self._launched: list[_Bucket] = []
        self._timing = {"compress": 0.0, "communicate": 0.0, "decode": 0.0}
        self._bytes = PassBytes(0, 0, 0, 0)
        self.last_stats: StepStats | None = None

    # --- the exchange -----------------------------------------------------------------------------

    def submit(self, name: str, grad: torch.Tensor) -> None:
        """Hands over one parameter's gradient; starts pass 1 once its bucket is complete."""
        bucket = self._bucket_of[name]
        if name in bucket.grads:
            raise RuntimeError(f"gradient of {name!r} submitted twice in one step")
        bucket.grads[name] = grad
        if len(bucket.grads) == len(bucket.names):
            self._launch(bucket)

    def result(self, name: str) -> torch.Tensor:
        """The averaged gradient of ``name`` (finishes every launched bucket on first use)."""
        if self._launched:
            self.finish()
        return self._results.pop(name)

    def _flat(self, bucket: _Bucket) -> torch.Tensor:
        bucket.dtypes = {name: bucket.grads[name].dtype for name in bucket.names}
        grads = [bucket.grads[name].detach().reshape(-1).to(torch.float32) for name in bucket.names]
        bucket.grads = {}
        return torch.cat(grads)

    def _launch(self, bucket: _Bucket) -> None:
        flat = self._flat(bucket)
        comm, name = self.comm, f"squeeze.step.b{bucket.index}"
        start = time.perf_counter()
        bucket.plain = not bucket.compressed or self.step < self.warmup_steps
        if bucket.plain:
            bucket.handle = comm.allreduce_average(flat, name + ".plain")
        elif bucket.exchange == "sharded":
            out = self._keep(self.worker_residuals[bucket.index], passes.sharded_pass1(
                codecs, self.algorithm, bucket, flat, self.worker_residuals[bucket.index],
                step=self.step, rank=comm.rank, size=comm.size))
            bucket.handle = comm.alltoall(out.payload, name + ".pass1")
        elif bucket.exchange == "allgather":
            out = self._keep(self.worker_residuals[bucket.index], passes.replicated_pass1(
                codecs, self.algorithm, bucket, flat, self.worker_residuals[bucket.index],
                step=self.step, rank=comm.rank))
            bucket.handle = comm.allgather(out.payload, name + ".pass1")
        else:  # allreduce of a linear compressor's values; ranks share the random stream
            out = self._keep(self.worker_residuals[bucket.index], passes.replicated_pass1(
                codecs, self.algorithm, bucket, flat, self.worker_residuals[bucket.index],
                step=self.step, rank=0))
            header, values = codecs.split_linear(self.algorithm.compressor, out.payload,
                                                 bucket.numel)
            bucket.handle = (header, comm.allreduce_average(values, name + ".pass1"))
        self._bytes += bucket_bytes(self.algorithm.compressor, bucket, comm.size,
                                    compressed=not bucket.plain)
        self._timing["compress"] += time.perf_counter() - start
        self._launched.append(bucket)

    @staticmethod
    def _keep(residual: torch.Tensor, sent: passes.Sent) -> passes.Sent:
        if sent.residual is not None:
            residual.copy_(sent.residual)
        return sent

    def finish(self) -> None:
        """Completes every launched bucket: server stage, pass 2, decode; then advances the step."""
        comm = self.comm
        in_pass2 = []
        for bucket in self._launched:
            if bucket.plain:
                self._store(bucket, self._wait(bucket.handle))
            elif bucket.exchange == "sharded":
                received = self._wait(bucket.handle)
                start = time.perf_counter()
                out = self._keep(self.server_residuals[bucket.index], passes.sharded_pass2(
                    codecs, self.algorithm, bucket, received, self.server_residuals[bucket.index],
                    step=self.step, rank=comm.rank, size=comm.size))
                self._timing["compress"] += time.perf_counter() - start
                in_pass2.append((bucket, comm.allgather(out.payload,
                                                        f"squeeze.step.b{bucket.index}.pass2")))
            elif bucket.exchange == "allgather":
                gathered = self._wait(bucket.handle)
                start = time.perf_counter()
                pieces = passes.split_payloads(codecs, self.algorithm, gathered, bucket.numel,
                                               comm.size)
                self._timing["decode"] += time.perf_counter() - start
                self._store(bucket, self._replicated_server(bucket, pieces))
            else:
                header, values_handle = bucket.handle
                values = self._wait(values_handle)
                start = time.perf_counter()
                mean = codecs.decompress(self.algorithm.compressor,
                                         codecs.join_linear(header, values), bucket.numel)
                self._timing["decode"] += time.perf_counter() - start
                self._store(bucket, self._replicated_server(bucket, [mean]))
        for bucket, handle in in_pass2:
            gathered = self._wait(handle)
            start = time.perf_counter()
            flat = passes.sharded_decode(codecs, self.algorithm, bucket, gathered, size=comm.size)
            self._timing["decode"] += time.perf_counter() - start
            self._store(bucket, flat)
        self._launched = []
        self._end_step()

    def _wait(self, handle):
        start = time.perf_counter()
        output = self.comm.wait(handle)
        self._timing["communicate"] += time.perf_counter() - start
        return output

    def _replicated_server(self, bucket: _Bucket, pieces) -> torch.Tensor:
        start = time.perf_counter()
        out = passes.replicated_server(codecs, self.algorithm, bucket, pieces,
                                       self.server_residuals[bucket.index], step=self.step)
        if out.residual is not None:
            self.server_residuals[bucket.index].copy_(out.residual)
        self._timing["compress"] += time.perf_counter() - start
        return out.decoded

    def _store(self, bucket: _Bucket, flat: torch.Tensor) -> None:
        for name, shape, start, stop in bucket.spans():
            self._results[name] = flat[start:stop].reshape(shape).to(bucket.dtypes[name])
        bucket.handle = None

    def _end_step(self) -> None:
        numel = sum(b.numel for b in self.buckets)
        self.last_stats = StepStats(self.step, self._bytes,
                                    fp32_allreduce_bytes(numel, self.comm.size),
                                    self._timing["compress"], self._timing["communicate"],
                                    self._timing["decode"])
        if self.log_every and self.comm.rank == 0 and (self.step + 1) % self.log_every == 0:
            logger.info("%s", self.last_stats.summary())
        self._timing = dict.fromkeys(self._timing, 0.0)
        self._bytes = PassBytes(0, 0, 0, 0)
        self.step += 1

    # --- state --------------------------------------------------------------------------------------

    def residual_norms(self) -> dict[str, tuple[float, float]]:
        """Per parameter: (this rank's worker residual norm, norm of the server residual it owns)."""
        return residual_norms(self.buckets,
                              {i: r.cpu().numpy() for i, r in self.worker_residuals.items()},
                              {i: r.cpu().numpy() for i, r in self.server_residuals.items()},
                              rank=self.comm.rank, num_ranks=self.comm.size)
