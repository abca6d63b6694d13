"""NumPy reference codecs: the test oracle for every compressor's math and wire format.

Written for clarity, not speed: each compressor is a ``compress`` that returns the named sections of
its :class:`~horovod_squeeze.wire.Layout` and a ``decompress`` that rebuilds the float32 vector.
The PyTorch and TensorFlow codecs must produce byte-identical payloads.

Segments: a vector's real entries are the consecutive segments whose lengths ``segments`` lists;
compressors with a scale or norm loop over the segments (and over each segment's blocks), and the
padding past the segments is dropped before compressing and decodes to 0.

Conventions shared by all implementations (they make payloads byte-identical):
- inputs are flattened in C order and computed in float32;
- norms and means accumulate in float64 and are rounded once to float32;
- random draws come from :mod:`horovod_squeeze.streams`.
"""
from __future__ import annotations

import numpy as np

from horovod_squeeze import compressors as C
from horovod_squeeze.streams import UNIFORM24_SCALE, hash32, stream_key
from horovod_squeeze.wire import TRITS_PER_BYTE, Layout

__all__ = ["compress", "decompress", "pack", "unpack"]

_NUMPY_KIND = {"float32": "<f4", "float16": "<f2", "int32": "<i4", "uint32": "<u4",
               "uint16": "<u2", "uint8": "u1"}


# --- wire packing -------------------------------------------------------------------------------

def pack(layout: Layout, sections: dict[str, np.ndarray]) -> np.ndarray:
    """Serializes named sections into one uint8 payload in layout order."""
    parts = []
    for section, _, _ in layout.spans():
        values = np.asarray(sections[section.name]).reshape(-1)
        if values.size != section.count:
            raise AssertionError(f"section {section.name}: {values.size} values, layout says "
                                 f"{section.count}")
        if section.kind == "bits":
            shifts = np.arange(section.width, dtype=np.int64)
            bits = (values.astype(np.int64)[:, None] >> shifts) & 1
            parts.append(np.packbits(bits.reshape(-1).astype(np.uint8), bitorder="little"))
        elif section.kind == "trits":
            digits = np.zeros(section.nbytes * TRITS_PER_BYTE, np.int64)
            digits[:values.size] = values
            weights = 3 ** np.arange(TRITS_PER_BYTE, dtype=np.int64)
            parts.append((digits.reshape(-1, TRITS_PER_BYTE) @ weights).astype(np.uint8))
        else:
            parts.append(values.astype(_NUMPY_KIND[section.kind]).view(np.uint8))
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


