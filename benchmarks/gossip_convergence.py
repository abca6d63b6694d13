"""Consensus and convergence of the decentralized algorithms, simulated in NumPy over 8 ranks.

    .venv/bin/python benchmarks/gossip_convergence.py

Two experiments on the NumPy references (:mod:`horovod_squeeze.reference.gossip`), the same code
the bindings are tested against:

- **Consensus** (zero gradients): every rank starts at its own model (standard normal entries plus
  ``3 * rank``, 512 entries) and only gossips; the consensus distance ``mean_i ||x_i - xbar||^2``
  is recorded every step, on a ring, a 2 x 4 torus and the exponential graph.
- **Heterogeneous quadratics** (full gradients): rank ``i`` minimizes ``1/2 ||x - b_i||^2`` with
  its own ``b_i``; the optimum of the sum is ``mean_i b_i``. Each algorithm runs 1500 steps at
  several learning rates; recorded: every rank's mean squared distance to the optimum at the end.

Writes ``benchmarks/results/gossip_convergence.json`` and ``docs/gossip_consensus.png``.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np

import horovod_squeeze as hs
from horovod_squeeze import topology as T
from horovod_squeeze.reference.gossip import init_state, simulate_gossip

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUMEL, RANKS = 512, 8

CONSENSUS = {
    "DPSGD()": hs.DPSGD(),
    "DeepSqueeze(ScaledSign(), consensus_step=0.2)": hs.DeepSqueeze(hs.ScaledSign(), 0.2),
    "DeepSqueeze(ScaledSign(), consensus_step=0.1)": hs.DeepSqueeze(hs.ScaledSign(), 0.1),
    "DeepSqueeze(ScaledSign(), consensus_step=0.05)": hs.DeepSqueeze(hs.ScaledSign(), 0.05),
    "ChocoSGD(ScaledSign(block_size=64), consensus_step=0.2)":
        hs.ChocoSGD(hs.ScaledSign(block_size=64), 0.2),
    "ChocoSGD(TopK(0.1), consensus_step=0.2)": hs.ChocoSGD(hs.TopK(0.1), 0.2),
}
GRAPHS = {"ring": T.ring(RANKS), "torus": T.torus(RANKS), "exponential": T.exponential(RANKS)}
QUADRATIC = {
    "DPSGD()": hs.DPSGD(),
    "DeepSqueeze(ScaledSign(), consensus_step=0.2)": hs.DeepSqueeze(hs.ScaledSign(), 0.2),
    "ChocoSGD(ScaledSign(block_size=64), consensus_step=0.2)":
        hs.ChocoSGD(hs.ScaledSign(block_size=64), 0.2),
}
LEARNING_RATES = [0.1, 0.05, 0.025]


def distance(models, point=None) -> float:
    stacked = np.stack(models).astype(np.float64)
    centre = stacked.mean(axis=0) if point is None else point
    return float(np.mean(np.sum((stacked - centre) ** 2, axis=1)))


def consensus(algorithm, topology, steps=1000):
    """The consensus distance after every step of gossip alone, each rank from its own model."""
    rng = np.random.default_rng(1)
    models = [rng.standard_normal(NUMEL).astype(np.float32) + 3 * i for i in range(topology.size)]
    state = init_state(algorithm, NUMEL, topology.size)
    distances = [distance(models)]
    for step in range(steps):
        models, state = simulate_gossip(algorithm, topology.weights, models, state, step=step)
        distances.append(distance(models))
    return distances


def quadratic(algorithm, learning_rate, steps=1500):
    rng = np.random.default_rng(2)
    targets = [rng.standard_normal(NUMEL).astype(np.float32) * (1 + i) for i in range(RANKS)]
    optimum = np.mean(np.stack(targets).astype(np.float64), axis=0)
    models = [np.zeros(NUMEL, np.float32) for _ in range(RANKS)]
    state = init_state(algorithm, NUMEL, RANKS)
    for step in range(steps):
        stepped = [x - (x - b) * np.float32(learning_rate) for x, b in zip(models, targets)]
        models, state = simulate_gossip(algorithm, T.ring(RANKS).weights, stepped, state,
                                        step=step)
    return {"to_optimum": distance(models, optimum),
            "average_to_optimum": float(np.sum((np.mean(np.stack(models), axis=0) - optimum) ** 2)),
            "start_to_optimum": distance([np.zeros(NUMEL)] * RANKS, optimum)}


def main():
    results = {"benchmark": "gossip_convergence", "ranks": RANKS, "numel": NUMEL,
               "spectral_gaps": {name: g.spectral_gap for name, g in GRAPHS.items()},
               "consensus": {}, "quadratic": {}}
    for label, algorithm in CONSENSUS.items():
        for graph, topology in GRAPHS.items():
            distances = consensus(algorithm, topology)
            results["consensus"][f"{label} / {graph}"] = {
                "every_10_steps": distances[::10], "start": distances[0],
                "floor": float(np.mean(distances[-200:]))}
            print(f"{label:<58} {graph:<12} start {distances[0]:.3g}  step 200 "
                  f"{distances[200]:.3g}  step 1000 {distances[-1]:.3g}")
    for label, algorithm in QUADRATIC.items():
        for lr in LEARNING_RATES:
            outcome = quadratic(algorithm, lr)
            results["quadratic"][f"{label} / lr={lr}"] = outcome
            print(f"{label:<58} lr {lr:<6} ranks to optimum {outcome['to_optimum']:.3g}, "
                  f"average to optimum {outcome['average_to_optimum']:.3g} "
                  f"(start {outcome['start_to_optimum']:.3g})")
    out = ROOT / "benchmarks" / "results" / "gossip_convergence.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(GRAPHS), figsize=(13, 4), sharey=True)
    for ax, graph in zip(axes, GRAPHS):
        for label in CONSENSUS:
            values = results["consensus"][f"{label} / {graph}"]["every_10_steps"]
            ax.semilogy(range(0, 10 * len(values), 10), values, label=label)
        ax.set_title(f"{graph} ({RANKS} ranks, spectral gap {GRAPHS[graph].spectral_gap:.3g})")
        ax.set_xlabel("gossip steps, zero gradients")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("consensus distance")
    axes[-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "gossip_consensus.png", dpi=110)


if __name__ == "__main__":
    main()
