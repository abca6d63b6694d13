"""Compressor codecs written once for every framework, against a small array-ops interface.

:class:`ArrayOps` lists the primitives a framework binding provides (``horovod_squeeze.torch`` and
``horovod_squeeze.tensorflow`` each implement it in a few lines per method); :class:`Codec` builds
every compressor from them. Tensors are flat; counts that shape the payload (``numel``, ``k``,
segments, blocks) are Python integers, so TensorFlow graphs keep static shapes.

A vector's ``segments`` (see :func:`horovod_squeeze.compressors.segment_lengths`) are compressed
segment by segment where the compressor has a scale or norm; the padding past them never enters a
compressor and decodes to exactly 0.

The arithmetic mirrors :mod:`horovod_squeeze.reference.codecs` operation for operation (float32
element math, float64 accumulation rounded once to float32, draws from
:mod:`horovod_squeeze.streams`), which is what makes payloads byte-identical across frameworks.
"""
from __future__ import annotations

import abc
import math
from typing import Any, Callable

from horovod_squeeze import compressors as C
from horovod_squeeze.streams import UNIFORM24_SCALE, hash32, stream_key
from horovod_squeeze.wire import TRITS_PER_BYTE, Layout

Tensor = Any

# Below this size TopK(method="sampled") just runs the exact selection: sampling cannot pay off.
_SAMPLED_TOPK_MIN_NUMEL = 1 << 16
# Entries in the strided sample that estimates the threshold, and the over-selection margin that
# makes "fewer than k above the threshold" (the fallback to exact) rare.
_SAMPLED_TOPK_SAMPLE = 1 << 14
_SAMPLED_TOPK_MARGIN = 1.5


