"""Benchmark gradient exchanges on a multi-host cluster built on this machine (needs root).

    python -m benchmarks.cluster.run            # the published run: docs/benchmarks.md and plots
    python -m benchmarks.cluster.run --quick    # 2 ranks, fewer contenders and steps: a few minutes
    python -m benchmarks.cluster.run --suite decentralized   # gossip beside DoubleSqueeze (MPI)

Builds N network-namespace hosts with shaped links, then for each link rate runs the contenders in
alternating jobs (Horovod-based contenders in one job, PyTorch DDP ones in another: Horovod's
background thread talks even while idle, which would count against DDP's bytes), repeats that,
runs the contenders that may abort their process group in jobs of their own, and finally trains
the example model with several contenders for the accuracy-vs-bits plot. Results go to
``benchmarks/results/cluster_*.json``; the full run also rewrites ``docs/benchmarks.md`` and its plots.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import shlex
import sys
import time

from tqdm import tqdm

from benchmarks.cluster import (contenders, decentralized_report, launch, namespaces, report,
                                shaping)
from horovod_squeeze.progress import progress

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "results"

CONVERGENCE = ["Horovod fp32", "Horovod fp16", "DDP PowerSGD r1", "DDP PowerSGD r4",
               "NoFeedback(ScaledSign, server=ScaledSign) sharded",
               "ErrorFeedback(ScaledSign, server=ScaledSign) sharded",
               "DoubleSqueeze(ScaledSign) sharded", "DoubleSqueeze(TopK(0.01)) sharded",
               "DoubleSqueeze(QSGD(4)) sharded"]
QUICK_CONVERGENCE = ["Horovod fp32", "DDP PowerSGD r4", "DoubleSqueeze(ScaledSign) sharded"]
#: Horovod's cycle time for the Horovod-based jobs (see ``--horovod-cycle-time-ms``).
DEFAULT_CYCLE_TIME_MS = 10.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="2 ranks, 7 contenders, 1 Gbit/s and 100 Mbit/s, few steps")
    parser.add_argument("--suite", choices=["exchanges", "decentralized"], default="exchanges",
                        help="decentralized: D-PSGD, DeepSqueeze and CHOCO-SGD on a ring beside "
                             "Horovod fp32 and DoubleSqueeze, under MPI, on 100 Mbit/s, 1 Gbit/s "
                             "and 1 Gbit/s with 20 ms latency; writes docs/decentralized_cluster.md")
    parser.add_argument("--ranks", type=int, default=4, help="hosts, one rank each (2..8)")
    parser.add_argument("--rates", default=None,
                        help="comma-separated link rates, each with its own latency if written "
                             "1gbit+20ms (default 100mbit,1gbit,10gbit)")
    parser.add_argument("--controller", choices=launch.CONTROLLERS, default=None,
                        help="Horovod's controller for the Horovod-based jobs (default gloo; "
                             "mpi for the decentralized suite)")
    parser.add_argument("--horovod-cycle-time-ms", type=float, default=DEFAULT_CYCLE_TIME_MS,
                        help="HOROVOD_CYCLE_TIME for every Horovod-based contender (fp32, fp16 and "
                             "this project's): the pause between Horovod's negotiation rounds, each "
                             "of which sends bytes even when idle (Horovod's own default: 1 ms)")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way latency of every link rate written without its own (+20ms)")
    parser.add_argument("--workload", default="resnet18",
                        choices=["resnet18", "mlp25m", "bert-base", "digits"])
    parser.add_argument("--contenders", default=None,
                        help="comma-separated names (default: every contender expected to work)")
    parser.add_argument("--repeats", type=int, default=2, help="alternations of the jobs per rate")
    parser.add_argument("--rounds", type=int, default=1, help="rounds over contenders per job")
    parser.add_argument("--steps", type=int, default=2, help="measured steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured first steps per job")
    parser.add_argument("--epochs", type=int, default=None,
                        help="convergence run (0: skip it; default 5, 0 for the decentralized suite)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--job-timeout", type=float, default=1200.0, help="seconds per job")
    parser.add_argument("--output", type=pathlib.Path, default=None)
    parser.add_argument("--docs", action=argparse.BooleanOptionalAction, default=None,
                        help="rewrite docs/benchmarks.md and plots (default: only without --quick)")
    args = parser.parse_args(argv)
    decentralized = args.suite == "decentralized"
    args.rates = args.rates or ("100mbit,1gbit,1gbit+20ms" if decentralized
                                else "100mbit,1gbit,10gbit")
    args.controller = args.controller or ("mpi" if decentralized else "gloo")
    args.epochs = (0 if decentralized else 5) if args.epochs is None else args.epochs
    if not args.horovod_cycle_time_ms > 0:
        parser.error("--horovod-cycle-time-ms must be positive")
    if args.quick:
        args.ranks, args.repeats, args.rounds, args.steps = 2, 1, 1, 2
        args.rates = "100mbit,1gbit+20ms" if decentralized else "1gbit,100mbit"
        args.epochs = min(args.epochs, 1)
    # The fragile contenders are probed in the default full run only.
    args.probes = not args.quick and not args.contenders and not decentralized
    args.contenders = (args.contenders.split(",") if args.contenders
                       else contenders.DECENTRALIZED if decentralized
                       else contenders.QUICK if args.quick else contenders.FULL)
    for name in args.contenders:
        if name not in contenders.CATALOG:
            parser.error(f"unknown contender {name!r}; choose from {list(contenders.CATALOG)}")
    gossip = contenders.needs_mpi(args.contenders)
    if gossip and args.controller != "mpi":
        parser.error(f"{', '.join(gossip)} exchange over MPI neighbour collectives: "
                     f"use --controller mpi")
    try:
        args.shapes = [shaping.parse_shape(rate, args.delay_ms) for rate in args.rates.split(",")]
    except ValueError as error:
        parser.error(str(error))
    if args.output is None:
        suffix = "" if args.controller == "gloo" else f"_{args.controller}"
        stem = "cluster_decentralized" if decentralized else "cluster"
        args.output = RESULTS / (f"{stem}_quick{suffix}.json" if args.quick
                                 else f"{stem}_{args.workload}_{args.ranks}ranks{suffix}.json")
    if args.docs is None:
        args.docs = not args.quick
    return args


def _groups(names: list[str]) -> list[list[str]]:
    """Horovod-based and DDP contenders in separate jobs, each with the compute-only baseline."""
    horovod = [n for n in names if contenders.uses_horovod([n])]
    torch_only = [n for n in names if n != "compute only" and not contenders.uses_horovod([n])]
    return [["compute only"] + group for group in (horovod, torch_only) if group]


def _clusters(args: argparse.Namespace):
    """Each link shape with a cluster shaped to it: a new cluster whenever the latency changes
    (the latency is a cluster's own; see :mod:`benchmarks.cluster.namespaces`)."""
    made = None
    try:
        for shape in args.shapes:
            if made is None or made.latency_ms != shape.delay_ms:
                if made is not None:
                    namespaces.remove_cluster(made)
                made = None  # host names repeat: the old set goes before the new is made
                made = namespaces.create_cluster(args.ranks, latency_ms=shape.delay_ms)
            shaping.shape_cluster(made, shape)
            yield shape, made
    finally:
        if made is not None:
            namespaces.remove_cluster(made)


class Runner:
    """Runs jobs on the current cluster (``made``), with a progress bar, recording failures
    instead of stopping."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.made: namespaces.Cluster | None = None
        self.failures: list[dict] = []

    def job(self, job: dict, label: str) -> list[dict] | None:
        """Runs ``job``; a failing contender is recorded and the job re-run without it."""
        names = list(job["contenders"])
        while names:
            # A live bar on a terminal only; in a log, each job's result lines say enough.
            with tqdm(total=1, desc=label, unit="step", leave=False,
                      disable=not sys.stderr.isatty()) as bar:
                def progress(state: dict) -> None:
                    if state["done"] != bar.n:  # redraw on news only: logs stay readable
                        bar.total = state["total"]
                        bar.n = state["done"]
                        bar.set_postfix_str(state["label"][:32])

                try:
                    return launch.run_job(self.made, {**job, "contenders": names},
                                          self.args.job_timeout, progress, self.args.controller,
                                          self.args.horovod_cycle_time_ms)
                except launch.JobFailed as failure:
                    self.failures.append({"job": label, "contender": failure.contender,
                                          "error": str(failure)[-6000:]})
                    print(f"{label}: {failure.contender or 'the job'} failed; recorded",
                          file=sys.stderr, flush=True)
                    if failure.contender not in names or failure.contender == "compute only":
                        return None
                    names.remove(failure.contender)
        return None

    def speed(self, shape: shaping.LinkShape, probes: bool) -> dict:
        args = self.args
        base = {"mode": "speed", "workload": args.workload, "rounds": args.rounds,
                "steps_per_round": args.steps, "warmup_steps": args.warmup, "seed": args.seed,
                "lr": 0.01, "momentum": 0.0, "batch_size": 32, "collective_timeout_s": 120}
        jobs = []
        for repeat in range(args.repeats):
            for group in _groups(args.contenders):
                label = f"{shape.label} #{repeat + 1} {'Horovod' if contenders.uses_horovod(group) else 'DDP'}"
                ranks = self.job({**base, "contenders": group}, label)
                if ranks is not None:
                    jobs.append({"repeat": repeat, "contenders": group, "ranks": ranks})
        for probe in contenders.PROBES if probes else []:
            label = f"{shape.label} probe {probe}"
            ranks = self.job({**base, "contenders": ["compute only", probe]}, label)
            if ranks is not None:
                jobs.append({"repeat": 0, "contenders": ["compute only", probe], "ranks": ranks})
        return {"rate_mbit": shape.rate_mbit, "delay_ms": shape.delay_ms, "label": shape.label,
                "jobs": jobs}

    def convergence(self) -> dict | None:
        args = self.args
        names = QUICK_CONVERGENCE if args.quick else CONVERGENCE
        job = {"mode": "convergence", "workload": "digits", "contenders": names, "seed": args.seed,
               "epochs": args.epochs, "lr": 0.05 * args.ranks, "momentum": 0.9, "batch_size": 32,
               "warmup_steps": 2, "collective_timeout_s": 120}
        results = {}
        for name in names:  # one job per contender: a failure costs only that contender
            ranks = self.job({**job, "contenders": [name]}, f"convergence {name}")
            if ranks is not None:
                results.update(ranks[0]["convergence"])
        return {"workload": "digits", "epochs": args.epochs, "ranks": args.ranks,
                "results": results}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    namespaces.require_root()
    namespaces.terminate_on_signals()
    started = time.time()
    command = "python -m benchmarks.cluster.run " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    runner = Runner(args)
    rates, convergence = [], None
    for index, (shape, made) in enumerate(progress(_clusters(args), total=len(args.shapes),
                                                   desc="link rates")):
        runner.made = made
        # Probes may hang until the collective timeout: once, on the first link, is enough.
        rates.append(runner.speed(shape, probes=index == 0 and args.probes))
        if index == len(args.shapes) - 1 and args.epochs > 0:
            # Bytes and accuracy do not depend on the link: the last one serves.
            convergence = runner.convergence()
    results = {
        "command": command.strip(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "config": {"suite": args.suite, "ranks": args.ranks, "workload": args.workload,
                   "controller": args.controller,
                   "mpi_yield_when_idle": args.controller == "mpi",
                   "horovod_cycle_time_ms": args.horovod_cycle_time_ms, "repeats": args.repeats,
                   "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
                   "seed": args.seed, "delay_ms": args.delay_ms, "contenders": args.contenders},
        "rates": rates,
        "failures": runner.failures,
        "convergence": convergence,
        "wall_s": time.time() - started,
    }
    results["summary"] = report.summarize(results)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1))
    print(report.text_table(results))
    print(f"results: {args.output} ({results['wall_s'] / 60:.1f} min)")
    if args.docs:
        write = (decentralized_report.write_decentralized_docs if args.suite == "decentralized"
                 else report.write_docs)
        written = write(results, args.output)
        print("docs:", ", ".join(str(path) for path in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
