"""EC-SGD, EC-GD, EC-LSVRG and their DIANA forms in NumPy, from their equations (Gorbunov,
Kovalev, Makarenko, Richtárik, NeurIPS 2020, "Linearly converging error compensated SGD").

n nodes minimize ``f = 1/n sum_t f_t`` (:class:`horovod_squeeze.finite_sum.FiniteSum`); every node
holds the same ``x`` (and ``w`` for L-SVRG) and its own error ``e_t`` and shift ``h_t``. Step k:

    g_t = grad f_{t,i}(x)                                        (sgd: i sampled per node)
        | grad f_t(x)                                            (gd)
        | grad f_{t,i}(x) - grad f_{t,i}(w) + grad f_t(w)        (lsvrg)
    u_t = C(gamma (g_t - h_t) + e_t);   e_t = gamma (g_t - h_t) + e_t - u_t
    q_t = Q(g_t - h_t);                 h_t = h_t + alpha q_t    (DIANA; h_t = 0 without a shift)
    x   = x - (mean_t u_t + gamma h);   h   = h + alpha mean_t q_t
    lsvrg, with probability p (one coin for all nodes): w = x (before this step's update)

EF21 (``feedback="ef21"``, Richtárik, Sokolov, Fatkhullin 2021) on the same estimators:

    q_t = C(g_t - h_t);   h_t = h_t + alpha q_t;   h = h + alpha mean_t q_t;   x = x - gamma h

Random draws and the uplink round: :mod:`horovod_squeeze.reference.compensated_uplink`.
"""
from __future__ import annotations

import numpy as np

from horovod_squeeze.reference.compensated_uplink import coin, samples, uplink_round, zero_state

__all__ = ["init_state", "step"]


def init_state(problem, x0: np.ndarray) -> dict:
    x0 = np.asarray(x0, np.float64)
    return {"x": x0.copy(), "w": x0.copy(),
            "grad_at_w": [problem.local_gradient(t, x0) for t in range(problem.ranks)],
            **zero_state(problem.ranks, x0)}


def step(problem, state: dict, k: int, *, estimator: str, compress, shift, alpha: float,
         gamma: float, p: float, batch: int, seed: int, feedback: str = "error") -> dict:
    """One step; returns the new state. ``compress(t, v)`` and ``shift(t, v)`` are node ``t``'s
    compressors (decoded values), ``shift=None`` for no shift."""
    n, x, w = problem.ranks, state["x"], state["w"]
    estimates = []
    for t in range(n):
        if estimator == "gd":
            g = problem.local_gradient(t, x)
        else:
            rows = samples(seed, k, t, problem.rows(t), batch)
            g = problem.local_gradient(t, x, rows)
            if estimator == "lsvrg":
                g = g - problem.local_gradient(t, w, rows) + state["grad_at_w"][t]
        estimates.append(g)
    if feedback == "ef21":
        changes = [compress(t, g - h) for t, (g, h) in enumerate(zip(estimates, state["shift"]))]
        compensation = {"error": state["error"],
                        "shift": [h + alpha * q for h, q in zip(state["shift"], changes)],
                        "mean_shift": state["mean_shift"] + alpha * np.mean(changes, axis=0)}
        x_next = x - gamma * compensation["mean_shift"]
    else:
        u, compensation = uplink_round(state, estimates, estimates, gamma, compress, shift, alpha)
        x_next = x - u
    w_next, grad_at_w = w, state["grad_at_w"]
    if estimator == "lsvrg" and coin(seed, k, p):
        w_next = x
        grad_at_w = [problem.local_gradient(t, x) for t in range(n)]
    return {"x": x_next, "w": w_next, "grad_at_w": grad_at_w, **compensation}
