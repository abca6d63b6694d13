"""Counter-based random streams that NumPy, PyTorch and TensorFlow reproduce bit for bit.

Stochastic compressors (RandK's indices, QSGD's and Ternary's rounding, Natural's rounding) draw
their randomness from ``hash32(i ^ key)`` for entry ``i``, where ``key = stream_key(seed, nonce)``.
The hash is Wellons' ``lowbias32``, a bijection on 32-bit integers, so RandK's keys never tie.

The functions below use only ``^ & * + //`` on int64 arrays holding values below 2^32, which
NumPy arrays, PyTorch tensors and TensorFlow tensors all implement identically (TensorFlow tensors
have no shift operators, so shifts are written as ``// 2**n`` and ``* 2**n`` of non-negative values);
products are split into 16-bit halves so no intermediate reaches 2^63.
"""
from __future__ import annotations

__all__ = ["MASK32", "hash32", "stream_key", "UNIFORM24_SCALE"]

MASK32 = 0xFFFFFFFF
#: ``(hash32(...) // 256) * UNIFORM24_SCALE`` is a float32-exact uniform draw in [0, 1).
UNIFORM24_SCALE = 2.0 ** -24
_GOLDEN = 0x9E3779B9


def _mul32(x, c: int):
    """``x * c mod 2^32`` for int64 ``x < 2^32`` and a 32-bit constant ``c``, without overflow."""
    return (x * (c & 0xFFFF) + ((x * (c >> 16)) & 0xFFFF) * 0x10000) & MASK32


def hash32(x):
    """lowbias32: a 32-bit integer bijection with good avalanche (works on ints and int64 arrays)."""
    x = x ^ (x // (1 << 16))
    x = _mul32(x, 0x21F0AAAD)
    x = x ^ (x // (1 << 15))
    x = _mul32(x, 0x735A2D97)
    return x ^ (x // (1 << 15))


def stream_key(seed: int, nonce: int) -> int:
    """32-bit key of the stream for a compressor ``seed`` and a per-call ``nonce``.

    ``nonce`` is any int, or an int64 tensor (a step counter read inside ``tf.function``).
    """
    key = hash32((seed & MASK32) ^ _GOLDEN)
    key = hash32(key ^ (nonce & MASK32))
    return hash32(key ^ ((nonce // (1 << 32)) & MASK32))
