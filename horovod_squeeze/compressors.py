"""Compressor specifications: what each compressor is, its math contract, and its wire layout.

A spec is a small immutable, hashable value (``TopK(0.01)``, ``ScaledSign()``); it holds the
hyperparameters and nothing else. The same spec drives the NumPy reference
(:mod:`horovod_squeeze.reference`) and the PyTorch and TensorFlow codecs, which all write the
byte-identical payload that :meth:`Compressor.layout` describes.

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
from typing import ClassVar

from horovod_squeeze.wire import Layout, Section, index_kind

__all__ = [
    "Contract", "Compressor", "Identity", "FP16", "TopK", "RandK", "ScaledSign", "QSGD",
    "Ternary", "Natural", "ToContractive", "topk_count", "qsgd_code_width",
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


def _num_blocks(numel: int, block_size: int | None) -> int:
    if numel == 0:
        return 0
    return 1 if block_size is None else -(-numel // block_size)


def _largest_block(numel: int, block_size: int | None) -> int:
    return max(1, numel if block_size is None else min(numel, block_size))


def topk_count(ratio: float, numel: int) -> int:
    """Entries kept by TopK/RandK: ``ceil(ratio * numel)``, at least one of a non-empty tensor."""
    return min(numel, max(1, math.ceil(ratio * numel))) if numel else 0


def qsgd_code_width(levels: int) -> int:
    """Bits per QSGD entry: a sign bit and the level in ``[0, levels]``."""
    return 1 + max(1, math.ceil(math.log2(levels + 1)))


class Compressor:
    """Base of all compressor specs (frozen dataclasses)."""

    #: Whether ``decompress(sum of payload values)`` equals the sum of the decompressed tensors,
    #: which is what an allreduce of compressed values needs.
    linear: ClassVar[bool] = False
    #: Whether compression draws random numbers (from the call's ``nonce``).
    stochastic: ClassVar[bool] = False

    def layout(self, numel: int) -> Layout:
        raise NotImplementedError

    def payload_nbytes(self, numel: int) -> int:
        """Bytes on the wire for a tensor of ``numel`` elements: a pure function of the spec."""
        return self.layout(numel).nbytes

    def contract(self, numel: int) -> Contract:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Identity(Compressor):
    """No compression: the float32 values themselves."""

    linear: ClassVar[bool] = True

    def layout(self, numel):
        return Layout((Section("values", "float32", numel),))

    def contract(self, numel):
        return Contract.contractive(1.0)


@dataclasses.dataclass(frozen=True)
class FP16(Compressor):
    """Round to float16 (nearest even). Magnitudes above 65504 are rejected, not sent as Inf.

    Contract: relative rounding error at most 2^-11 per entry, so ``delta = 1 - 2^-22`` for entries
    in float16's normal range (|v| >= 2^-14); smaller entries lose absolute precision 2^-25.
    """

    linear: ClassVar[bool] = True

    def layout(self, numel):
        return Layout((Section("values", "float16", numel),))

    def contract(self, numel):
        return Contract.contractive(1.0 - 2.0 ** -22)


@dataclasses.dataclass(frozen=True)
class TopK(Compressor):
    """The ``k = ceil(ratio * d)`` entries of largest magnitude, ties to the lower index.

    ``method="exact"`` selects over the whole tensor. ``method="sampled"`` (DGC's idea) estimates a
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

    def layout(self, numel):
        k = topk_count(self.ratio, numel)
        return Layout((Section("indices", index_kind(numel), k), Section("values", "float32", k)))

    def contract(self, numel):
        return Contract.contractive(topk_count(self.ratio, numel) / max(numel, 1))


@dataclasses.dataclass(frozen=True)
class RandK(Compressor):
    """``k = ceil(ratio * d)`` entries chosen at random without replacement.

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

    def layout(self, numel):
        k = topk_count(self.ratio, numel)
        return Layout((Section("key", "uint32", 1), Section("values", "float32", k)))

    def contract(self, numel):
        kept = topk_count(self.ratio, numel) / max(numel, 1)
        return Contract.unbiased(1.0 / kept - 1.0) if self.unbiased else Contract.contractive(kept)


@dataclasses.dataclass(frozen=True)
class ScaledSign(Compressor):
    """One bit per entry and one float32 scale per block: ``C(v) = scale * sign(v)``.

    ``scale="l1"``: ``||v||_1 / d`` (contractive, ``delta = 1 / d`` for blocks of ``d`` entries);
    ``scale="rms"``: ``||v||_2 / sqrt(d)`` as DeepSpeed's 1-bit Adam uses, which preserves the norm
    but is not contractive (error bound ``2 (1 - 1/sqrt(d))``). ``block_size`` gives each block its
    own scale. Exact zeros cannot be sent in one bit: ``zeros="positive"`` sends them as ``+scale``,
    ``zeros="alternate"`` as ``+scale`` at even and ``-scale`` at odd positions, so that a block of
    zeros decodes to a zero mean instead of a drift.
    """

    scale: str = "l1"
    block_size: int | None = None
    zeros: str = "positive"

    def __post_init__(self):
        _check_choice("ScaledSign", "scale", self.scale, ("l1", "rms"))
        _check_choice("ScaledSign", "zeros", self.zeros, ("positive", "alternate"))
        _check_block_size("ScaledSign", self.block_size)

    def layout(self, numel):
        return Layout((Section("scales", "float32", _num_blocks(numel, self.block_size)),
                       Section("signs", "bits", numel, width=1)))

    def contract(self, numel):
        n = _largest_block(numel, self.block_size)
        if self.scale == "l1":
            return Contract.contractive(1.0 / n)
        return Contract("biased", 2.0 * (1.0 - 1.0 / math.sqrt(n)))


@dataclasses.dataclass(frozen=True)
class QSGD(Compressor):
    """QSGD (Alistarh et al.): stochastic rounding of ``|v_i| / ||v||_2`` to ``levels`` levels.

    ``Q(v)_i = ||v||_2 * sign(v_i) * l_i / s`` with ``l_i`` in ``{0..s}`` rounded up with probability
    equal to the remainder, so ``E Q(v) = v``; ``omega = min(d / s^2, sqrt(d) / s)``. Payload: the
    float32 quantum ``||v||_2 / s`` (so decoding is one exact multiplication, which no graph
    optimizer can reassociate), then a sign bit and ``ceil(log2(s + 1))`` level bits per entry.
    """

    levels: int = 4
    seed: int = 0

    stochastic: ClassVar[bool] = True

    def __post_init__(self):
        if not (isinstance(self.levels, int) and 1 <= self.levels <= 255):
            raise ValueError(f"QSGD: levels must be an integer in [1, 255], got {self.levels!r}")

    def layout(self, numel):
        return Layout((Section("quantum", "float32", 1),
                       Section("codes", "bits", numel, width=qsgd_code_width(self.levels))))

    def contract(self, numel):
        d, s = max(numel, 1), self.levels
        return Contract.unbiased(min(d / s ** 2, math.sqrt(d) / s))


@dataclasses.dataclass(frozen=True)
class Ternary(Compressor):
    """Blockwise ternary quantization (TernGrad; DORE's p-norm ternary): 2 bits per entry.

    Per block ``b``: ``Q(v)_i = ||v_b||_p * sign(v_i) * xi_i`` with ``xi_i ~ Bernoulli(|v_i| / ||v_b||_p)``,
    ``p`` = ``inf`` (TernGrad) or ``2``. Unbiased with ``omega = sqrt(n) - 1`` for blocks of ``n``.
    Payload: one float32 norm per block, then 2-bit codes (0: zero, 1: +norm, 2: -norm).
    """

    block_size: int | None = 256
    p: str = "inf"
    seed: int = 0

    stochastic: ClassVar[bool] = True

    def __post_init__(self):
        _check_block_size("Ternary", self.block_size)
        _check_choice("Ternary", "p", self.p, ("inf", "2"))

    def layout(self, numel):
        return Layout((Section("norms", "float32", _num_blocks(numel, self.block_size)),
                       Section("codes", "bits", numel, width=2)))

    def contract(self, numel):
        return Contract.unbiased(math.sqrt(_largest_block(numel, self.block_size)) - 1.0)


@dataclasses.dataclass(frozen=True)
class Natural(Compressor):
    """Natural compression (Horvath et al.): stochastic rounding to a neighbouring power of two.

    ``|v_i|`` in ``[2^e, 2^(e+1))`` becomes ``2^(e+1)`` with probability ``|v_i| / 2^e - 1``, else
    ``2^e``: unbiased with ``omega = 1/8``. Payload: 9 bits per entry (sign and the float32 exponent
    field). Subnormals round between 0 and 2^-126 the same way; magnitudes of 2^127 and up are not
    rounded up (they would overflow), which keeps them finite at a tiny bias.
    """

    seed: int = 0

    stochastic: ClassVar[bool] = True

    def layout(self, numel):
        return Layout((Section("codes", "bits", numel, width=9),))

    def contract(self, numel):
        return Contract.unbiased(1.0 / 8.0)


@dataclasses.dataclass(frozen=True)
class ToContractive(Compressor):
    """An unbiased compressor scaled by ``1 / (omega + 1)``: contractive with ``delta = 1 / (omega + 1)``.

    Same payload as ``inner``; only decompression applies the factor, so DoubleSqueeze-style error
    feedback (which needs a contractive compressor) can use QSGD, Ternary or Natural.
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

    def layout(self, numel):
        return self.inner.layout(numel)

    def contract(self, numel):
        return Contract.contractive(self.inner.contract(numel).contractive_scale)

    def scale(self, numel: int) -> float:
        return self.inner.contract(numel).contractive_scale
