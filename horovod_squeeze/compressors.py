"""Compressor specifications: what each compressor is, its math contract, and its wire layout.

A spec is a small immutable, hashable value (``TopK(0.01)``, ``ScaledSign()``); it holds the
hyperparameters and nothing else. The same spec drives the NumPy reference
(:mod:`horovod_squeeze.reference`) and the PyTorch and TensorFlow codecs, which all write the
byte-identical payload that :meth:`Compressor.layout` describes.

A compressor sees a flat vector of ``numel`` entries partitioned into **segments**: the lengths of
consecutive real segments (whole tensors of a bucket, or the parts of them that fall in one shard),
starting at entry 0. Entries past their sum are padding: they travel in no section and decode to
exactly 0. Every scale or norm is per segment (per block, where blocks are each segment cut into
``block_size`` pieces), so a small tensor never takes a large one's scale. ``segments=None`` is one
segment of ``numel`` entries: a single tensor.

Contracts follow ``docs/compressors.md``, for a flat vector ``v`` of ``d = numel`` entries:

- *contractive* with ``delta`` in (0, 1]: ``E||C(v) - v||^2 <= (1 - delta) ||v||^2``;
- *unbiased* with ``omega``: ``E Q(v) = v`` and ``E||Q(v) - v||^2 <= omega ||v||^2``;
- *biased*: only ``E||C(v) - v||^2 <= error_bound ||v||^2`` with ``error_bound >= 1`` (RMS-scaled sign).

An unbiased ``Q`` becomes contractive with ``delta = 1 / (omega + 1)`` once scaled by that factor:
:class:`ToContractive` does it.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from typing import ClassVar, Sequence

from horovod_squeeze.wire import Layout, Section, index_kind

__all__ = [
    "Contract", "Compressor", "Identity", "FP16", "TopK", "RandK", "ScaledSign", "QSGD",
    "Ternary", "Natural", "ToContractive", "topk_count", "qsgd_code_width", "segment_lengths",
    "block_lengths",
]

# Largest finite float16, and the magnitude from which rounding to float16 gives Inf.
FP16_MAX = 65504.0
FP16_OVERFLOW = 65520.0


@dataclasses.dataclass(frozen=True)
class Contract:
    """What a compressor guarantees for a vector of a given size.

    ``error_bound`` is the factor in ``E||C(v) - v||^2 <= error_bound * ||v||^2`` in every case:
    ``1 - delta`` for contractive, ``omega`` for unbiased compressors.
    """

    kind: str  # "contractive", "unbiased" or "biased"
    error_bound: float

    @property
    def delta(self) -> float | None:
        return 1.0 - self.error_bound if self.kind == "contractive" else None

    @property
    def omega(self) -> float | None:
        return self.error_bound if self.kind == "unbiased" else None

    @property
    def contractive_scale(self) -> float:
        """Factor that makes an unbiased compressor contractive (1 for the others)."""
        return 1.0 / (1.0 + self.error_bound) if self.kind == "unbiased" else 1.0

    @classmethod
    def contractive(cls, delta: float) -> "Contract":
        return cls("contractive", 1.0 - delta)

    @classmethod
    def unbiased(cls, omega: float) -> "Contract":
        return cls("unbiased", omega)


def _check_ratio(name: str, ratio: float) -> None:
    if not (isinstance(ratio, (int, float)) and 0.0 < ratio <= 1.0):
        raise ValueError(f"{name}: ratio must be in (0, 1], got {ratio!r}")


def _check_block_size(name: str, block_size: int | None) -> None:
    if block_size is not None and not (isinstance(block_size, int) and block_size >= 1):
        raise ValueError(f"{name}: block_size must be a positive integer or None, got {block_size!r}")


def _check_choice(name: str, field: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: {field} must be one of {choices}, got {value!r}")


def segment_lengths(numel: int, segments: Sequence[int] | None = None, *,
                    name: str | None = None) -> tuple[int, ...]:
    """The real segments of a flat vector of ``numel`` entries, checked: ``segments`` as a tuple,
    or one segment of ``numel`` for ``None`` (none for an empty vector). ``ValueError`` (naming
    ``name``) unless they are positive integers summing to at most ``numel``."""
    if segments is None:
        return (numel,) if numel else ()
    where = f"{name}: " if name else ""
    try:
        lengths = tuple(operator.index(length) for length in segments)
    except TypeError:
        raise ValueError(f"{where}segments must be positive integers, got {segments!r}") from None
    if any(length <= 0 for length in lengths):
        raise ValueError(f"{where}segments must be positive integers, got {lengths!r}")
    if sum(lengths) > numel:
        raise ValueError(f"{where}segments {lengths!r} sum to {sum(lengths)}, more than the "
                         f"{numel} entries they partition")
    return lengths


def block_lengths(segments: Sequence[int], block_size: int | None) -> tuple[int, ...]:
    """Lengths of the blocks that carry one scale each: every segment cut into ``block_size``
    pieces, its last piece shorter (``None``: every segment whole)."""
    if block_size is None:
        return tuple(segments)
    blocks = []
    for length in segments:
        full, rest = divmod(length, block_size)
        blocks += [block_size] * full + ([rest] if rest else [])
    return tuple(blocks)


def topk_count(ratio: float, numel: int) -> int:
    """Entries kept by TopK/RandK: ``ceil(ratio * numel)``, at least one of a non-empty tensor."""
    return min(numel, max(1, math.ceil(ratio * numel))) if numel else 0


def qsgd_code_width(levels: int) -> int:
    """Bits per QSGD entry: a sign bit and the level in ``[0, levels]``."""
    return 1 + max(1, math.ceil(math.log2(levels + 1)))


class Compressor:
    """Base of all compressor specs (frozen dataclasses).

    ``layout``, ``payload_nbytes`` and ``contract`` take the vector's ``numel`` and its
    ``segments`` (see :func:`segment_lengths`; ``None``: one segment of ``numel``).
    """

    #: Whether ``decompress(sum of payload values)`` equals the sum of the decompressed tensors,
    #: which is what an allreduce of compressed values needs.
    linear: ClassVar[bool] = False
    #: Whether compression draws random numbers (from the call's ``nonce``).
    stochastic: ClassVar[bool] = False
    #: Whether each segment is compressed with its own scale or norm, so that the compressor's
    #: error on a segment depends on that segment alone (its contract, on the segment's length).
    per_segment: ClassVar[bool] = False

    def layout(self, numel: int, segments: Sequence[int] | None = None) -> Layout:
        """The payload's sections for a vector of ``numel`` entries in ``segments``."""
        raise NotImplementedError

    def payload_nbytes(self, numel: int, segments: Sequence[int] | None = None) -> int:
        """Bytes on the wire for a vector of ``numel`` entries in ``segments``: a pure function of
        the spec, so every rank knows every payload's size."""
        return self.layout(numel, segments).nbytes

    def contract(self, numel: int, segments: Sequence[int] | None = None) -> Contract:
        """The guarantee over the whole vector: from its largest block where scales are per block
        (per segment), else from its real entries."""
        raise NotImplementedError