class ArrayOps(abc.ABC):
    """Primitive operations on flat tensors. ``kind`` names are those of :mod:`horovod_squeeze.wire`,
    plus ``"float64"``, ``"int64"`` and ``"bool"``."""

    @abc.abstractmethod
    def flat_float32(self, x: Tensor, name: str) -> Tensor:
        """``x`` flattened (C order) as float32; ``TypeError`` naming ``name`` unless floating."""

    @abc.abstractmethod
    def cast(self, x: Tensor, kind: str) -> Tensor: ...

    @abc.abstractmethod
    def constant(self, values, kind: str) -> Tensor: ...

    @abc.abstractmethod
    def arange(self, n: int) -> Tensor:
        """int64 ``0..n-1``."""

    @abc.abstractmethod
    def abs(self, x: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def floor(self, x: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def sqrt(self, x: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def minimum(self, x: Tensor, y: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def clip(self, x: Tensor, bound: float) -> Tensor:
        """``x`` limited to ``[-bound, bound]`` entrywise."""

    @abc.abstractmethod
    def where(self, condition: Tensor, x: Tensor, y: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def sum64(self, x: Tensor, axis: int | None = None) -> Tensor:
        """Sum accumulated in float64 (returns float64)."""

    @abc.abstractmethod
    def power_sum64(self, x: Tensor, p: int, axis: int | None = None) -> Tensor:
        """``sum(|x| ** p)`` for p in {1, 2}, from float64 values of x, accumulated in float64."""

    @abc.abstractmethod
    def signed(self, positive: Tensor, magnitude: Tensor) -> Tensor:
        """``where(positive, magnitude, -magnitude)`` as float32 (``positive``: bool or 0/1 ints)."""

    def signed_bits(self, data: Tensor, count: int, magnitude: Tensor) -> Tensor:
        """:meth:`signed` of the first ``count`` bits of a packed 1-bit stream (1: positive)."""
        return self.signed(self.unpack_bits(data, 1, count), magnitude)

    @abc.abstractmethod
    def max(self, x: Tensor, axis: int | None = None) -> Tensor:
        """Maximum (of finite values: callers check finiteness first)."""

    @abc.abstractmethod
    def count(self, mask: Tensor) -> Tensor:
        """Number of true entries, int64 scalar."""

    @abc.abstractmethod
    def cumsum(self, mask: Tensor) -> Tensor:
        """Running count of true entries, int64."""

    @abc.abstractmethod
    def reshape(self, x: Tensor, shape: tuple[int, ...]) -> Tensor: ...

    @abc.abstractmethod
    def pad(self, x: Tensor, numel: int) -> Tensor:
        """``x`` zero-extended at the end to ``numel`` entries."""

    @abc.abstractmethod
    def repeat(self, x: Tensor, repeats: int) -> Tensor:
        """Each entry repeated ``repeats`` times in place (``[a, b] -> [a, a, b, b]``)."""

    @abc.abstractmethod
    def slice(self, x: Tensor, start: int, stop: int, step: int = 1) -> Tensor: ...

    @abc.abstractmethod
    def kth_largest(self, x: Tensor, k: int) -> Tensor:
        """The k-th largest entry (1-based) as a scalar."""

    @abc.abstractmethod
    def k_smallest_indices(self, keys: Tensor, k: int) -> Tensor:
        """Indices of the ``k`` smallest of distinct int64 ``keys``, in any order."""

    @abc.abstractmethod
    def sort(self, x: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def nonzero(self, mask: Tensor) -> Tensor:
        """int64 indices of true entries, ascending."""

    @abc.abstractmethod
    def gather(self, x: Tensor, indices: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def scatter(self, numel: int, indices: Tensor, values: Tensor) -> Tensor:
        """float32 zeros of ``numel`` entries with ``values`` written at ``indices``."""

    @abc.abstractmethod
    def concat(self, parts: list[Tensor]) -> Tensor: ...

    @abc.abstractmethod
    def float32_bits(self, x: Tensor) -> Tensor:
        """IEEE bits of float32 ``x`` as int64 in ``[0, 2^32)``."""

    @abc.abstractmethod
    def float32_from_bits(self, bits: Tensor) -> Tensor:
        """float32 whose IEEE bits are int64 ``bits`` (below 2^31)."""

    @abc.abstractmethod
    def to_bytes(self, x: Tensor, kind: str) -> Tensor:
        """Little-endian uint8 serialization of ``x`` as elements of ``kind``."""

    @abc.abstractmethod
    def from_bytes(self, data: Tensor, kind: str) -> Tensor:
        """Inverse of :meth:`to_bytes`: float32 for float kinds, int64 for integer kinds."""

    @abc.abstractmethod
    def pack_bits(self, codes: Tensor, width: int) -> Tensor:
        """Non-negative int codes (or bools, width 1) to the LSB-first bit stream of the wire format."""

    @abc.abstractmethod
    def unpack_bits(self, data: Tensor, width: int, count: int) -> Tensor:
        """Inverse of :meth:`pack_bits`: ``count`` int64 codes (uint8 bits when ``width`` is 1)."""

    @abc.abstractmethod
    def payload_size(self, payload: Tensor) -> tuple[str, tuple[int, ...]]:
        """``(dtype name, shape)`` of a payload, for validation."""

    @abc.abstractmethod
    def check(self, condition: Tensor, error: Callable[[], Exception]) -> None:
        """Raises ``error()`` unless the scalar ``condition`` holds (a run-time assert in graphs)."""

    @abc.abstractmethod
    def cond(self, predicate: Tensor, if_true: Callable[[], Tensor],
             if_false: Callable[[], Tensor]) -> Tensor: ...


class Codec:
    """Every compressor's ``compress``/``decompress`` over one framework's :class:`ArrayOps`."""

    def __init__(self, ops: ArrayOps):
        self.xp = ops
        self._compressors = {
            C.Identity: self._identity, C.FP16: self._fp16, C.TopK: self._topk,
            C.RandK: self._randk, C.ScaledSign: self._scaled_sign, C.QSGD: self._qsgd,
            C.Ternary: self._ternary, C.Natural: self._natural,
            C.ToContractive: lambda spec, v, segments, nonce, name: self._sections(
                spec.inner, v, segments, nonce, name),
        }

    # --- public entry points -------------------------------------------------------------------

    def compress(self, spec: C.Compressor, x: Tensor, *, nonce: int = 0, name: str = "tensor",
                 segments=None) -> Tensor:
        """``x`` (any float tensor, flattened in C order) as its uint8 wire payload.

        ``segments``: the lengths of its real segments (``None``: one segment, the whole tensor).
        """
        self._check_spec(spec)
        v = self.xp.flat_float32(x, name)
        numel = int(math.prod(v.shape))
        segments = C.segment_lengths(numel, segments, name=name)
        real = sum(segments)
        if real < numel:  # padding never travels
            v = self.xp.slice(v, 0, real)
        return self._pack(spec.layout(numel, segments),
                          self._sections(spec, v, segments, nonce, name))

    def decompress(self, spec: C.Compressor, payload: Tensor, numel: int, *,
                   name: str = "payload", segments=None, dtype: str = "float32") -> Tensor:
        """A payload made by :meth:`compress` back to a flat tensor of ``numel`` entries (the same
        ``segments``; padding decodes to 0), in ``dtype``: ``"float32"``, or ``"float64"``, which
        holds every decoded value exactly."""
        self._check_spec(spec)
        segments = C.segment_lengths(numel, segments, name=name)
        layout = spec.layout(numel, segments)
        kind, shape = self.xp.payload_size(payload)
        if kind != "uint8" or shape != (layout.nbytes,):
            raise ValueError(f"{name}: {type(spec).__name__} payload for {numel} entries must be "
                             f"a 1-D uint8 tensor of {layout.nbytes} bytes, got {kind} {shape}")
        if dtype not in ("float32", "float64"):
            raise ValueError(f"{name}: decompress gives float32 or float64, not {dtype!r}")
        decoded = self._decode(spec, self._unpack(layout, payload), segments)
        if dtype != "float32":
            decoded = self.xp.cast(decoded, dtype)
        return decoded if sum(segments) == numel else self.xp.pad(decoded, numel)

    def split_linear(self, spec: C.Compressor, payload: Tensor, numel: int, segments=None):
        """A linear compressor's payload as (header bytes, values that an allreduce averages), the
        values in their wire dtype (float16 or float32)."""
        section, start, stop = next(s for s in spec.layout(numel, segments).spans()
                                    if s[0].name == "values")
        values = self.xp.from_bytes(self.xp.slice(payload, start, stop), section.kind)
        return self.xp.slice(payload, 0, start), self.xp.cast(values, section.kind)

    def join_linear(self, spec: C.Compressor, header: Tensor, values: Tensor,
                    numel: int, segments=None) -> Tensor:
        """Inverse of :meth:`split_linear`: the payload with (averaged) values after its header."""
        kind = spec.layout(numel, segments)["values"].kind
        return self.xp.concat([header, self.xp.to_bytes(self.xp.reshape(values, (-1,)), kind)])

    # --- wire -----------------------------------------------------------------------------------

    def _pack(self, layout: Layout, sections: dict[str, Tensor]) -> Tensor:
        parts = []
        for section in layout.sections:
            values = sections[section.name]
            if section.kind == "bits":
                parts.append(self.xp.pack_bits(values, section.width))
            elif section.kind == "trits":
                parts.append(self._pack_trits(values, section.nbytes))
            else:
                parts.append(self.xp.to_bytes(values, section.kind))
        return self.xp.concat(parts)

    def _unpack(self, layout: Layout, payload: Tensor) -> dict[str, Tensor]:
        out = {}
        for section, start, stop in layout.spans():
            data = self.xp.slice(payload, start, stop)
            if section.kind == "bits" and section.width == 1:
                out[section.name] = data  # sign streams decode straight from bytes: signed_bits
            elif section.kind == "bits":
                out[section.name] = self.xp.unpack_bits(data, section.width, section.count)
            elif section.kind == "trits":
                out[section.name] = self._unpack_trits(data, section.count)
            else:
                out[section.name] = self.xp.from_bytes(data, section.kind)
        return out

    def _pack_trits(self, codes: Tensor, nbytes: int) -> Tensor:
        """int64 codes in {0, 1, 2} as base-3 digits, five to a byte (Horner's rule over the byte's
        digits, each a strided slice)."""
        xp = self.xp
        digits = xp.pad(codes, nbytes * TRITS_PER_BYTE)
        value = xp.slice(digits, TRITS_PER_BYTE - 1, nbytes * TRITS_PER_BYTE, TRITS_PER_BYTE)
        for position in range(TRITS_PER_BYTE - 2, -1, -1):
            value = value * 3 + xp.slice(digits, position, nbytes * TRITS_PER_BYTE, TRITS_PER_BYTE)
        return xp.to_bytes(value, "uint8")

    def _unpack_trits(self, data: Tensor, count: int) -> Tensor:
        """Inverse of :meth:`_pack_trits`: the first ``count`` digits as int64."""
        xp = self.xp
        nbytes = math.prod(data.shape)
        weights = xp.gather(xp.constant([3 ** j for j in range(TRITS_PER_BYTE)], "int64"),
                            xp.arange(nbytes * TRITS_PER_BYTE) % TRITS_PER_BYTE)
        digits = xp.repeat(xp.from_bytes(data, "uint8"), TRITS_PER_BYTE) // weights % 3
        return xp.slice(digits, 0, count)

    # --- shared pieces ----------------------------------------------------------------------------

    def _check_spec(self, spec) -> None:
        if type(spec) not in self._compressors:
            raise TypeError(f"expected a compressor spec from horovod_squeeze, got {spec!r}")

    def _sections(self, spec, v, segments, nonce, name) -> dict[str, Tensor]:
        """The sections of ``v``: the real entries, in ``segments``."""
        self._check_spec(spec)
        return self._compressors[type(spec)](spec, v, segments, nonce, name)

    def _check_finite(self, value, spec, name) -> None:
        xp = self.xp
        finite = xp.count(xp.abs(value) < math.inf) == math.prod(value.shape)  # NaN fails too
        xp.check(finite, lambda: ValueError(f"{name}: {type(spec).__name__} got NaN or Inf values"))

    def _uniform(self, numel: int, key: int) -> Tensor:
        xp = self.xp
        draws = hash32(xp.arange(numel) ^ key) // 256
        return xp.cast(draws, "float32") * xp.constant(UNIFORM24_SCALE, "float32")

    def _per_block(self, v, segments, block_size, reduce: Callable[[Tensor], Tensor]) -> Tensor:
        """``reduce`` of every block's row: each segment as a zero-padded (blocks, size) matrix,
        the results concatenated in order (the blocks of
        :func:`~horovod_squeeze.compressors.block_lengths`)."""
        xp = self.xp
        parts, start = [], 0
        for length in segments or (0,):  # an empty vector: one empty matrix, for the dtype
            size = (length if block_size is None else block_size) or 1  # reducible rows
            num_blocks = -(-length // size) if length else 0
            rows = xp.slice(v, start, start + length)
            if num_blocks * size != length:
                rows = xp.pad(rows, num_blocks * size)
            parts.append(reduce(xp.reshape(rows, (num_blocks, size))))
            start += length
        return parts[0] if len(parts) == 1 else xp.concat(parts)

    def _per_entry(self, block_values, segments, block_size) -> Tensor:
        """Per-block values spread over their entries (a single block: left to broadcasting)."""
        xp = self.xp
        counts = [1 if block_size is None else -(-length // block_size) for length in segments]
        if sum(counts) <= 1:
            return block_values
        parts, first = [], 0
        for length, count in zip(segments, counts):
            size = length if block_size is None else block_size
            spread = xp.repeat(xp.slice(block_values, first, first + count), size)
            parts.append(spread if count * size == length else xp.slice(spread, 0, length))
            first += count
        return xp.concat(parts)

    def _topk_indices(self, magnitude, k: int) -> Tensor:
        """Ascending indices of the k largest entries, ties to the lower index."""
        xp = self.xp
        threshold = xp.kth_largest(magnitude, k)
        above = magnitude > threshold
        tied = magnitude == threshold
        chosen = above | (tied & (xp.cumsum(tied) <= k - xp.count(above)))
        return xp.reshape(xp.nonzero(chosen), (k,))

    # --- compressors: ``v`` holds the real entries only -------------------------------------------

    def _identity(self, spec, v, segments, nonce, name):
        return {"values": v}

    def _fp16(self, spec, v, segments, nonce, name):
        xp = self.xp
        xp.check(xp.count(xp.abs(v) < C.FP16_OVERFLOW) == math.prod(v.shape),
                 lambda: ValueError(f"{name}: FP16 got NaN, Inf or magnitudes above "
                                    f"{C.FP16_MAX} (float16's largest finite value)"))
        return {"values": v}

    def _topk(self, spec, v, segments, nonce, name):
        xp = self.xp
        numel = math.prod(v.shape)
        self._check_finite(xp.sum64(v), spec, name)
        k = C.topk_count(spec.ratio, numel)
        magnitude = xp.abs(v)
        if spec.method == "sampled" and numel >= _SAMPLED_TOPK_MIN_NUMEL:
            indices = self._sampled_topk_indices(magnitude, numel, k)
        else:
            indices = self._topk_indices(magnitude, k) if k else xp.arange(0)
        return {"indices": indices, "values": xp.gather(v, indices)}

    def _sampled_topk_indices(self, magnitude, numel: int, k: int) -> Tensor:
        """Exact top-k, selected among the entries above a threshold estimated from a sample."""
        xp = self.xp
        stride = max(1, numel // _SAMPLED_TOPK_SAMPLE)
        sample = xp.slice(magnitude, 0, numel, stride)
        sample_size = -(-numel // stride)
        rank = min(sample_size, math.ceil(_SAMPLED_TOPK_MARGIN * k * sample_size / numel) + 1)
        is_candidate = magnitude >= xp.kth_largest(sample, rank)

        def among_candidates():
            candidates = xp.nonzero(is_candidate)
            chosen = self._topk_indices(xp.gather(magnitude, candidates), k)
            return xp.gather(candidates, chosen)

        return xp.cond(xp.count(is_candidate) >= k, among_candidates,
                       lambda: self._topk_indices(magnitude, k))

    def _randk_indices(self, spec, numel: int, key) -> Tensor:
        xp = self.xp
        k = C.topk_count(spec.ratio, numel)
        return xp.sort(xp.k_smallest_indices(hash32(xp.arange(numel) ^ key), k))

    def _randk_scale(self, spec, numel: int) -> Tensor:
        k = C.topk_count(spec.ratio, numel)
        return self.xp.constant(numel / max(k, 1) if spec.unbiased else 1.0, "float32")

    def _randk(self, spec, v, segments, nonce, name):
        xp = self.xp
        numel = math.prod(v.shape)
        self._check_finite(xp.sum64(v), spec, name)
        key = stream_key(spec.seed, nonce)
        values = xp.gather(v, self._randk_indices(spec, numel, key)) * self._randk_scale(spec, numel)
        return {"key": xp.constant([key], "int64"), "values": values}

    def _scaled_sign(self, spec, v, segments, nonce, name):
        xp = self.xp
        counts = xp.constant(list(C.block_lengths(segments, spec.block_size)), "float64")
        if spec.scale == "l1":
            sums = self._per_block(v, segments, spec.block_size,
                                   lambda rows: xp.power_sum64(rows, 1, axis=1))
            scales = sums / counts
        else:
            sums = self._per_block(v, segments, spec.block_size,
                                   lambda rows: xp.power_sum64(rows, 2, axis=1))
            scales = xp.sqrt(sums / counts)
        scales = xp.cast(scales, "float32")
        self._check_finite(scales, spec, name)
        if spec.zeros == "positive":
            bits = v >= 0  # -0.0 counts as zero, hence positive
        else:
            bits = (v > 0) | ((v == 0) & (xp.arange(math.prod(v.shape)) % 2 == 0))
        return {"scales": scales, "signs": bits}

    def _qsgd(self, spec, v, segments, nonce, name):
        xp = self.xp
        if spec.p == "inf":
            self._check_finite(xp.sum64(v), spec, name)
            quanta = self._per_block(v, segments, None, lambda rows: xp.cast(
                xp.cast(xp.max(xp.abs(rows), axis=1), "float64") / spec.levels, "float32"))
        else:
            quanta = self._per_block(v, segments, None, lambda rows: xp.cast(
                xp.sqrt(xp.power_sum64(rows, 2, axis=1)) / spec.levels, "float32"))
        self._check_finite(quanta, spec, name)
        quantum = self._per_entry(quanta, segments, None)
        positive = quantum > 0
        safe_quantum = xp.where(positive, quantum, xp.constant(1.0, "float32"))
        ratio = xp.where(positive, xp.abs(v) / safe_quantum, xp.constant(0.0, "float32"))
        floor = xp.floor(ratio)
        draws = self._uniform(math.prod(v.shape), stream_key(spec.seed, nonce))
        up = xp.cast(draws < ratio - floor, "float32")
        levels = xp.cast(xp.minimum(floor + up, xp.constant(float(spec.levels), "float32")), "int64")
        return {"quantum": quanta, "codes": levels * 2 + xp.cast(v < 0, "int64")}

    def _ternary(self, spec, v, segments, nonce, name):
        xp = self.xp
        if spec.p == "inf":
            self._check_finite(xp.sum64(v), spec, name)
            norms = self._per_block(v, segments, spec.block_size,
                                    lambda rows: xp.max(xp.abs(rows), axis=1))
        else:
            norms = self._per_block(v, segments, spec.block_size, lambda rows: xp.cast(
                xp.sqrt(xp.power_sum64(rows, 2, axis=1)), "float32"))
            self._check_finite(norms, spec, name)
        norm = self._per_entry(norms, segments, spec.block_size)
        draws = self._uniform(math.prod(v.shape), stream_key(spec.seed, nonce))
        keep = draws * norm < xp.abs(v)
        codes = xp.cast(keep, "int64") * (1 + xp.cast(v < 0, "int64"))
        return {"norms": norms, "codes": codes}

    def _natural(self, spec, v, segments, nonce, name):
        xp = self.xp
        numel = math.prod(v.shape)
        bits = xp.float32_bits(v)
        exponent = (bits // (1 << 23)) & 0xFF
        xp.check(xp.count(exponent == 0xFF) == 0,
                 lambda: ValueError(f"{name}: Natural got NaN or Inf values"))
        mantissa = bits & 0x7FFFFF
        draw = hash32(xp.arange(numel) ^ stream_key(spec.seed, nonce)) // (1 << 9)
        up = xp.cast((draw < mantissa) & (exponent < 0xFE), "int64")
        return {"codes": (bits // (1 << 31)) * 256 + exponent + up}

    # --- decoding: the real entries -------------------------------------------------------------

    def _decode(self, spec, sections, segments) -> Tensor:
        xp = self.xp
        real = sum(segments)
        if isinstance(spec, (C.Identity, C.FP16)):
            return sections["values"]
        if isinstance(spec, C.TopK):
            return xp.scatter(real, sections["indices"], sections["values"])
        if isinstance(spec, C.RandK):
            indices = self._randk_indices(spec, real, sections["key"])
            return xp.scatter(real, indices, sections["values"])
        if isinstance(spec, C.ScaledSign):
            scale = self._per_entry(sections["scales"], segments, spec.block_size)
            return xp.signed_bits(sections["signs"], real, scale)
        if isinstance(spec, C.QSGD):
            quantum = self._per_entry(sections["quantum"], segments, None)
            magnitude = xp.cast(sections["codes"] // 2, "float32") * quantum
            return xp.signed(sections["codes"] % 2 == 0, magnitude)
        if isinstance(spec, C.Ternary):
            norm = self._per_entry(sections["norms"], segments, spec.block_size)
            codes = sections["codes"]
            zero = xp.constant(0.0, "float32")
            return xp.where(codes == 1, norm, xp.where(codes == 2, -norm, zero))
        if isinstance(spec, C.Natural):
            codes = sections["codes"]
            magnitude = xp.float32_from_bits((codes & 0xFF) * (1 << 23))
            return xp.signed(codes // 256 == 0, magnitude)
        if isinstance(spec, C.ToContractive):
            scales = spec.segment_scales(real, segments)
            if len(set(scales)) <= 1:  # one factor (or none, for an empty vector)
                factor = xp.constant(scales[0] if scales else 1.0, "float32")
            else:
                factor = self._per_entry(xp.constant(list(scales), "float32"), segments, None)
            return self._decode(spec.inner, sections, segments) * factor
        raise TypeError(f"no codec for {spec!r}")
