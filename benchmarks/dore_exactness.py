"""Exactness: DORE converges linearly to the exact optimum; error feedback stops short of it.

    .venv/bin/python benchmarks/dore_exactness.py

Heterogeneous ridge regression on 4 ranks under ``horovodrun`` (Gloo): rank r holds its own rows,
centred at ``3 r``, so the ranks' gradients at the optimum differ and only sum to zero; every step
uses the full local gradient. PyTorch SGD with learning rate ``1 / (2 L)`` through
``horovod_squeeze.torch.DistributedOptimizer``, ternary compression both ways (``Ternary()``:
blocks of 256, ``p = inf``), against the exact optimum (solved in float64). The model is float64
(so the engine keeps float64 state; payloads are the same as in float32) except in the rows marked
float32. Contenders: DORE, DoubleSqueeze and ErrorFeedback with the same compressors (made
contractive where error feedback needs it), DORE on a float32 model, and uncompressed Horovod
gradient descent in float64 and float32 (the floors each precision allows).
Prints the relative distance ``||x - x*|| / ||x*||`` every 10 steps and writes
``benchmarks/results/dore_exactness.json``; ``docs/dore_exactness.png`` plots it.
"""
import hashlib
import json
import pathlib
import sys

import numpy as np

import horovod_squeeze as hs

RESULTS = pathlib.Path(__file__).parent / "results" / "dore_exactness.json"
PLOT = pathlib.Path(__file__).resolve().parents[1] / "docs" / "dore_exactness.png"
RANKS, DIM, ROWS, RIDGE, STEPS, EVERY = 4, 2048, 2048, 0.1, 600, 10
# name -> (algorithm or None for Horovod's uncompressed allreduce, the model's dtype)
CONTENDERS = {
    "DORE": (hs.DORE(hs.Ternary()), "float64"),
    "DoubleSqueeze": (hs.DoubleSqueeze(hs.ToContractive(hs.Ternary())), "float64"),
    "ErrorFeedback": (hs.ErrorFeedback(hs.ToContractive(hs.Ternary())), "float64"),
    "fp64": (None, "float64"),
    "DORE (float32)": (hs.DORE(hs.Ternary()), "float32"),
    "fp32": (None, "float32"),
}


def rank_data(rank):
    rng = np.random.default_rng(100 + rank)
    a = (rng.standard_normal((ROWS, DIM)) / np.sqrt(ROWS)).astype(np.float32)
    b = (rng.standard_normal(ROWS) + 3 * rank).astype(np.float32)
    return a, b


def problem():
    """The exact optimum (float64) and the learning rate, 1 / (2 L) of the mean objective (DORE's
    step must shrink with the compressors' variance; at 1 / L it converges far more slowly)."""
    data = [rank_data(r) for r in range(RANKS)]
    hessian = sum(a.T.astype(np.float64) @ a for a, _ in data) / RANKS + RIDGE * np.eye(DIM)
    rhs = sum(a.T.astype(np.float64) @ b for a, b in data) / RANKS
    return np.linalg.solve(hessian, rhs), 0.5 / np.linalg.eigvalsh(hessian).max()


def rank_trajectories():
    """Rank body: per contender, the relative distance every EVERY steps and a weights digest."""
    import horovod.torch as hvd
    import torch

    import horovod_squeeze.torch as hst

    hvd.init()
    optimum, lr = problem()
    data = rank_data(hvd.rank())
    out = {}
    for name, (algorithm, dtype) in CONTENDERS.items():
        a, b = (torch.from_numpy(t.astype(dtype)) for t in data)
        x = torch.nn.Parameter(torch.zeros(DIM, dtype=getattr(torch, dtype)))
        sgd = torch.optim.SGD([x], lr=float(lr))
        optimizer = (hvd.DistributedOptimizer(sgd, named_parameters=[("x", x)])
                     if algorithm is None else
                     hst.DistributedOptimizer(sgd, named_parameters=[("x", x)],
                                              compression=algorithm, min_compress_numel=0))
        distances = []
        for step in range(STEPS + 1):
            if step % EVERY == 0:
                error = x.detach().double().numpy() - optimum
                distances.append(float(np.linalg.norm(error) / np.linalg.norm(optimum)))
            if step == STEPS:
                break
            optimizer.zero_grad()
            loss = 0.5 * ((a @ x - b) ** 2).sum() + 0.5 * RIDGE * (x ** 2).sum()
            loss.backward()
            optimizer.step()
        out[name] = (distances, hashlib.sha256(x.detach().numpy().tobytes()).hexdigest())
    return out


def plot(rows) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for row in rows:
        steps = np.arange(len(row["distance"])) * EVERY
        ax.semilogy(steps, np.maximum(row["distance"], 1e-16), label=row["contender"],
                    linestyle="--" if row["precision"] == "float32" else "-")
    ax.set_xlabel("step (full local gradients, lr = 1/(2L))")
    ax.set_ylabel("||x - x*|| / ||x*||")
    ax.set_title(f"Heterogeneous ridge regression, {RANKS} ranks, Ternary() both ways\n"
                 "float64 models; dashed: float32", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)


def main() -> None:
    from horovod_squeeze.testing import run_on_ranks

    results = run_on_ranks(rank_trajectories, RANKS, "gloo", timeout=900)
    rows = []
    for name, (algorithm, dtype) in CONTENDERS.items():
        distances, digest = results[0][name]
        identical = all(r[name][1] == digest for r in results)
        below = next((i * EVERY for i, d in enumerate(distances) if d <= 1e-8), None)
        rows.append({"contender": name, "algorithm": repr(algorithm) if algorithm else "Horovod",
                     "precision": dtype, "distance": distances, "final": distances[-1],
                     "first_step_at_or_below_1e-8": below,
                     "weights_identical_across_ranks": identical})
        marks = "  ".join(f"{d:.1e}" for d in distances[::5])
        print(f"{name:>14}  every {5 * EVERY} steps: {marks}  <=1e-8 at step {below}  "
              f"ranks identical: {identical}")
    RESULTS.write_text(json.dumps({"config": {
        "ranks": RANKS, "dim": DIM, "rows_per_rank": ROWS, "ridge": RIDGE, "steps": STEPS,
        "every": EVERY, "lr": "1/(2L)", "controller": "gloo"}, "rows": rows}, indent=1) + "\n")
    plot(rows)
    print(f"wrote {RESULTS} and {PLOT}")


if __name__ == "__main__":
    # Imported by name, so the rank body pickles by reference in every rank.
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from benchmarks.dore_exactness import main as run
    run()
