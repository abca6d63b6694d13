"""Soak: 10,000 steps of every algorithm; memory, step time and residual norms must stay flat.

    .venv/bin/python benchmarks/soak.py [--steps 10000] [--every 500] [--ranks 2]

Each algorithm trains a small MLP (about 42k parameters: two compressed weight matrices, the
small ones averaged uncompressed) on generated data for ``--steps`` steps on 2 ranks under ``horovodrun`` (Gloo), through
``horovod_squeeze.torch.DistributedOptimizer``. Every ``--every`` steps each rank records its
resident memory (``/proc/self/statm``), the mean step time of the window and the largest norm of
its algorithm state. Written to ``benchmarks/results/soak.json``; printed as a table.

What "flat" means here, checked after the first 10% of the steps (allocator warm-up):
- memory: the largest resident size within 1% of the smallest;
- step time: the last window's mean within 1.5x of the post-warm-up median (a shared machine
  jitters; a leak grows without bound);
- residual norms: the largest after warm-up within 4x of the median (error compensation keeps the
  residuals bounded; a divergence grows without bound).
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
    rss = [series["rss_bytes"][i] for i in keep]
    times = [series["step_seconds"][i] for i in keep]
    norms = [series["state_norm"][i] for i in keep]
    median_time, median_norm = float(np.median(times)), float(np.median(norms))
    return {
        "rss_spread": max(rss) / min(rss) - 1.0,
        "rss_flat": max(rss) <= 1.01 * min(rss),
        "last_over_median_step_time": times[-1] / median_time,
        "time_flat": times[-1] <= 1.5 * median_time,
        "max_over_median_state_norm": max(norms) / median_norm if median_norm else 0.0,
        "norms_bounded": max(norms) <= 4.0 * median_norm,
        "first_loss": series["loss"][0], "last_loss": series["loss"][-1],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--every", type=int, default=500)
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args(argv)
    from horovod_squeeze.testing import run_on_ranks

    started = time.time()
    results = run_on_ranks(soak_rank, args.ranks, "gloo", args=(args.steps, args.every),
                           timeout=3 * 3600)
    warmup = args.steps // 10
    rows, passed = [], True
    print(f"{'algorithm':<40} {'rank':>4} {'RSS spread':>10} {'time last/med':>13} "
          f"{'norm max/med':>12} {'loss first->last':>17}")
    for name in ALGORITHMS:
        for rank, result in enumerate(results):
            check = verdict(result[name], warmup)
            ok = check["rss_flat"] and check["time_flat"] and check["norms_bounded"]
            passed &= ok
            rows.append({"algorithm": name, "rank": rank, **check, "passed": ok,
                         "series": result[name]})
            print(f"{name:<40} {rank:>4} {check['rss_spread']:>9.2%} "
                  f"{check['last_over_median_step_time']:>13.2f} "
                  f"{check['max_over_median_state_norm']:>12.2f} "
                  f"{check['first_loss']:>8.3f}->{check['last_loss']:.3f}"
                  f"{'' if ok else '  FAILED'}")
    RESULTS.write_text(json.dumps({"config": {"steps": args.steps, "every": args.every,
                                              "ranks": args.ranks, "warmup_steps": warmup,
                                              "controller": "gloo"},
                                   "seconds": round(time.time() - started, 1),
                                   "passed": passed, "rows": rows}, indent=1) + "\n")
    print(f"wrote {RESULTS}: {'PASSED' if passed else 'FAILED'} in {time.time() - started:.0f} s")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from benchmarks.soak import main as run
    sys.exit(run())
