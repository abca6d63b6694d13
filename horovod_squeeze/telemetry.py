"""What a step sent and what residuals remain: the same records for every framework."""
from __future__ import annotations

import dataclasses

import numpy as np

from horovod_squeeze.buckets import Bucket
from horovod_squeeze.compressors import Compressor
from horovod_squeeze.exchange import PassBytes, fp32_allreduce_bytes, pass_bytes

__all__ = ["StepStats", "bucket_bytes", "residual_norms"]


@dataclasses.dataclass
class StepStats:
    """What one optimizer step sent and how long its parts took (this rank).

    Timings are ``None`` where they cannot be taken: inside a ``tf.function`` graph.
    """

    step: int
    bytes: PassBytes
    fp32_allreduce_bytes: int  # what a ring allreduce of the same gradients would send
    compress_seconds: float | None = None
    communicate_seconds: float | None = None  # time spent waiting on collectives
    decode_seconds: float | None = None

    @property
    def compression_ratio(self) -> float:
        """fp32 allreduce bytes over bytes sent: how many times fewer bytes this step sent."""
        return self.fp32_allreduce_bytes / max(self.bytes.sent, 1)

    def summary(self) -> str:
        return f"step {self.step}: {self.details()}"

    def details(self) -> str:
        """The summary without its step number: bytes, ratio and timings where taken."""
        line = (f"sent {self.bytes.sent} B "
                f"({self.compression_ratio:.1f}x fewer than fp32 allreduce)")
        if self.compress_seconds is not None:
            line += (f", compress {1e3 * self.compress_seconds:.1f} ms, communicate "
                     f"{1e3 * self.communicate_seconds:.1f} ms, decode "
                     f"{1e3 * self.decode_seconds:.1f} ms")
        return line


def bucket_bytes(compressor: Compressor, bucket: Bucket, num_ranks: int,
                 compressed: bool) -> PassBytes:
    """What one rank sends and receives for ``bucket`` in a step: its compressed exchange, or a
    plain fp32 allreduce (the small-tensor bucket, warm-up steps)."""
    if compressed and bucket.compressed:
        return pass_bytes(compressor, bucket.exchange, bucket.numel, num_ranks)
    ring = fp32_allreduce_bytes(bucket.numel, num_ranks)
    return PassBytes(ring, ring, 0, 0)


def residual_norms(buckets: list[Bucket], worker: dict, server: dict, *, rank: int,
                   num_ranks: int) -> dict[str, tuple[float, float]]:
    """Per parameter: (this rank's worker residual norm, norm of the server residual it owns).

    ``worker`` and ``server`` map bucket index to this rank's residuals as NumPy arrays; a sharded
    server residual is this rank's shard, placed at its offset in the bucket (zeros elsewhere).
    """
    norms = {}
    for bucket in buckets:
        own_worker, own_server = worker[bucket.index], server[bucket.index]
        if bucket.exchange == "sharded" and own_server.size:
            placed = np.zeros(own_server.size * num_ranks, np.float32)
            placed[rank * own_server.size:(rank + 1) * own_server.size] = own_server
            own_server = placed
        for name, _, start, stop in bucket.spans():
            norms[name] = (float(np.linalg.norm(own_worker[start:stop])),
                           float(np.linalg.norm(own_server[start:stop])))
    return norms
