"""Error feedback and momentum, in the NumPy simulation: softmax regression on digits, 4 workers.

    .venv/bin/python benchmarks/momentum_simulation.py

Each algorithm runs the reference simulation (``horovod_squeeze.reference.simulate``, sharded
exchange) for 300 steps of batch 32 per worker, learning rate 0.5, with heavy-ball momentum 0 and
0.9 applied to the averaged gradient, as a wrapped ``torch.optim.SGD`` would. Prints the training-set
accuracy and writes ``benchmarks/results/momentum_simulation.json``.

``ErrorFeedback`` and ``NoFeedback`` run twice: with ``server=ScaledSign()`` (the second pass
compressed without feedback, what these rows measured before algorithms took a compressor per pass)
and as ``ErrorFeedback(C)`` / ``NoFeedback(C)`` now default, with the average returned exactly.
``--steps`` shortens the run for a quick check (the results file is then not written).
"""
import argparse
import json
import pathlib

import numpy as np
from sklearn.datasets import load_digits

import horovod_squeeze as hs
from horovod_squeeze.reference.simulate import init_state, simulate_step

RESULTS = pathlib.Path(__file__).parent / "results" / "momentum_simulation.json"
WORKERS, STEPS, BATCH, LR = 4, 300, 32, 0.5
ALGORITHMS = {
    "fp32 average": None,
    "DoubleSqueeze(ScaledSign)": hs.DoubleSqueeze(hs.ScaledSign()),
    "ErrorFeedback(ScaledSign, server=ScaledSign)": hs.ErrorFeedback(hs.ScaledSign(),
                                                                     server=hs.ScaledSign()),
    "ErrorFeedback(ScaledSign), exact average": hs.ErrorFeedback(hs.ScaledSign()),
    "NoFeedback(ScaledSign, server=ScaledSign)": hs.NoFeedback(hs.ScaledSign(),
                                                               server=hs.ScaledSign()),
    "NoFeedback(ScaledSign), exact average": hs.NoFeedback(hs.ScaledSign()),
    "DoubleSqueeze(TopK(0.05))": hs.DoubleSqueeze(hs.TopK(0.05)),
}


def train(algorithm, momentum, x, y_onehot, labels, seed=0, steps=STEPS):
    rng = np.random.default_rng(seed)
    weights = np.zeros((x.shape[1], 10), np.float32)
    velocity = np.zeros_like(weights)
    state = None if algorithm is None else init_state(algorithm, "sharded", weights.size, WORKERS)
    for step in range(steps):
        grads = []
        for _ in range(WORKERS):
            idx = rng.integers(0, len(x), BATCH)
            logits = x[idx] @ weights
            probs = np.exp(logits - logits.max(1, keepdims=True))
            probs /= probs.sum(1, keepdims=True)
            grads.append((x[idx].T @ (probs - y_onehot[idx]) / BATCH).astype(np.float32).reshape(-1))
        if algorithm is None:
            averaged = np.mean(grads, axis=0)
        else:
            averaged, state = simulate_step(algorithm, "sharded", grads, state, step=step)
        velocity = momentum * velocity + averaged.reshape(weights.shape)
        weights -= LR * velocity
    return float(((x @ weights).argmax(1) == labels).mean())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS,
                        help=f"steps per run (default {STEPS}; other counts: a quick check, "
                        "no results file)")
    args = parser.parse_args()
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y_onehot = np.eye(10, dtype=np.float32)[digits.target]
    rows = []
    for name, algorithm in ALGORITHMS.items():
        for momentum in (0.0, 0.9):
            accuracy = train(algorithm, momentum, x, y_onehot, digits.target, steps=args.steps)
            rows.append({"algorithm": name, "spec": repr(algorithm), "momentum": momentum,
                         "accuracy": accuracy})
            print(f"{name:<44} momentum {momentum:.1f}: {100 * accuracy:.2f}%")
    if args.steps != STEPS:
        print(f"{args.steps} steps instead of {STEPS}: {RESULTS} not written")
        return
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "momentum_simulation", "command": "python benchmarks/momentum_simulation.py",
        "setup": {"workers": WORKERS, "steps": STEPS, "batch_per_worker": BATCH, "lr": LR,
                  "exchange": "sharded", "metric": "training-set accuracy"},
        "results": rows}, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
