"""Soak: 10,000 steps of every algorithm; memory, step time and residual norms must stay flat.

    .venv/bin/python benchmarks/soak.py [--steps 10000] [--every 500] [--ranks 2]

Each algorithm trains a small MLP (about 42k parameters: two compressed weight matrices, the
small ones averaged uncompressed) on generated data for ``--steps`` steps on 2 ranks under ``horovodrun`` (Gloo), through
``horovod_squeeze.torch.DistributedOptimizer``. Every ``--every`` steps each rank records its
resident memory (``/proc/self/statm``), the mean step time of the window and the largest norm of
its algorithm state. Written to ``benchmarks/results/soak.json``; printed as a table.

What "flat" means here, after the first 10% of the steps (allocator warm-up), comparing the first
and the last quarter of what remains:
- memory: the last quarter's mean resident size within 1% of the first quarter's (no drift; the
  peak-to-peak spread, which allocator churn moves both ways, is reported beside it);
- step time: the last quarter's median within 1.5x of the first quarter's (a shared machine
  jitters; a leak grows without bound);
- residual norms: the last quarter's largest at most 2x the first quarter's largest (error
  compensation keeps residuals bounded; a divergence grows without bound; shifts and errors that
  decay as training converges pass).

``--reevaluate`` recomputes the verdicts of an existing results file from its series.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np

import horovod_squeeze as hs

RESULTS = pathlib.Path(__file__).parent / "results" / "soak.json"
ALGORITHMS = {
    "DoubleSqueeze(ScaledSign)": (hs.DoubleSqueeze(hs.ScaledSign()), "sgd-momentum"),
    "DoubleSqueeze(TopK(0.01))": (hs.DoubleSqueeze(hs.TopK(0.01)), "sgd-momentum"),
    "ErrorFeedback(ScaledSign), Adam": (hs.ErrorFeedback(hs.ScaledSign()), "adam"),
    "NoFeedback(QSGD(4))": (hs.NoFeedback(hs.QSGD(4)), "sgd"),
    "ServerFeedback(ToContractive(QSGD(4)))": (hs.ServerFeedback(hs.ToContractive(hs.QSGD(4))),
                                               "sgd"),
    "DORE(Ternary)": (hs.DORE(hs.Ternary()), "sgd"),
    "DoubleQuantization(4, 8)": (hs.DoubleQuantization(b=4, b_x=8), "sgd"),
}


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def soak_rank(steps: int, every: int) -> dict:
    """Rank body: every algorithm in turn, its series."""
    import horovod.torch as hvd
    import torch

    import horovod_squeeze.torch as hst

    hvd.init()
    torch.set_num_threads(1)
    out = {}
    for name, (algorithm, kind) in ALGORITHMS.items():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                    torch.nn.Linear(256, 96), torch.nn.ReLU(),
                                    torch.nn.Linear(96, 10))
        if kind == "adam":
            wrapped = torch.optim.Adam(model.parameters(), lr=1e-3)
        else:
            wrapped = torch.optim.SGD(model.parameters(), lr=0.05,
                                      momentum=0.9 if kind == "sgd-momentum" else 0.0)
        optimizer = hst.DistributedOptimizer(wrapped, named_parameters=model.named_parameters(),
                                             compression=algorithm)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        generator = torch.Generator().manual_seed(hvd.rank())
        x = torch.randn(4096, 64, generator=generator)
        y = (x[:, :10].argmax(1) + (x[:, 10] > 1).long()) % 10
        series = {"step": [], "rss_bytes": [], "step_seconds": [], "state_norm": [],
                  "loss": []}
        started, losses = time.perf_counter(), []
        for step in range(1, steps + 1):
            batch = torch.randint(0, len(x), (32,), generator=generator)
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if step % every == 0:
                now = time.perf_counter()
                norms = [value for tensors in optimizer.state_norms().values()
                         for value in tensors.values()]
                series["step"].append(step)
                series["rss_bytes"].append(resident_bytes())
                series["step_seconds"].append((now - started) / every)
                series["state_norm"].append(max(norms, default=0.0))
                series["loss"].append(float(np.mean(losses)))
                started, losses = time.perf_counter(), []
        out[name] = series
        del optimizer, model
    return out


def verdict(series: dict, warmup: int) -> dict:
    keep = [i for i, step in enumerate(series["step"]) if step > warmup]
    quarter = max(1, len(keep) // 4)
    first, last = keep[:quarter], keep[-quarter:]

    def values(name, indices):
        return [series[name][i] for i in indices]

    rss_drift = np.mean(values("rss_bytes", last)) / np.mean(values("rss_bytes", first)) - 1.0
    rss = values("rss_bytes", keep)
    time_ratio = np.median(values("step_seconds", last)) / np.median(values("step_seconds", first))
    first_norm = max(values("state_norm", first))
    norm_ratio = max(values("state_norm", last)) / first_norm if first_norm else 0.0
    return {
        "rss_drift": float(rss_drift), "rss_spread": float(max(rss) / min(rss) - 1.0),
        "rss_flat": bool(abs(rss_drift) <= 0.01),
        "step_time_last_over_first": float(time_ratio), "time_flat": bool(time_ratio <= 1.5),
        "state_norm_last_over_first": float(norm_ratio), "norms_bounded": bool(norm_ratio <= 2.0),
        "first_loss": series["loss"][0], "last_loss": series["loss"][-1],
    }


def report(rows: list, config: dict, seconds: float) -> bool:
    """Prints the table, writes the results file; whether every row passed."""
    print(f"{'algorithm':<40} {'rank':>4} {'RSS drift':>9} {'spread':>7} {'time last/first':>15} "
          f"{'norm last/first':>15} {'loss first->last':>17}")
    for row in rows:
        print(f"{row['algorithm']:<40} {row['rank']:>4} {row['rss_drift']:>9.2%} "
              f"{row['rss_spread']:>7.2%} {row['step_time_last_over_first']:>15.2f} "
              f"{row['state_norm_last_over_first']:>15.2f} "
              f"{row['first_loss']:>8.3f}->{row['last_loss']:.3f}"
              f"{'' if row['passed'] else '  FAILED'}")
    passed = all(row["passed"] for row in rows)
    RESULTS.write_text(json.dumps({"config": config, "seconds": seconds, "passed": passed,
                                   "rows": rows}, indent=1) + "\n")
    print(f"wrote {RESULTS}: {'PASSED' if passed else 'FAILED'}")
    return passed


def judged(name: str, rank: int, series: dict, warmup: int) -> dict:
    check = verdict(series, warmup)
    ok = bool(check["rss_flat"] and check["time_flat"] and check["norms_bounded"])
    return {"algorithm": name, "rank": rank, **check, "passed": ok, "series": series}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--every", type=int, default=500)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--reevaluate", action="store_true",
                        help="recompute the verdicts of benchmarks/results/soak.json")
    args = parser.parse_args(argv)
    if args.reevaluate:
        saved = json.loads(RESULTS.read_text())
        warmup = saved["config"]["warmup_steps"]
        rows = [judged(r["algorithm"], r["rank"], r["series"], warmup) for r in saved["rows"]]
        return 0 if report(rows, saved["config"], saved["seconds"]) else 1
    from horovod_squeeze.testing import run_on_ranks

    started = time.time()
    results = run_on_ranks(soak_rank, args.ranks, "gloo", args=(args.steps, args.every),
                           timeout=3 * 3600)
    warmup = args.steps // 10
    rows = [judged(name, rank, result[name], warmup)
            for name in ALGORITHMS for rank, result in enumerate(results)]
    config = {"steps": args.steps, "every": args.every, "ranks": args.ranks,
              "warmup_steps": warmup, "controller": "gloo"}
    return 0 if report(rows, config, round(time.time() - started, 1)) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from benchmarks.soak import main as run
    sys.exit(run())
