"""What a step sent and what residuals remain: the same records for every framework."""
from __future__ import annotations

import dataclasses

import numpy as np

from horovod_squeeze.exchange import PassBytes

__all__ = ["StepStats", "state_norms"]


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


def state_norms(plan, state: dict, rank: int) -> dict[str, dict[str, float]]:
    """Per parameter: the norm of each of this rank's state tensors over that parameter.

    ``state`` maps bucket index to ``{name: NumPy array}`` (this rank's tensors); a sharded server
    tensor counts only the shard this rank owns, so summing squares over ranks gives the whole.
    """
    norms: dict[str, dict[str, float]] = {}
    for bucket in plan.buckets:
        for name, _, start, stop in bucket.spans():
            norms.setdefault(name, {})
        for spec in plan.state_specs(bucket):
            placed = np.zeros(bucket.numel, np.float32)
            first, last = plan.state_span(bucket, spec, rank)
            placed[first:last] = state[bucket.index][spec.name][:last - first]
            for name, _, start, stop in bucket.spans():
                norms[name][spec.name] = float(np.linalg.norm(placed[start:stop]))
    return norms
