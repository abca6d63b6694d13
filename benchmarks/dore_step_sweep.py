"""DORE's model-pass steps: which (beta, eta) keep the model error bounded, with the NumPy reference.

    .venv/bin/python benchmarks/dore_step_sweep.py

A small heterogeneous ridge regression (4 workers, 300 unknowns, 100 rows each, centred at ``3 i``;
full local gradients, learning rate ``1 / L``), ``Ternary()`` both ways, through the NumPy reference
of :class:`horovod_squeeze.DORE` (``horovod_squeeze.reference.simulate``) on the sharded exchange
for a grid of ``beta`` and ``eta``, and on the allgather exchange (blocks cut differently) for two
values of ``eta``. Prints and writes the relative distance to the optimum after 300 and 600 steps
(``inf``: diverged) to ``benchmarks/results/dore_step_sweep.json``; the defaults in
``docs/algorithms.md`` come from it.
"""
import itertools
import json
import pathlib
import warnings

import numpy as np

import horovod_squeeze as hs
from horovod_squeeze.reference.simulate import init_state, simulate_step

RESULTS = pathlib.Path(__file__).parent / "results" / "dore_step_sweep.json"
WORKERS, DIM, ROWS, RIDGE, CHECKPOINTS = 4, 300, 100, 0.1, (300, 600)


def problem():
    rng = np.random.default_rng(0)
    a = [rng.standard_normal((ROWS, DIM)) / np.sqrt(ROWS) for _ in range(WORKERS)]
    b = [rng.standard_normal(ROWS) + 3 * i for i in range(WORKERS)]
    hessian = sum(m.T @ m for m in a) / WORKERS + RIDGE * np.eye(DIM)
    optimum = np.linalg.solve(hessian, sum(m.T @ v for m, v in zip(a, b)) / WORKERS)

    def gradient(i, x):
        return (a[i].T @ (a[i] @ x - b[i]) + RIDGE * x).astype(np.float32)

    return gradient, optimum, 1.0 / np.linalg.eigvalsh(hessian).max()


def distances(algorithm, exchange, gradient, optimum, lr):
    x = np.zeros(DIM, np.float32)
    state = init_state(algorithm, exchange, DIM, WORKERS)
    out = []
    for step in range(max(CHECKPOINTS)):
        try:
            increment, state = simulate_step(algorithm, exchange,
                                             [gradient(i, x) for i in range(WORKERS)], state,
                                             step=step, learning_rate=lr)
        except ValueError:  # the compressors refuse non-finite values: diverged
            return out + [float("inf")] * (len(CHECKPOINTS) - len(out))
        x = x + increment
        if step + 1 in CHECKPOINTS:
            distance = np.linalg.norm(x - optimum) / np.linalg.norm(optimum)
            out.append(float(distance) if np.isfinite(distance) else float("inf"))
    return out


def main() -> None:
    gradient, optimum, lr = problem()
    cases = [("sharded", beta, eta) for beta, eta in
             itertools.product((1.0, 0.5, 0.25), (1.0, 0.7, 0.5, 0.35, 0.2))]
    cases += [("allgather", 1.0, eta) for eta in (0.3, 0.1)]
    rows = []
    for exchange, beta, eta in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the rules warn outside their bounds: the point here
            found = distances(hs.DORE(hs.Ternary(), alpha=0.1, beta=beta, eta=eta), exchange,
                              gradient, optimum, lr)
        rows.append({"exchange": exchange, "beta": beta, "eta": eta,
                     **{f"distance_after_{c}": d for c, d in zip(CHECKPOINTS, found)}})
        print(f"{exchange:>9} beta {beta:<4} eta {eta:<4} "
              + "  ".join(f"{c} steps: {d:.1e}" for c, d in zip(CHECKPOINTS, found)), flush=True)
    RESULTS.write_text(json.dumps({"config": {
        "workers": WORKERS, "dim": DIM, "rows_per_worker": ROWS, "ridge": RIDGE, "lr": "1/L",
        "alpha": 0.1, "compressor": repr(hs.Ternary())}, "rows": rows}, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
