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

Random draws and the uplink round: :mod:`horovod_squeeze.reference.compensated_uplink`.
"""
from __future__ import annotations

import numpy as np

from horovod_squeeze.reference.compensated_uplink import coin, samples, uplink_round, zero_state

__all__ = ["init_state", "step", "samples", "coin"]


def init_state(problem, x0: np.ndarray) -> dict:
    x0 = np.asarray(x0, np.float64)
    return {"y": x0.copy(), "z": x0.copy(), "w": x0.copy(),
            "grad_at_w": [problem.local_gradient(t, x0) for t in range(problem.ranks)],
            **zero_state(problem.ranks, x0)}


def step(problem, state: dict, k: int, *, compress, shift, alpha: float, theta1: float,
         theta2: float, eta: float, L: float, mu: float, p: float, batch: int,
         seed: int) -> tuple[np.ndarray, dict]:
    """One step; returns ``(x, new_state)``. ``compress(t, v)`` and ``shift(t, v)`` are node
    ``t``'s compressors (decoded values), ``shift=None`` for no shift."""
    n = problem.ranks
    y, z, w = state["y"], state["z"], state["w"]
    x = theta1 * z + theta2 * w + (1 - theta1 - theta2) * y
    estimates = []
    for t in range(n):
        rows = samples(seed, k, t, problem.rows(t), batch)
        estimates.append(problem.local_gradient(t, x, rows) - problem.local_gradient(t, w, rows)
                         + state["grad_at_w"][t])
    u, compensation = uplink_round(state, estimates, state["grad_at_w"], eta / L, compress,
                                   shift, alpha)
    ratio = eta * mu / L
    z_next = (z + ratio * x - u) / (1 + ratio)
    y_next = x + theta1 * (z_next - z)
    w_next, grad_at_w = w, state["grad_at_w"]
    if coin(seed, k, p):
        w_next = y
        grad_at_w = [problem.local_gradient(t, y) for t in range(n)]
    return x, {"y": y_next, "z": z_next, "w": w_next, "grad_at_w": grad_at_w, **compensation}
