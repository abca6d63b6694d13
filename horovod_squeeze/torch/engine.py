"""The compressed gradient exchange for PyTorch: buckets, the two passes, residual state, telemetry.

Gradients are fused into buckets in the order backward produces them (parameters in reverse
registration order, as DDP does). When a bucket's last gradient arrives, pass 1 starts
asynchronously; :meth:`SqueezeEngine.finish` completes every bucket (server stage, pass 2, decode)
when the optimizer synchronizes. The math of each stage is :mod:`horovod_squeeze.algorithms`; this
module only moves tensors and keeps state.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings

import torch

from horovod_squeeze.algorithms import (
    SERVER, WORKER, Algorithm, server_stage, stage_nonce, worker_stage,
)
from horovod_squeeze.exchange import (
    EXCHANGES, PassBytes, fp32_allreduce_bytes, pass_bytes, shard_numel, shard_valid_numel,
)
from horovod_squeeze.torch import codecs

__all__ = ["SqueezeEngine", "StepStats", "UNCOMPRESSED"]

logger = logging.getLogger("horovod_squeeze")

#: Exchange of buckets whose tensors are below ``min_compress_numel``: a plain fp32 allreduce.
UNCOMPRESSED = "uncompressed"


@dataclasses.dataclass
class StepStats:
    """What one optimizer step sent and how long its parts took (this rank)."""

    step: int
    bytes: PassBytes
    fp32_allreduce_bytes: int  # what a ring allreduce of the same gradients would send
    compress_seconds: float
    communicate_seconds: float  # time spent waiting on collectives
    decode_seconds: float

    @property
    def compression_ratio(self) -> float:
        """fp32 allreduce bytes over bytes sent: how many times fewer bytes this step sent."""
        return self.fp32_allreduce_bytes / max(self.bytes.sent, 1)


@dataclasses.dataclass
class _Bucket:
    index: int
    names: list[str]
    shapes: list[torch.Size]
    exchange: str
    numel: int = 0
    offsets: list[int] = dataclasses.field(default_factory=list)
    grads: dict = dataclasses.field(default_factory=dict)
    handle: object = None
    send_nbytes: int = 0
    dtypes: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        offset = 0
        for shape in self.shapes:
            self.offsets.append(offset)
            offset += math.prod(shape)
        self.numel = offset


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
        if not isinstance(algorithm, Algorithm):
            raise TypeError("compression must be an algorithm such as "
                            "horovod_squeeze.DoubleSqueeze(horovod_squeeze.ScaledSign()), "
                            f"got {algorithm!r}")
        if exchange not in EXCHANGES:
            raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
        if exchange == "allreduce" and not algorithm.compressor.linear:
            raise ValueError(
                f"exchange='allreduce' sums compressed values, which is only correct for linear "
                f"compressors (Identity, FP16, RandK); {algorithm.compressor!r} is not linear: "
                "use exchange='sharded' or 'allgather'")
        largest = max((math.prod(shape) for _, shape in named_shapes), default=1)
        contract = algorithm.compressor.contract(largest)
        if algorithm.worker_feedback and contract.kind == "unbiased" and contract.omega > 1:
            warnings.warn(
                f"{algorithm!r}: error feedback needs a contractive compressor, and "
                f"{algorithm.compressor!r} is unbiased with omega = {contract.omega:.3g} on "
                f"{largest} entries, so its residuals can grow without bound; use "
                f"ToContractive({algorithm.compressor!r})", stacklevel=3)
        if not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be positive, got {bucket_cap_mb!r}")
        if min_compress_numel < 0 or warmup_steps < 0 or log_every < 0:
            raise ValueError("min_compress_numel, warmup_steps and log_every must be >= 0")
        self.algorithm = algorithm
        self.exchange = exchange
        self.warmup_steps = warmup_steps
        self.log_every = log_every
        self.comm = collectives
        self.step = 0
        self.buckets = self._make_buckets(named_shapes, bucket_cap_mb * 2 ** 20 / 4,
                                          min_compress_numel)
        self._bucket_of = {name: b for b in self.buckets for name in b.names}
        self.worker_residuals = {b.index: torch.zeros(self._worker_numel(b)) for b in self.buckets}
        self.server_residuals = {b.index: torch.zeros(self._server_numel(b)) for b in self.buckets}
        self._results: dict[str, torch.Tensor] = {}
        self._launched: list[_Bucket] = []
        self._timing = {"compress": 0.0, "communicate": 0.0, "decode": 0.0}
        self._bytes = PassBytes(0, 0, 0, 0)
        self.last_stats: StepStats | None = None

    # --- layout -----------------------------------------------------------------------------------

    def _make_buckets(self, named_shapes, cap_numel, min_compress_numel) -> list[_Bucket]:
        buckets: list[_Bucket] = []
        small = [(n, s) for n, s in named_shapes if math.prod(s) < min_compress_numel]
        large = [(n, s) for n, s in named_shapes if math.prod(s) >= min_compress_numel]
        current: list[tuple[str, torch.Size]] = []
        for name, shape in reversed(large):  # backward produces gradients roughly in reverse
            if current and sum(math.prod(s) for _, s in current) + math.prod(shape) > cap_numel:
                buckets.append(_Bucket(len(buckets), *map(list, zip(*current)), self.exchange))
                current = []
            current.append((name, shape))
        if current:
            buckets.append(_Bucket(len(buckets), *map(list, zip(*current)), self.exchange))
        if small:
            buckets.append(_Bucket(len(buckets), *map(list, zip(*reversed(small))), UNCOMPRESSED))
        return buckets

    def _worker_numel(self, bucket: _Bucket) -> int:
        if bucket.exchange == UNCOMPRESSED:
            return 0
        if bucket.exchange == "sharded":
            return shard_numel(bucket.numel, self.comm.size) * self.comm.size
        return bucket.numel

    def _server_numel(self, bucket: _Bucket) -> int:
        if bucket.exchange == UNCOMPRESSED:
            return 0
        if bucket.exchange == "sharded":
            return shard_numel(bucket.numel, self.comm.size)
        return bucket.numel

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
        for name in bucket.names:
            bucket.dtypes[name] = bucket.grads[name].dtype
        grads = [bucket.grads[name].detach().reshape(-1).to(torch.float32) for name in bucket.names]
        bucket.grads = {}
        return torch.cat(grads)

    def _launch(self, bucket: _Bucket) -> None:
        flat = self._flat(bucket)
        comm, name = self.comm, f"squeeze.step.b{bucket.index}"
        start = time.perf_counter()
        if bucket.exchange == UNCOMPRESSED or self.step < self.warmup_steps:
            bucket.handle = ("plain", comm.allreduce_average(flat, name + ".plain"))
            bucket.send_nbytes = fp32_allreduce_bytes(bucket.numel, comm.size)
        elif bucket.exchange == "sharded":
            bucket.handle = ("pass1", comm.alltoall(self._sharded_worker_stage(bucket, flat),
                                                    name + ".pass1"))
        elif bucket.exchange == "allgather":
            out = self._worker_stage(bucket, flat, self.worker_residuals[bucket.index],
                                     shard=0, rank=comm.rank)
            bucket.handle = ("pass1", comm.allgather(out.payload, name + ".pass1"))
            self._count(pass1=out.payload.numel())
        else:  # allreduce of a linear compressor's values; ranks share the random stream
            out = self._worker_stage(bucket, flat, self.worker_residuals[bucket.index],
                                     shard=0, rank=0)
            header, values = codecs.split_linear(self.algorithm.compressor, out.payload,
                                                 bucket.numel)
            bucket.handle = ("pass1", (header, comm.allreduce_average(values, name + ".pass1")))
            self._bytes += pass_bytes(self.algorithm.compressor, "allreduce", bucket.numel,
                                      comm.size)
        self._timing["compress"] += time.perf_counter() - start
        self._launched.append(bucket)

    def _worker_stage(self, bucket, x, residual, *, shard, rank, valid=None):
        out = worker_stage(codecs, self.algorithm, x, residual,
                           nonce=stage_nonce(self.step, bucket.index, shard, WORKER, rank),
                           name=f"bucket {bucket.index} ({', '.join(bucket.names[:3])}...)")
        if out.residual is not None:
            residual.copy_(out.residual)
            if valid is not None:
                residual[valid:] = 0
        return out

    def _sharded_worker_stage(self, bucket: _Bucket, flat: torch.Tensor) -> torch.Tensor:
        size = self.comm.size
        shard = shard_numel(bucket.numel, size)
        padded = torch.nn.functional.pad(flat, (0, shard * size - bucket.numel))
        residual = self.worker_residuals[bucket.index]
        payloads = []
        for owner in range(size):
            part = slice(owner * shard, (owner + 1) * shard)
            out = self._worker_stage(bucket, padded[part], residual[part], shard=owner,
                                     rank=self.comm.rank,
                                     valid=shard_valid_numel(bucket.numel, size, owner))
            payloads.append(out.payload)
        self._count(pass1=payloads[0].numel())
        return torch.cat(payloads)

    def _count(self, pass1: int = 0, pass2: int = 0) -> None:
        """Adds one payload per peer for each pass: what leaves (and reaches) this rank."""
        peers = self.comm.size - 1
        self._bytes += PassBytes(peers * pass1, peers * pass1, peers * pass2, peers * pass2)

    def finish(self) -> None:
        """Completes every launched bucket: server stage, pass 2, decode; then advances the step."""
        comm = self.comm
        in_pass2 = []
        for bucket in self._launched:
            kind, handle = bucket.handle
            if kind == "plain":
                self._store(bucket, self._wait(handle))
            elif bucket.exchange == "sharded":
                in_pass2.append((bucket, self._sharded_server_stage(bucket, self._wait(handle))))
            elif bucket.exchange == "allgather":
                gathered = self._wait(handle)
                start = time.perf_counter()
                payload_nbytes = gathered.numel() // comm.size
                pieces = [codecs.decompress(self.algorithm.compressor,
                                            gathered[r * payload_nbytes:(r + 1) * payload_nbytes],
                                            bucket.numel) for r in range(comm.size)]
                self._timing["decode"] += time.perf_counter() - start
                self._store(bucket, self._replicated_server_stage(bucket, pieces))
            else:
                header, values_handle = handle
                values = self._wait(values_handle)
                start = time.perf_counter()
                payload = codecs.join_linear(header, values)
                mean = codecs.decompress(self.algorithm.compressor, payload, bucket.numel)
                self._timing["decode"] += time.perf_counter() - start
                self._store(bucket, self._replicated_server_stage(bucket, [mean]))
        for bucket, handle in in_pass2:
            gathered = self._wait(handle)
            start = time.perf_counter()
            shard = shard_numel(bucket.numel, comm.size)
            payload_nbytes = gathered.numel() // comm.size
            decoded = [codecs.decompress(self.algorithm.compressor,
                                         gathered[r * payload_nbytes:(r + 1) * payload_nbytes], shard)
                       for r in range(comm.size)]
            self._timing["decode"] += time.perf_counter() - start
            self._store(bucket, torch.cat(decoded)[:bucket.numel])
        self._launched = []
        self._end_step()

    def _wait(self, handle):
        start = time.perf_counter()
        output = self.comm.wait(handle)
        self._timing["communicate"] += time.perf_counter() - start
        return output

    def _sharded_server_stage(self, bucket: _Bucket, received: torch.Tensor):
        comm = self.comm
        shard = shard_numel(bucket.numel, comm.size)
        valid = shard_valid_numel(bucket.numel, comm.size, comm.rank)
        start = time.perf_counter()
        piece_nbytes = received.numel() // comm.size
        pieces = []
        for r in range(comm.size):
            piece = codecs.decompress(self.algorithm.compressor,
                                      received[r * piece_nbytes:(r + 1) * piece_nbytes], shard)
            piece[valid:] = 0  # padding carries no data
            pieces.append(piece)
        residual = self.server_residuals[bucket.index]
        out = server_stage(codecs, self.algorithm, pieces, residual,
                           nonce=stage_nonce(self.step, bucket.index, comm.rank, SERVER),
                           name=f"bucket {bucket.index} shard {comm.rank}")
        if out.residual is not None:
            residual.copy_(out.residual)
            residual[valid:] = 0
        self._timing["compress"] += time.perf_counter() - start
        self._count(pass2=out.payload.numel())
        return comm.allgather(out.payload, f"squeeze.step.b{bucket.index}.pass2")

    def _replicated_server_stage(self, bucket: _Bucket, pieces) -> torch.Tensor:
        start = time.perf_counter()
        residual = self.server_residuals[bucket.index]
        out = server_stage(codecs, self.algorithm, pieces, residual,
                           nonce=stage_nonce(self.step, bucket.index, 0, SERVER),
                           name=f"bucket {bucket.index}")
        if out.residual is not None:
            residual.copy_(out.residual)
        self._timing["compress"] += time.perf_counter() - start
        return out.decoded

    def _store(self, bucket: _Bucket, flat: torch.Tensor) -> None:
        if bucket.exchange == UNCOMPRESSED or bucket.handle[0] == "plain":
            self._bytes += PassBytes(bucket.send_nbytes, bucket.send_nbytes, 0, 0)
        for name, shape, offset in zip(bucket.names, bucket.shapes, bucket.offsets):
            numel = math.prod(shape)
            self._results[name] = flat[offset:offset + numel].reshape(shape).to(bucket.dtypes[name])
        bucket.handle = None

    def _end_step(self) -> None:
        numel = sum(b.numel for b in self.buckets)
        self.last_stats = StepStats(self.step, self._bytes,
                                    fp32_allreduce_bytes(numel, self.comm.size),
                                    self._timing["compress"], self._timing["communicate"],
                                    self._timing["decode"])
        if self.log_every and self.comm.rank == 0 and (self.step + 1) % self.log_every == 0:
            stats = self.last_stats
            logger.info("step %d: sent %d B (%.1fx fewer than fp32 allreduce), compress %.1f ms, "
                        "communicate %.1f ms, decode %.1f ms", stats.step, stats.bytes.sent,
                        stats.compression_ratio, 1e3 * stats.compress_seconds,
                        1e3 * stats.communicate_seconds, 1e3 * stats.decode_seconds)
        self._timing = dict.fromkeys(self._timing, 0.0)
        self._bytes = PassBytes(0, 0, 0, 0)
        self.step += 1

    # --- state --------------------------------------------------------------------------------------

    def residual_norms(self) -> dict[str, tuple[float, float]]:
        """Per parameter: (this rank's worker residual norm, norm of the server residual it owns)."""
        norms = {}
        for bucket in self.buckets:
            worker = self.worker_residuals[bucket.index]
            server = self._server_view(bucket)
            for name, shape, offset in zip(bucket.names, bucket.shapes, bucket.offsets):
                numel = math.prod(shape)
                norms[name] = (float(worker[offset:offset + numel].norm()) if worker.numel() else 0.0,
                               float(server[offset:offset + numel].norm()) if server.numel() else 0.0)
        return norms

    def _server_view(self, bucket: _Bucket) -> torch.Tensor:
        """This rank's server residual placed at its bucket offsets (zeros elsewhere)."""
        residual = self.server_residuals[bucket.index]
        if bucket.exchange != "sharded":
            return residual
        shard = residual.numel()
        full = torch.zeros(shard * self.comm.size)
        full[self.comm.rank * shard:(self.comm.rank + 1) * shard] = residual
        return full[:bucket.numel]