def unpack(layout: Layout, payload: np.ndarray) -> dict[str, np.ndarray]:
    """Splits a uint8 payload into its named sections (bits sections as int64 codes)."""
    out = {}
    for section, start, stop in layout.spans():
        raw = payload[start:stop]
        if section.kind == "bits":
            bits = np.unpackbits(raw, bitorder="little")[:section.count * section.width]
            bits = bits.reshape(section.count, section.width).astype(np.int64)
            out[section.name] = (bits << np.arange(section.width, dtype=np.int64)).sum(axis=1)
        elif section.kind == "trits":
            weights = 3 ** np.arange(TRITS_PER_BYTE, dtype=np.int64)
            digits = (raw.astype(np.int64)[:, None] // weights) % 3
            out[section.name] = digits.reshape(-1)[:section.count]
        else:
            out[section.name] = raw.view(_NUMPY_KIND[section.kind]).astype(
                np.float32 if section.kind.startswith("float") else np.int64)
    return out


# --- helpers ----------------------------------------------------------------------------------

def _flat_float32(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name}: compressors take floating-point tensors, got dtype {x.dtype}")
    return np.ascontiguousarray(x, dtype=np.float32).reshape(-1)


def _check_finite(value, spec, name: str) -> None:
    if not np.all(np.isfinite(value)):
        raise ValueError(f"{name}: {type(spec).__name__} got NaN or Inf values")


def _uniform(numel: int, key: int) -> np.ndarray:
    return ((hash32(np.arange(numel, dtype=np.int64) ^ key) // 256) * UNIFORM24_SCALE).astype(np.float32)


def _cut(segments, block_size) -> list[int]:
    """Block lengths: each segment cut into pieces of ``block_size`` (None: the segment whole)."""
    lengths = []
    for length in segments:
        size = length if block_size is None else block_size
        lengths += [min(size, length - start) for start in range(0, length, size)]
    return lengths


def _split(v: np.ndarray, lengths) -> list[np.ndarray]:
    """Consecutive views of ``v`` of the given lengths."""
    parts, start = [], 0
    for length in lengths:
        parts.append(v[start:start + length])
        start += length
    return parts


def _spread(values, lengths) -> np.ndarray:
    """Value ``i`` repeated over the ``lengths[i]`` entries it belongs to."""
    return np.repeat(np.asarray(values, np.float32), lengths)


def _l2(v: np.ndarray) -> np.float32:
    return np.float32(np.sqrt(np.sum(v.astype(np.float64) ** 2)))


def _topk_indices(magnitude: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries, ties to the lower index, returned in ascending order."""
    order = np.argsort(-magnitude, kind="stable")
    return np.sort(order[:k])


# --- compressors: ``v`` holds the real entries, ``segments`` their lengths -----------------------

def _identity(spec, v, segments, nonce, name):
    return {"values": v}


def _fp16(spec, v, segments, nonce, name):
    if not np.all(np.abs(v) < C.FP16_OVERFLOW):  # beyond it, rounding to float16 gives Inf
        raise ValueError(f"{name}: FP16 got NaN, Inf or magnitudes above {C.FP16_MAX} "
                         "(float16's largest finite value)")
    return {"values": v.astype(np.float16)}


def _topk(spec, v, segments, nonce, name):
    _check_finite(np.sum(v, dtype=np.float64), spec, name)
    indices = _topk_indices(np.abs(v), C.topk_count(spec.ratio, v.size))
    return {"indices": indices, "values": v[indices]}


def _randk_indices(spec, numel, key):
    keys = hash32(np.arange(numel, dtype=np.int64) ^ key)
    return np.sort(np.argsort(keys, kind="stable")[:C.topk_count(spec.ratio, numel)])


def _randk_scale(spec, numel):
    return np.float32(numel / max(C.topk_count(spec.ratio, numel), 1) if spec.unbiased else 1.0)


def _randk(spec, v, segments, nonce, name):
    _check_finite(np.sum(v, dtype=np.float64), spec, name)
    key = stream_key(spec.seed, nonce)
    values = v[_randk_indices(spec, v.size, key)] * _randk_scale(spec, v.size)
    return {"key": np.array([key]), "values": values}


def _sign_bits(spec, v):
    bits = v > 0
    zero = v == 0
    if spec.zeros == "positive":
        return bits | zero
    return bits | (zero & (np.arange(v.size) % 2 == 0))


def _scaled_sign(spec, v, segments, nonce, name):
    scales = []
    for block in _split(v, _cut(segments, spec.block_size)):
        if spec.scale == "l1":
            scales.append(np.float32(np.sum(np.abs(block), dtype=np.float64) / block.size))
        else:
            scales.append(np.float32(np.sqrt(np.sum(block.astype(np.float64) ** 2) / block.size)))
    scales = np.array(scales, dtype=np.float32)
    _check_finite(scales, spec, name)
    return {"scales": scales, "signs": _sign_bits(spec, v)}


def _qsgd(spec, v, segments, nonce, name):
    if spec.p == "inf":
        _check_finite(np.sum(v, dtype=np.float64), spec, name)
        norms = [np.float64(np.max(np.abs(segment))) for segment in _split(v, segments)]
    else:
        norms = [np.sqrt(np.sum(segment.astype(np.float64) ** 2))
                 for segment in _split(v, segments)]
    quanta = np.array([np.float32(norm / spec.levels) for norm in norms], dtype=np.float32)
    _check_finite(quanta, spec, name)
    quantum = _spread(quanta, segments)
    ratio = np.abs(v) / np.where(quantum > 0, quantum, np.float32(1))
    ratio[quantum == 0] = 0
    floor = np.floor(ratio)
    up = _uniform(v.size, stream_key(spec.seed, nonce)) < (ratio - floor)
    levels = np.minimum(floor + up, np.float32(spec.levels)).astype(np.int64)
    return {"quantum": quanta, "codes": (levels << 1) | (v < 0)}


def _ternary(spec, v, segments, nonce, name):
    lengths = _cut(segments, spec.block_size)
    blocks = _split(v, lengths)
    if spec.p == "inf":
        _check_finite(np.sum(v, dtype=np.float64), spec, name)
        norms = np.array([np.max(np.abs(b)) for b in blocks], dtype=np.float32)
    else:
        norms = np.array([_l2(b) for b in blocks], dtype=np.float32)
        _check_finite(norms, spec, name)
    keep = _uniform(v.size, stream_key(spec.seed, nonce)) * _spread(norms, lengths) < np.abs(v)
    return {"norms": norms, "codes": np.where(keep, np.where(v < 0, 2, 1), 0)}


def _natural(spec, v, segments, nonce, name):
    bits = v.view(np.int32).astype(np.int64) & 0xFFFFFFFF
    exponent = (bits >> 23) & 0xFF
    if np.any(exponent == 0xFF):
        raise ValueError(f"{name}: Natural got NaN or Inf values")
    mantissa = bits & 0x7FFFFF
    draw = hash32(np.arange(v.size, dtype=np.int64) ^ stream_key(spec.seed, nonce)) >> 9
    up = (draw < mantissa) & (exponent < 0xFE)
    return {"codes": ((bits >> 31) << 8) | (exponent + up)}


def _to_contractive(spec, v, segments, nonce, name):
    return _COMPRESS[type(spec.inner)](spec.inner, v, segments, nonce, name)


_COMPRESS = {C.Identity: _identity, C.FP16: _fp16, C.TopK: _topk, C.RandK: _randk,
             C.ScaledSign: _scaled_sign, C.QSGD: _qsgd, C.Ternary: _ternary,
             C.Natural: _natural, C.ToContractive: _to_contractive}


def _decode(spec, sections, segments) -> np.ndarray:
    """The real entries (``sum(segments)``) of a payload's sections."""
    real = sum(segments)
    if isinstance(spec, (C.Identity, C.FP16)):
        return sections["values"].astype(np.float32)
    if isinstance(spec, C.TopK):
        out = np.zeros(real, np.float32)
        out[sections["indices"]] = sections["values"]
        return out
    if isinstance(spec, C.RandK):
        out = np.zeros(real, np.float32)
        out[_randk_indices(spec, real, int(sections["key"][0]))] = sections["values"]
        return out
    if isinstance(spec, C.ScaledSign):
        scale = _spread(sections["scales"], _cut(segments, spec.block_size))
        return np.where(sections["signs"] == 1, scale, -scale).astype(np.float32)
    if isinstance(spec, C.QSGD):
        quantum = _spread(sections["quantum"], segments)
        magnitude = (sections["codes"] >> 1).astype(np.float32) * quantum
        return np.where(sections["codes"] & 1 == 1, -magnitude, magnitude)
    if isinstance(spec, C.Ternary):
        norm = _spread(sections["norms"], _cut(segments, spec.block_size))
        codes = sections["codes"]
        return np.where(codes == 1, norm, np.where(codes == 2, -norm, np.float32(0)))
    if isinstance(spec, C.Natural):
        codes = sections["codes"]
        magnitude = ((codes & 0xFF) << 23).astype(np.int32).view(np.float32)
        return np.where(codes >> 8 == 1, -magnitude, magnitude)
    if isinstance(spec, C.ToContractive):
        # Each segment by its own factor 1 / (omega + 1) (see ToContractive.segment_scales).
        factor = _spread(spec.segment_scales(real, segments), segments)
        return _decode(spec.inner, sections, segments) * factor
    raise TypeError(f"no reference codec for {spec!r}")


def _check_spec(spec) -> None:
    if type(spec) not in _COMPRESS:
        raise TypeError(f"expected a compressor spec from horovod_squeeze, got {spec!r}")


def compress(spec: C.Compressor, x, *, nonce: int = 0, name: str = "tensor",
             segments=None) -> np.ndarray:
    """Compresses ``x`` (any float array, flattened in C order) into its uint8 wire payload.

    ``nonce`` selects the random stream of stochastic compressors (RandK's ranks must share it).
    ``segments``: the lengths of the real segments (``None``: one, the whole array); the entries
    past them are padding and do not travel.
    """
    _check_spec(spec)
    v = _flat_float32(x, name)
    segments = C.segment_lengths(v.size, segments, name=name)
    real = v[:sum(segments)]
    return pack(spec.layout(v.size, segments),
                _COMPRESS[type(spec)](spec, real, segments, nonce, name))


def decompress(spec: C.Compressor, payload, numel: int, *, name: str = "payload",
               segments=None) -> np.ndarray:
    """Decodes a payload made by :func:`compress` into a flat float32 array of ``numel`` entries
    (the same ``segments``); padding decodes to 0."""
    _check_spec(spec)
    payload = np.asarray(payload)
    segments = C.segment_lengths(numel, segments, name=name)
    layout = spec.layout(numel, segments)
    if payload.dtype != np.uint8 or payload.ndim != 1 or payload.size != layout.nbytes:
        raise ValueError(f"{name}: {type(spec).__name__} payload for {numel} entries must be a 1-D "
                         f"uint8 array of {layout.nbytes} bytes, got {payload.dtype} "
                         f"{payload.shape}")
    out = np.zeros(numel, np.float32)
    out[:sum(segments)] = _decode(spec, unpack(layout, payload), segments)
    return out
