"""Compressor codecs written once for every framework, against a small array-ops interface.

:class:`ArrayOps` lists the primitives a framework binding provides (``horovod_squeeze.torch`` and
``horovod_squeeze.tensorflow`` each implement it in a few lines per method); :class:`Codec` builds
every compressor from them. Tensors are flat; counts that shape the payload (``numel``, ``k``,
blocks) are Python integers, so TensorFlow graphs keep static shapes.

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
from horovod_squeeze.wire import Layout

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
            C.ToContractive: lambda spec, v, nonce, name: self._sections(spec.inner, v, nonce, name),
        }

    # --- public entry points -------------------------------------------------------------------

    def compress(self, spec: C.Compressor, x: Tensor, *, nonce: int = 0,
                 name: str = "tensor") -> Tensor:
        """``x`` (any float tensor, flattened in C order) as its uint8 wire payload."""
        self._check_spec(spec)
        v = self.xp.flat_float32(x, name)
        layout = spec.layout(int(math.prod(v.shape)))
        return self._pack(layout, self._sections(spec, v, nonce, name))

    def decompress(self, spec: C.Compressor, payload: Tensor, numel: int, *,
                   name: str = "payload") -> Tensor:
        """A payload made by :meth:`compress` back to a flat float32 tensor of ``numel`` entries."""
        self._check_spec(spec)
        layout = spec.layout(numel)
        dtype, shape = self.xp.payload_size(payload)
        if dtype != "uint8" or shape != (layout.nbytes,):
            raise ValueError(f"{name}: {type(spec).__name__} payload for {numel} entries must be "
                             f"a 1-D uint8 tensor of {layout.nbytes} bytes, got {dtype} {shape}")
        return self._decode(spec, self._unpack(layout, payload), numel)

    def split_linear(self, spec: C.Compressor, payload: Tensor, numel: int):
        """A linear compressor's payload as (header bytes, values that an allreduce averages), the
        values in their wire dtype (float16 or float32)."""
        section, start, stop = next(s for s in spec.layout(numel).spans()
                                    if s[0].name == "values")
        values = self.xp.from_bytes(self.xp.slice(payload, start, stop), section.kind)
        return self.xp.slice(payload, 0, start), self.xp.cast(values, section.kind)

    def join_linear(self, spec: C.Compressor, header: Tensor, values: Tensor,
                    numel: int) -> Tensor:
        """Inverse of :meth:`split_linear`: the payload with (averaged) values after its header."""
        kind = spec.layout(numel)["values"].kind
        return self.xp.concat([header, self.xp.to_bytes(self.xp.reshape(values, (-1,)), kind)])

    # --- wire -----------------------------------------------------------------------------------

    def _pack(self, layout: Layout, sections: dict[str, Tensor]) -> Tensor:
        parts = []
        for section in layout.sections:
            values = sections[section.name]
            if section.kind == "bits":
                parts.append(self.xp.pack_bits(values, section.width))
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
            else:
                out[section.name] = self.xp.from_bytes(data, section.kind)
        return out

    # --- shared pieces ----------------------------------------------------------------------------

    def _check_spec(self, spec) -> None:
        if type(spec) not in self._compressors:
            raise TypeError(f"expected a compressor spec from horovod_squeeze, got {spec!r}")

    def _sections(self, spec, v, nonce, name) -> dict[str, Tensor]:
        self._check_spec(spec)
        return self._compressors[type(spec)](spec, v, nonce, name)

    def _check_finite(self, value, spec, name) -> None:
        xp = self.xp
        finite = xp.count(xp.abs(value) < math.inf) == math.prod(value.shape)  # NaN fails too
        xp.check(finite, lambda: ValueError(f"{name}: {type(spec).__name__} got NaN or Inf values"))

    def _uniform(self, numel: int, key: int) -> Tensor:
        xp = self.xp
        draws = hash32(xp.arange(numel) ^ key) // 256
        return xp.cast(draws, "float32") * xp.constant(UNIFORM24_SCALE, "float32")

    def _blocks(self, v, numel: int, block_size) -> tuple[Tensor, int, int]:
        """``v`` as a zero-padded (blocks, size) matrix, with the block count and size."""
        size = numel if block_size is None else block_size
        num_blocks = -(-numel // size) if numel else 0
        if num_blocks * size != numel:
            v = self.xp.pad(v, num_blocks * size)
        return self.xp.reshape(v, (num_blocks, size)), num_blocks, size

    def _block_counts(self, numel: int, num_blocks: int, size: int) -> Tensor:
        counts = [size] * num_blocks
        if num_blocks:
            counts[-1] = numel - size * (num_blocks - 1)
        return self.xp.constant(counts, "float64")

    def _per_entry(self, block_values, numel: int, block_size) -> Tensor:
        """Per-block values spread over their entries (one block: left to broadcasting)."""
        if block_size is None or numel <= block_size:
            return block_values
        return self.xp.slice(self.xp.repeat(block_values, block_size), 0, numel)

    def _topk_indices(self, magnitude, k: int) -> Tensor:
        """Ascending indices of the k largest entries, ties to the lower index."""
        xp = self.xp
        threshold = xp.kth_largest(magnitude, k)
        above = magnitude > threshold
        tied = magnitude == threshold
        chosen = above | (tied & (xp.cumsum(tied) <= k - xp.count(above)))
        return xp.reshape(xp.nonzero(chosen), (k,))

    # --- compressors ------------------------------------------------------------------------------

    def _identity(self, spec, v, nonce, name):
        return {"values": v}

    def _fp16(self, spec, v, nonce, name):
        xp = self.xp
        xp.check(xp.count(xp.abs(v) < C.FP16_OVERFLOW) == math.prod(v.shape),
                 lambda: ValueError(f"{name}: FP16 got NaN, Inf or magnitudes above "
                                    f"{C.FP16_MAX} (float16's largest finite value)"))
        return {"values": v}

    def _topk(self, spec, v, nonce, name):
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

    def _randk(self, spec, v, nonce, name):
        xp = self.xp
        numel = math.prod(v.shape)
        self._check_finite(xp.sum64(v), spec, name)
        key = stream_key(spec.seed, nonce)
        values = xp.gather(v, self._randk_indices(spec, numel, key)) * self._randk_scale(spec, numel)
        return {"key": xp.constant([key], "int64"), "values": values}

    def _scaled_sign(self, spec, v, nonce, name):
        xp = self.xp
        numel = math.prod(v.shape)
        blocks, num_blocks, size = self._blocks(v, numel, spec.block_size)
        counts = self._block_counts(numel, num_blocks, size)
        if spec.scale == "l1":
            scales = xp.power_sum64(blocks, 1, axis=1) / counts
        else:
            scales = xp.sqrt(xp.power_sum64(blocks, 2, axis=1) / counts)
        scales = xp.cast(scales, "float32")
        self._check_finite(scales, spec, name)
        if spec.zeros == "positive":
            bits = v >= 0  # -0.0 counts as zero, hence positive
        else:
            bits = (v > 0) | ((v == 0) & (xp.arange(numel) % 2 == 0))
        return {"scales": scales, "signs": bits}

    def _qsgd(self, spec, v, nonce, name):
        xp = self.xp
        numel = math.prod(v.shape)
        quantum = xp.cast(xp.sqrt(xp.power_sum64(v, 2)) / spec.levels, "float32")
        self._check_finite(quantum, spec, name)
        positive = quantum > 0
        safe_quantum = xp.where(positive, quantum, xp.constant(1.0, "float32"))
        ratio = xp.where(positive, xp.abs(v) / safe_quantum, xp.constant(0.0, "float32"))
        floor = xp.floor(ratio)
        up = xp.cast(self._uniform(numel, stream_key(spec.seed, nonce)) < ratio - floor, "float32")
        levels = xp.cast(xp.minimum(floor + up, xp.constant(float(spec.levels), "float32")), "int64")
        return {"quantum": xp.reshape(quantum, (1,)), "codes": levels * 2 + xp.cast(v < 0, "int64")}

    def _ternary(self, spec, v, nonce, name):
        xp = self.xp
        numel = math.prod(v.shape)
        blocks, _, _ = self._blocks(v, numel, spec.block_size)
        if spec.p == "inf":
            self._check_finite(xp.sum64(v), spec, name)
            norms = xp.max(xp.abs(blocks), axis=1)
        else:
            norms = xp.cast(xp.sqrt(xp.power_sum64(blocks, 2, axis=1)), "float32")
            self._check_finite(norms, spec, name)
        norm = self._per_entry(norms, numel, spec.block_size)
        keep = self._uniform(numel, stream_key(spec.seed, nonce)) * norm < xp.abs(v)
        codes = xp.cast(keep, "int64") * (1 + xp.cast(v < 0, "int64"))
        return {"norms": norms, "codes": codes}

    def _natural(self, spec, v, nonce, name):
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

    # --- decoding ---------------------------------------------------------------------------------

    def _decode(self, spec, sections, numel) -> Tensor:
        xp = self.xp
        if isinstance(spec, (C.Identity, C.FP16)):
            return sections["values"]
        if isinstance(spec, C.TopK):
            return xp.scatter(numel, sections["indices"], sections["values"])
        if isinstance(spec, C.RandK):
            indices = self._randk_indices(spec, numel, sections["key"])
            return xp.scatter(numel, indices, sections["values"])
        if isinstance(spec, C.ScaledSign):
            scale = self._per_entry(sections["scales"], numel, spec.block_size)
            return xp.signed_bits(sections["signs"], numel, scale)
        if isinstance(spec, C.QSGD):
            magnitude = xp.cast(sections["codes"] // 2, "float32") * sections["quantum"]
            return xp.signed(sections["codes"] % 2 == 0, magnitude)
        if isinstance(spec, C.Ternary):
            norm = self._per_entry(sections["norms"], numel, spec.block_size)
            codes = sections["codes"]
            zero = xp.constant(0.0, "float32")
            return xp.where(codes == 1, norm, xp.where(codes == 2, -norm, zero))
        if isinstance(spec, C.Natural):
            codes = sections["codes"]
            magnitude = xp.float32_from_bits((codes & 0xFF) * (1 << 23))
            return xp.signed(codes // 256 == 0, magnitude)
        if isinstance(spec, C.ToContractive):
            return (self._decode(spec.inner, sections, numel)
                    * xp.constant(spec.scale(numel), "float32"))
        raise TypeError(f"no codec for {spec!r}")