def _real_numel(numel: int, segments) -> int:
    return sum(segment_lengths(numel, segments))


def _num_blocks(segments: tuple[int, ...], block_size: int | None) -> int:
    """``len(block_lengths(segments, block_size))``, without listing them (layouts of large
    buckets cut into small blocks are computed at every step)."""
    if block_size is None:
        return len(segments)
    return sum(-(-length // block_size) for length in segments)


def _largest_block(numel: int, segments, block_size: int | None) -> int:
    largest = max(segment_lengths(numel, segments), default=1)
    return largest if block_size is None else min(largest, block_size)


@dataclasses.dataclass(frozen=True)
class Identity(Compressor):
    """No compression: the float32 values themselves (of the real entries)."""

    linear: ClassVar[bool] = True

    def layout(self, numel, segments=None):
        return Layout((Section("values", "float32", _real_numel(numel, segments)),))

    def contract(self, numel, segments=None):
        return Contract.contractive(1.0)


@dataclasses.dataclass(frozen=True)
class FP16(Compressor):
    """Round to float16 (nearest even). Magnitudes above 65504 are rejected, not sent as Inf.

    Contract: relative rounding error at most 2^-11 per entry, so ``delta = 1 - 2^-22`` for entries
    in float16's normal range (|v| >= 2^-14); smaller entries lose absolute precision 2^-25.
    """

    linear: ClassVar[bool] = True

    def layout(self, numel, segments=None):
        return Layout((Section("values", "float16", _real_numel(numel, segments)),))

    def contract(self, numel, segments=None):
        return Contract.contractive(1.0 - 2.0 ** -22)


@dataclasses.dataclass(frozen=True)
class TopK(Compressor):
    """The ``k = ceil(ratio * d)`` entries of largest magnitude, ties to the lower index.

    ``d`` counts the real entries (all segments together; padding is never selected).
    ``method="exact"`` selects over the whole vector. ``method="sampled"`` (DGC's idea) estimates a
    threshold from a strided sample, selects exactly among the entries above it, and falls back to
    ``exact`` when fewer than ``k`` pass: the result is always the exact top-k, only faster on large
    tensors. Payload: sorted indices (uint16 when ``d <= 65536``, else int32) and float32 values.
    Contractive with ``delta = k / d``.
    """

    ratio: float
    method: str = "exact"

    def __post_init__(self):
        _check_ratio("TopK", self.ratio)
        _check_choice("TopK", "method", self.method, ("exact", "sampled"))

    def layout(self, numel, segments=None):
        real = _real_numel(numel, segments)
        k = topk_count(self.ratio, real)
        return Layout((Section("indices", index_kind(real), k), Section("values", "float32", k)))

    def contract(self, numel, segments=None):
        d = max(_real_numel(numel, segments), 1)
        return Contract.contractive(topk_count(self.ratio, d) / d)


@dataclasses.dataclass(frozen=True)
class RandK(Compressor):
    """``k = ceil(ratio * d)`` of the ``d`` real entries chosen at random without replacement.

    The indices are a function of ``(seed, nonce)`` alone, so ranks that share them pick the same
    entries and only the values travel, with the 32-bit stream key in a 4-byte header. Then the
    compressor is linear and can ride an allreduce. ``unbiased=True`` scales the values by ``d / k``
    (unbiased with ``omega = d / k - 1``); otherwise contractive with ``delta = k / d`` in expectation.
    """

    ratio: float
    seed: int = 0
    unbiased: bool = False

    linear: ClassVar[bool] = True
    stochastic: ClassVar[bool] = True

    def __post_init__(self):
        _check_ratio("RandK", self.ratio)

    def layout(self, numel, segments=None):
        k = topk_count(self.ratio, _real_numel(numel, segments))
        return Layout((Section("key", "uint32", 1), Section("values", "float32", k)))

    def contract(self, numel, segments=None):
        d = max(_real_numel(numel, segments), 1)
        kept = topk_count(self.ratio, d) / d
        return Contract.unbiased(1.0 / kept - 1.0) if self.unbiased else Contract.contractive(kept)


@dataclasses.dataclass(frozen=True)
class ScaledSign(Compressor):
    """One bit per entry and one float32 scale per block: ``C(v) = scale * sign(v)``.

    Blocks are each segment cut into ``block_size`` pieces (``None``: one block per segment).
    ``scale="l1"``: ``||v_b||_1 / n`` for a block of ``n`` entries (contractive, ``delta = 1 / n``
    for the largest block); ``scale="rms"``: ``||v_b||_2 / sqrt(n)`` as DeepSpeed's 1-bit Adam uses,
    which preserves the norm but is not contractive (error bound ``2 (1 - 1/sqrt(n))``). Exact zeros
    cannot be sent in one bit: ``zeros="positive"`` sends them as ``+scale``, ``zeros="alternate"``
    as ``+scale`` at even and ``-scale`` at odd positions of the vector, so that a block of zeros
    decodes to a zero mean instead of a drift.
    """

    scale: str = "l1"
    block_size: int | None = None
    zeros: str = "positive"

    per_segment: ClassVar[bool] = True

    def __post_init__(self):
        _check_choice("ScaledSign", "scale", self.scale, ("l1", "rms"))
        _check_choice("ScaledSign", "zeros", self.zeros, ("positive", "alternate"))
        _check_block_size("ScaledSign", self.block_size)

    def layout(self, numel, segments=None):
        segments = segment_lengths(numel, segments)
        return Layout((Section("scales", "float32", _num_blocks(segments, self.block_size)),
                       Section("signs", "bits", sum(segments), width=1)))

    def contract(self, numel, segments=None):
        n = _largest_block(numel, segments, self.block_size)
        if self.scale == "l1":
            return Contract.contractive(1.0 / n)
        return Contract("biased", 2.0 * (1.0 - 1.0 / math.sqrt(n)))


@dataclasses.dataclass(frozen=True)
class QSGD(Compressor):
    """QSGD (Alistarh et al.): stochastic rounding of ``|v_i| / ||v||_p`` to ``levels`` levels,
    with ``v`` each segment on its own.

    ``Q(v)_i = ||v||_p * sign(v_i) * l_i / s`` with ``l_i`` in ``{0..s}`` rounded up with probability
    equal to the remainder, so ``E Q(v) = v``. ``p="2"``: QSGD's norm, ``omega = min(d / s^2,
    sqrt(d) / s)`` for the largest segment of ``d`` entries. ``p="inf"``: the b-bit quantizer of
    double quantization (Yu, Wu, Huang, 2019) for ``s = 2^(b-1) - 1``, a grid step
    ``delta = ||v||_inf / s``; ``omega = min(d / (4 s^2), sqrt(d) / s)``. Payload: one float32
    quantum ``||v||_p / s`` per segment (so decoding is one exact multiplication, which no graph
    optimizer can reassociate), then a sign bit and ``ceil(log2(s + 1))`` level bits per entry.
    """

    levels: int = 4
    seed: int = 0
    p: str = "2"

    stochastic: ClassVar[bool] = True
    per_segment: ClassVar[bool] = True

    def __post_init__(self):
        if not (isinstance(self.levels, int) and 1 <= self.levels <= 255):
            raise ValueError(f"QSGD: levels must be an integer in [1, 255], got {self.levels!r}")
        _check_choice("QSGD", "p", self.p, ("2", "inf"))

    @classmethod
    def bits(cls, b: int, seed: int = 0) -> "QSGD":
        """The b-bit unbiased quantizer ``Q(b)`` of double quantization: ``2^(b-1) - 1`` levels of
        ``||v||_inf`` each way, sign included in the ``b`` bits (``b`` in 2..9)."""
        if isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 9:
            raise ValueError(f"QSGD.bits: b must be an integer in [2, 9] (a sign bit and "
                             f"2^(b-1) - 1 levels), got {b!r}")
        return cls(2 ** (b - 1) - 1, seed=seed, p="inf")

    def layout(self, numel, segments=None):
        segments = segment_lengths(numel, segments)
        return Layout((Section("quantum", "float32", len(segments)),
                       Section("codes", "bits", sum(segments), width=qsgd_code_width(self.levels))))

    def contract(self, numel, segments=None):
        d, s = _largest_block(numel, segments, None), self.levels
        per_entry = d / s ** 2 if self.p == "2" else d / (4 * s ** 2)
        return Contract.unbiased(min(per_entry, math.sqrt(d) / s))


@dataclasses.dataclass(frozen=True)
class Ternary(Compressor):
    """Blockwise ternary quantization (TernGrad; DORE's p-norm ternary): 1.6 bits per entry.

    Blocks are each segment cut into ``block_size`` pieces (``None``: one block per segment). Per
    block ``b``: ``Q(v)_i = ||v_b||_p * sign(v_i) * xi_i`` with
    ``xi_i ~ Bernoulli(|v_i| / ||v_b||_p)``, ``p`` = ``inf`` (TernGrad) or ``2``. Unbiased:
    ``E||Q(v) - v||^2 = ||v||_p ||v||_1 - ||v||_2^2``, so ``omega = sqrt(n) - 1`` for ``p = 2`` and
    ``omega = (sqrt(n) - 1) / 2`` for ``p = inf`` (reached by one entry ``1`` and ``n - 1`` entries
    ``1 / (sqrt(n) + 1)``), ``n`` the largest block. Payload: one float32 norm per block, then the
    codes (0: zero, 1: +norm, 2: -norm) as base-3 digits, five to a byte.
    """

    block_size: int | None = 256
    p: str = "inf"
    seed: int = 0

    stochastic: ClassVar[bool] = True
    per_segment: ClassVar[bool] = True

    def __post_init__(self):
        _check_block_size("Ternary", self.block_size)
        _check_choice("Ternary", "p", self.p, ("inf", "2"))

    def layout(self, numel, segments=None):
        segments = segment_lengths(numel, segments)
        return Layout((Section("norms", "float32", _num_blocks(segments, self.block_size)),
                       Section("codes", "trits", sum(segments))))

    def contract(self, numel, segments=None):
        excess = math.sqrt(_largest_block(numel, segments, self.block_size)) - 1.0
        return Contract.unbiased(excess if self.p == "2" else excess / 2.0)


@dataclasses.dataclass(frozen=True)
class Natural(Compressor):
    """Natural compression (Horvath et al.): stochastic rounding to a neighbouring power of two.

    ``|v_i|`` in ``[2^e, 2^(e+1))`` becomes ``2^(e+1)`` with probability ``|v_i| / 2^e - 1``, else
    ``2^e``: unbiased with ``omega = 1/8``. Payload: 9 bits per real entry (sign and the float32
    exponent field). Subnormals round between 0 and 2^-126 the same way; magnitudes of 2^127 and up
    are not rounded up (they would overflow), which keeps them finite at a tiny bias.
    """

    seed: int = 0

    stochastic: ClassVar[bool] = True

    def layout(self, numel, segments=None):
        return Layout((Section("codes", "bits", _real_numel(numel, segments), width=9),))

    def contract(self, numel, segments=None):
        return Contract.unbiased(1.0 / 8.0)


@dataclasses.dataclass(frozen=True)
class ToContractive(Compressor):
    """An unbiased compressor scaled by ``1 / (omega + 1)``: contractive with ``delta = 1 / (omega + 1)``.

    Same payload as ``inner``; only decompression applies the factor, so DoubleSqueeze-style error
    feedback (which needs a contractive compressor) can use QSGD, Ternary or Natural. Where the
    inner compressor quantizes each segment on its own (``per_segment``: QSGD, Ternary), each
    segment is scaled by the factor of its own ``omega``, so a small tensor is not shrunk by a large
    one's variance; otherwise (RandK, Natural) every segment takes the factor of the whole vector.
    """

    inner: Compressor

    def __post_init__(self):
        if not isinstance(self.inner, Compressor) or isinstance(self.inner, ToContractive):
            raise TypeError(f"ToContractive: inner must be a compressor spec, got {self.inner!r}")
        if self.inner.contract(1).kind != "unbiased":
            raise ValueError(f"ToContractive: {self.inner!r} is not unbiased; only unbiased "
                             "compressors need scaling to become contractive")

    @property
    def stochastic(self):
        return self.inner.stochastic

    @property
    def per_segment(self):
        return self.inner.per_segment

    def layout(self, numel, segments=None):
        return self.inner.layout(numel, segments)

    def contract(self, numel, segments=None):
        return Contract.contractive(self.inner.contract(numel, segments).contractive_scale)

    def segment_scales(self, numel: int,
                       segments: Sequence[int] | None = None) -> tuple[float, ...]:
        """The factor ``1 / (omega + 1)`` that decoding applies to each segment."""
        segments = segment_lengths(numel, segments)
        if self.inner.per_segment:
            return tuple(self.inner.contract(length).contractive_scale for length in segments)
        if not segments:  # an empty vector: nothing to scale
            return ()
        return (self.inner.contract(numel, segments).contractive_scale,) * len(segments)
