"""ECLK, error-compensated loopless Katyusha, in NumPy, from its equations (docs/algorithms.md).

n nodes minimize ``f = 1/n sum_t f_t`` (:class:`horovod_squeeze.finite_sum.FiniteSum`). Every node
holds the same ``x, y, z, w`` (they change only through averaged messages) and its own error
``e_t``, shift ``h_t`` and ``grad f_t(w)``; the server side keeps ``h = mean_t h_t``. Step k:

    x   = theta1 z + theta2 w + (1 - theta1 - theta2) y
    g_t = grad f_{t,i}(x) - grad f_{t,i}(w) + grad f_t(w)            (L-SVRG, i sampled per node)
    u_t = C(eta / L (g_t - h_t) + e_t);   e_t = e_t + eta / L (g_t - h_t) - u_t
    q_t = Q(grad f_t(w) - h_t);           h_t = h_t + alpha q_t      (the shift, DIANA-style)
    u   = mean_t u_t + eta / L h;         h   = h + alpha mean_t q_t
    z+  = (z + eta mu / L x - u) / (1 + eta mu / L)
    y   = x + theta1 (z+ - z);  z = z+
    with probability p (one coin for all nodes):  w = y_previous,  grad f_t(w) recomputed

``h_t`` learns ``grad f_t(x*)``, so at the optimum the compressed quantity vanishes and the
convergence is linear to the exact optimum even when the nodes' data differ. Without a shift
compressor (``shift=None``) ``h_t = 0``: plain error-compensated L-Katyusha.

Random draws: node ``t`` at step ``k`` samples rows ``hash32(j ^ stream_key(seed, k * 65536 +
t)) mod m_t`` for ``j < batch``; the coin is ``uniform24(stream_key(seed ^ 0xC0111, k)) < p``.
"""
from __future__ import annotations

import numpy as np

from horovod_squeeze.streams import UNIFORM24_SCALE, hash32, stream_key

__all__ = ["init_state", "step", "samples", "coin"]

_COIN_SEED = 0xC0111


def samples(seed: int, step: int, rank: int, rows: int, batch: int) -> np.ndarray:
    key = stream_key(seed, step * 65536 + rank)
    return hash32(np.arange(batch, dtype=np.int64) ^ key) % rows


def coin(seed: int, step: int, p: float) -> bool:
    return (hash32(stream_key(seed ^ _COIN_SEED, step)) // 256) * UNIFORM24_SCALE < p


def init_state(problem, x0: np.ndarray) -> dict:
    n = problem.ranks
    x0 = np.asarray(x0, np.float64)
    return {"y": x0.copy(), "z": x0.copy(), "w": x0.copy(),
            "grad_at_w": [problem.local_gradient(t, x0) for t in range(n)],
            "error": [np.zeros_like(x0) for _ in range(n)],
            "shift": [np.zeros_like(x0) for _ in range(n)], "mean_shift": np.zeros_like(x0)}


def step(problem, state: dict, k: int, *, compress, shift, alpha: float, theta1: float,
         theta2: float, eta: float, L: float, mu: float, p: float, batch: int,
         seed: int) -> tuple[np.ndarray, dict]:
    """One step; returns ``(x, new_state)``. ``compress(t, v)`` and ``shift(t, v)`` are node
    ``t``'s compressors (decoded values), ``shift=None`` for no shift."""
    n = problem.ranks
    y, z, w = state["y"], state["z"], state["w"]
    x = theta1 * z + theta2 * w + (1 - theta1 - theta2) * y
    sent, errors, shifts, shift_messages = [], [], [], []
    for t in range(n):
        rows = samples(seed, k, t, problem.rows(t), batch)
        g = (problem.local_gradient(t, x, rows) - problem.local_gradient(t, w, rows)
             + state["grad_at_w"][t])
        v = eta / L * (g - state["shift"][t]) + state["error"][t]
        u = compress(t, v)
        sent.append(u)
        errors.append(v - u)
        if shift is None:
            shifts.append(state["shift"][t])
            shift_messages.append(np.zeros_like(x))
        else:
            q = shift(t, state["grad_at_w"][t] - state["shift"][t])
            shifts.append(state["shift"][t] + alpha * q)
            shift_messages.append(q)
    u = np.mean(sent, axis=0) + eta / L * state["mean_shift"]
    mean_shift = state["mean_shift"] + alpha * np.mean(shift_messages, axis=0)
    ratio = eta * mu / L
    z_next = (z + ratio * x - u) / (1 + ratio)
    y_next = x + theta1 * (z_next - z)
    w_next, grad_at_w = w, state["grad_at_w"]
    if coin(seed, k, p):
        w_next = y
        grad_at_w = [problem.local_gradient(t, y) for t in range(n)]
    return x, {"y": y_next, "z": z_next, "w": w_next, "grad_at_w": grad_at_w, "error": errors,
               "shift": shifts, "mean_shift": mean_shift}
