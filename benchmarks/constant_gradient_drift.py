"""Constant-gradient drift: how far error compensation keeps training from the true sum.

    .venv/bin/python benchmarks/constant_gradient_drift.py

Every rank's gradient is a fixed random vector g_r (2^18 entries) at every step; SGD with learning
rate 1 for 200 steps under ``horovodrun`` (Gloo), on 2 and 4 ranks, for DoubleSqueeze,
ErrorFeedback and NoFeedback around ``ScaledSign()``, over the sharded and allgather exchanges.
The drift is ``||w_T + T mean_r g_r|| / ||T mean_r g_r||``: error compensation keeps it bounded,
plain compression lets it grow with the steps. Prints the table and writes
``benchmarks/results/constant_gradient_drift.json``. ``tests/test_torch_optimizer.py`` runs the same
measurement and asserts on it.
"""
import hashlib
import json
import pathlib
import sys

import numpy as np

import horovod_squeeze as hs

RESULTS = pathlib.Path(__file__).parent / "results" / "constant_gradient_drift.json"
NUMEL = 2 ** 18
STEPS = 200
ALGORITHMS = {"DoubleSqueeze": hs.DoubleSqueeze(hs.ScaledSign()),
              "ErrorFeedback": hs.ErrorFeedback(hs.ScaledSign()),
              "NoFeedback": hs.NoFeedback(hs.ScaledSign())}
EXCHANGES = ("sharded", "allgather")


def constant_gradient(rank):
    return np.random.default_rng(2024 + rank).standard_normal(NUMEL).astype(np.float32)


def rank_drifts():
    """Rank body: per (algorithm, exchange), the drift and a digest of the final weights."""
    import horovod.torch as hvd
    import torch

    import horovod_squeeze.torch as hst

    hvd.init()
    exact = STEPS * np.mean([constant_gradient(r).astype(np.float64) for r in range(hvd.size())],
                            axis=0)
    grad = torch.from_numpy(constant_gradient(hvd.rank()))
    out = {}
    for name, algorithm in ALGORITHMS.items():
        for exchange in EXCHANGES:
            weight = torch.nn.Parameter(torch.zeros(NUMEL))
            optimizer = hst.DistributedOptimizer(
                torch.optim.SGD([weight], lr=1.0), named_parameters=[("w", weight)],
                compression=algorithm, exchange=exchange)
            for _ in range(STEPS):
                optimizer.zero_grad()
                (weight * grad).sum().backward()
                optimizer.step()
            final = weight.detach().numpy()
            drift = np.linalg.norm(final.astype(np.float64) + exact) / np.linalg.norm(exact)
            out[name, exchange] = (float(drift), hashlib.sha256(final.tobytes()).hexdigest())
    return out


def measure(num_proc: int) -> list[dict]:
    """Every rank's ``{(algorithm, exchange): (drift, weights digest)}``."""
    from horovod_squeeze.testing import run_on_ranks

    return run_on_ranks(rank_drifts, num_proc, "gloo", timeout=400)


def main() -> None:
    rows = []
    for num_proc in (2, 4):
        results = measure(num_proc)
        for (algorithm, exchange), (drift, digest) in results[0].items():
            identical = all(r[algorithm, exchange][1] == digest for r in results)
            rows.append({"ranks": num_proc, "algorithm": repr(ALGORITHMS[algorithm]),
                         "exchange": exchange, "drift": drift,
                         "weights_identical_across_ranks": identical})
            print(f"{num_proc} ranks  {algorithm:>13}  {exchange:>9}  drift {drift:.4f}  "
                  f"ranks identical: {identical}")
    RESULTS.write_text(json.dumps({"config": {"numel": NUMEL, "steps": STEPS, "lr": 1.0,
                                              "controller": "gloo"}, "rows": rows}, indent=1)
                       + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    # Imported by name, so the rank body pickles by reference in every rank.
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from benchmarks.constant_gradient_drift import main as run
    run()
