"""Bucket layout: which gradients are fused together, where each sits, and how each bucket travels.

Gradients are fused in the order backward produces them (parameters in reverse registration order,
as DDP does), up to a cap; tensors below ``min_compress_numel`` (biases, norms) share one bucket
that is averaged uncompressed (:data:`~horovod_squeeze.exchange.PLAIN`). The layout is a pure function of the parameter names and shapes, so
every rank and every framework builds the same buckets without communicating.
"""
from __future__ import annotations

import dataclasses
import math

from horovod_squeeze.exchange import PLAIN, Exchange

__all__ = ["Bucket", "make_buckets"]


@dataclasses.dataclass
class Bucket:
    """One fused flat buffer: parameter names, shapes and offsets, and its exchange."""

    index: int
    names: list[str]
    shapes: list[tuple[int, ...]]
    exchange: Exchange
    numel: int = 0
    offsets: list[int] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        self.shapes = [tuple(int(d) for d in shape) for shape in self.shapes]
        self.offsets, offset = [], 0
        for shape in self.shapes:
            self.offsets.append(offset)
            offset += math.prod(shape)
        self.numel = offset

    @property
    def compressed(self) -> bool:
        return self.exchange.compressed

    def spans(self):
        """(name, shape, start, stop) of every parameter in the flat buffer."""
        for name, shape, offset in zip(self.names, self.shapes, self.offsets):
            yield name, shape, offset, offset + math.prod(shape)

    def describe(self) -> str:
        more = "..." if len(self.names) > 3 else ""
        return f"bucket {self.index} ({', '.join(self.names[:3])}{more})"


def make_buckets(named_shapes, exchange: Exchange, *, bucket_cap_mb: float = 25.0,
                 min_compress_numel: int = 1024) -> list[Bucket]:
    """Buckets for ``named_shapes`` (registration order): large tensors in reverse, capped; then
    the small ones in one uncompressed bucket."""
    if not bucket_cap_mb > 0:
        raise ValueError(f"bucket_cap_mb must be positive, got {bucket_cap_mb!r}")
    if min_compress_numel < 0:
        raise ValueError(f"min_compress_numel must be >= 0, got {min_compress_numel!r}")
    names = [name for name, _ in named_shapes]
    if len(set(names)) != len(names):
        duplicated = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"parameter names must be unique, got duplicates {duplicated}")
    cap_numel = bucket_cap_mb * 2 ** 20 / 4
    small = [(n, s) for n, s in named_shapes if math.prod(s) < min_compress_numel]
    large = [(n, s) for n, s in named_shapes if math.prod(s) >= min_compress_numel]
    buckets, current = [], []

    def close(members, kind):
        buckets.append(Bucket(len(buckets), [n for n, _ in members], [s for _, s in members],
                                   kind))

    for name, shape in reversed(large):
        if current and sum(math.prod(s) for _, s in current) + math.prod(shape) > cap_numel:
            close(current, exchange)
            current = []
        current.append((name, shape))
    if current:
        close(current, exchange)
    if small:
        close(list(reversed(small)), PLAIN)
    return buckets
