"""What a step sent: per-rank byte counts and timings, the same record for every framework."""
from __future__ import annotations

import dataclasses

from horovod_squeeze.exchange import PassBytes

__all__ = ["StepStats"]


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
        line = (f"step {self.step}: sent {self.bytes.sent} B "
                f"({self.compression_ratio:.1f}x fewer than fp32 allreduce)")
        if self.compress_seconds is not None:
            line += (f", compress {1e3 * self.compress_seconds:.1f} ms, communicate "
                     f"{1e3 * self.communicate_seconds:.1f} ms, decode "
                     f"{1e3 * self.decode_seconds:.1f} ms")
        return line
