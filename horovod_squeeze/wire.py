"""Wire formats: how a compressed tensor is laid out in the ``uint8`` payload that travels.

A payload is a sequence of named sections, each a little-endian array of one element type, packed
back to back with no padding between them. ``bits`` sections hold unsigned codes of ``width`` bits
each, written least-significant bit first into consecutive bits of the stream (bit ``i`` of the
section lives in byte ``i // 8`` at bit position ``i % 8``), zero-padded to a whole byte.

Every compressor describes its payload as a :class:`Layout` computed from ``(spec, numel)`` alone, so
the exchange layer knows every payload's size without communicating, and the NumPy, PyTorch and
TensorFlow codecs write the same bytes.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

__all__ = ["Section", "Layout", "ELEMENT_BYTES", "TRITS_PER_BYTE", "index_kind"]

#: Bytes per element of each fixed-width section kind (all little-endian).
ELEMENT_BYTES = {"float32": 4, "float16": 2, "int32": 4, "uint32": 4, "uint16": 2, "uint8": 1}
#: Base-3 digits in one byte of a ``trits`` section (3^5 = 243 <= 256).
TRITS_PER_BYTE = 5


@dataclasses.dataclass(frozen=True)
class Section:
    """``count`` elements of ``kind``: a key of :data:`ELEMENT_BYTES`, ``"bits"`` of ``width``, or
    ``"trits"``."""

    name: str
    kind: str
    count: int
    width: int = 0

    def __post_init__(self):
        if self.kind == "bits":
            if not 1 <= self.width <= 16:
                raise ValueError(f"bits section {self.name!r} needs 1 <= width <= 16, got {self.width}")
        elif self.kind != "trits" and self.kind not in ELEMENT_BYTES:
            raise ValueError(f"section {self.name!r} has unknown kind {self.kind!r}")
        if self.count < 0:
            raise ValueError(f"section {self.name!r} has negative count {self.count}")

    @property
    def nbytes(self) -> int:
        if self.kind == "bits":
            return -(-self.count * self.width // 8)
        if self.kind == "trits":
            return -(-self.count // TRITS_PER_BYTE)
        return self.count * ELEMENT_BYTES[self.kind]


@dataclasses.dataclass(frozen=True)
class Layout:
    """The sections of one payload, in wire order."""

    sections: tuple[Section, ...]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.sections)

    def spans(self) -> Iterator[tuple[Section, int, int]]:
        """Yields ``(section, start, stop)`` byte offsets within the payload."""
        start = 0
        for section in self.sections:
            yield section, start, start + section.nbytes
            start += section.nbytes

    def __getitem__(self, name: str) -> Section:
        for section in self.sections:
            if section.name == name:
                return section
        raise KeyError(name)


def index_kind(numel: int) -> str:
    """Narrowest index type for positions in a tensor of ``numel`` elements."""
    return "uint16" if numel <= 1 << 16 else "int32"
