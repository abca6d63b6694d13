"""What ECLK and the EC-SGD family share, in NumPy: the random draws, and one round of the
error-compensated uplink with its DIANA-style shift, for n nodes::

    u_t = C(scale (g_t - h_t) + e_t);   e_t = scale (g_t - h_t) + e_t - u_t
    q_t = Q(target_t - h_t);            h_t = h_t + alpha q_t      (h_t = 0 without Q)
    u   = mean_t u_t + scale h;         h   = h + alpha mean_t q_t

Random draws: node ``t`` at step ``k`` samples rows ``hash32(j ^ stream_key(seed, k * 65536 +
t)) mod m_t`` for ``j < batch``; the snapshot coin is ``uniform24(stream_key(seed ^ 0xC0111,
k)) < p``.
"""
from __future__ import annotations

import numpy as np

from horovod_squeeze.streams import UNIFORM24_SCALE, hash32, stream_key

__all__ = ["samples", "coin", "uplink_round", "zero_state"]

_COIN_SEED = 0xC0111


def samples(seed: int, step: int, rank: int, rows: int, batch: int) -> np.ndarray:
    key = stream_key(seed, step * 65536 + rank)
    return hash32(np.arange(batch, dtype=np.int64) ^ key) % rows


def coin(seed: int, step: int, p: float) -> bool:
    return (hash32(stream_key(seed ^ _COIN_SEED, step)) // 256) * UNIFORM24_SCALE < p


def zero_state(n: int, like: np.ndarray) -> dict:
    """Errors, shifts and the shifts' mean, all zero."""
    return {"error": [np.zeros_like(like) for _ in range(n)],
            "shift": [np.zeros_like(like) for _ in range(n)], "mean_shift": np.zeros_like(like)}


def uplink_round(state: dict, estimates, targets, scale: float, compress, shift,
                 alpha: float) -> tuple[np.ndarray, dict]:
    """``(u, new error / shift / mean_shift)``; ``compress(t, v)`` and ``shift(t, v)`` are node
    ``t``'s compressors (decoded values), ``shift=None`` for no shift."""
    sent, errors, shifts, shift_messages = [], [], [], []
    for t, (g, target) in enumerate(zip(estimates, targets)):
        v = scale * (g - state["shift"][t]) + state["error"][t]
        u = compress(t, v)
        sent.append(u)
        errors.append(v - u)
        q = (np.zeros_like(g) if shift is None
             else shift(t, target - state["shift"][t]))
        shifts.append(state["shift"][t] + alpha * q)
        shift_messages.append(q)
    u = np.mean(sent, axis=0) + scale * state["mean_shift"]
    return u, {"error": errors, "shift": shifts,
               "mean_shift": state["mean_shift"] + alpha * np.mean(shift_messages, axis=0)}
