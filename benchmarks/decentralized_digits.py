"""Decentralized training on the digits example: DeepSqueeze, CHOCO-SGD and D-PSGD on a ring.

    .venv/bin/python benchmarks/decentralized_digits.py                      # 4 and 8 ranks, 3 seeds
    .venv/bin/python benchmarks/decentralized_digits.py --ranks 4 --seeds 1 --epochs 5

Each contender trains ``examples/pytorch_digits_decentralized.py`` under ``horovodrun --mpi`` once
per seed and world size (8 ranks on this machine's 2 cores are oversubscribed: slow, but the
arithmetic is the same). Recorded per run: the accuracy of the ranks' average model and of each
rank's own, the bytes each rank sends per step against D-PSGD's, and the final consensus distance;
per contender and world size the means over seeds. Written to
``benchmarks/results/decentralized_digits.json`` and plotted in ``docs/decentralized_digits.png``
(``--plot-only`` redraws the plot from the JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

from horovod_squeeze.progress import progress

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONTENDERS = {  # short name: (label, example flags)
    "dpsgd": ("DPSGD()", ["--algorithm", "dpsgd"]),
    "deepsqueeze-sign": ("DeepSqueeze(ScaledSign(), consensus_step=0.2)",
                         ["--algorithm", "deepsqueeze", "--compressor", "scaledsign",
                          "--consensus-step", "0.2"]),
    "choco-sign": ("ChocoSGD(ScaledSign(), consensus_step=0.2)",
                   ["--algorithm", "choco", "--compressor", "scaledsign",
                    "--consensus-step", "0.2"]),
}


def run(flags, ranks, seed, epochs, topology):
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "metrics.json"
        command = [str(ROOT / ".venv" / "bin" / "horovodrun"), "--mpi", "-np", str(ranks),
                   "-H", f"localhost:{ranks}", sys.executable,
                   str(ROOT / "examples" / "pytorch_digits_decentralized.py"), "--seed", str(seed),
                   "--epochs", str(epochs), "--topology", topology, "--json", str(out), *flags]
        if ranks > os.cpu_count():
            command[1:1] = ["--mpi-args=--oversubscribe"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            print(f"run failed: {' '.join(command)}\n{done.stderr[-2000:]}", file=sys.stderr)
            return {"averaged_accuracy": None, "seed": seed, "ranks": ranks}
        return json.loads(out.read_text())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", default="4,8")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--topology", default="ring")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--results", type=pathlib.Path,
                        default=ROOT / "benchmarks" / "results" / "decentralized_digits.json")
    parser.add_argument("--plot-only", action="store_true",
                        help="redraw docs/decentralized_digits.png from --results, run nothing")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads(args.results.read_text()))
        return
    chosen = args.contenders.split(",")
    world_sizes = [int(r) for r in args.ranks.split(",")]
    jobs = [(ranks, seed, short) for ranks in world_sizes for seed in range(1, args.seeds + 1)
            for short in chosen]
    runs = []
    for ranks, seed, short in progress(jobs, desc="training runs"):
        label, flags = CONTENDERS[short]
        runs.append({"contender": label, **run(flags, ranks, seed, args.epochs, args.topology)})
    summary = {}
    print(f"{'contender':<48} {'ranks':>5} {'averaged':>9} {'own (min-max)':>16} "
          f"{'bytes/step':>10} {'vs D-PSGD':>9}")
    for ranks in world_sizes:
        for short in chosen:
            label = CONTENDERS[short][0]
            done = [r for r in runs if r["contender"] == label and r["ranks"] == ranks
                    and r["averaged_accuracy"] is not None]
            if not done:
                continue
            entry = {"mean_averaged_accuracy": statistics.mean(r["averaged_accuracy"] for r in done),
                     "mean_rank_accuracy": statistics.mean(statistics.mean(r["rank_accuracies"])
                                                           for r in done),
                     "min_rank_accuracy": min(min(r["rank_accuracies"]) for r in done),
                     "max_rank_accuracy": max(max(r["rank_accuracies"]) for r in done),
                     "bytes_sent_per_step": done[0]["bytes_sent_per_step"],
                     "dpsgd_bytes_per_step": done[0]["dpsgd_bytes_per_step"],
                     "mean_consensus_distance": statistics.mean(r["consensus_distance"]
                                                                for r in done),
                     "seeds": len(done)}
            summary[f"{label} / {ranks} ranks"] = entry
            print(f"{label:<48} {ranks:>5} {100 * entry['mean_averaged_accuracy']:>8.2f}% "
                  f"{100 * entry['min_rank_accuracy']:>7.2f}-{100 * entry['max_rank_accuracy']:.2f}% "
                  f"{entry['bytes_sent_per_step']:>10} "
                  f"{entry['dpsgd_bytes_per_step'] / entry['bytes_sent_per_step']:>8.1f}x")
    args.results.write_text(json.dumps({
        "benchmark": "decentralized_digits",
        "command": f"python benchmarks/decentralized_digits.py --ranks {args.ranks} --seeds "
                   f"{args.seeds} --epochs {args.epochs} --topology {args.topology} "
                   f"--contenders {args.contenders}",
        "task": "examples/pytorch_digits_decentralized.py: scikit-learn digits, local SGD at lr "
                "0.4 per rank, 1-epoch warm-up + cosine decay, batch 32 per rank, each rank its "
                "own shard",
        "summary": summary, "runs": runs}, indent=1) + "\n")
    print(f"wrote {args.results}")
    plot(json.loads(args.results.read_text()))


def plot(results: dict, path: pathlib.Path = ROOT / "docs" / "decentralized_digits.png") -> None:
    """Accuracy against bytes per step: the averaged model (marker) and the ranks' own
    (a bar from the lowest to the highest), one panel per world size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    by_size: dict[int, list] = {}
    for key, entry in results["summary"].items():
        label, ranks = key.rsplit(" / ", 1)
        by_size.setdefault(int(ranks.split()[0]), []).append((label, entry))
    fig, axes = plt.subplots(1, len(by_size), figsize=(6 * len(by_size), 4.5), squeeze=False)
    for axis, (ranks, entries) in zip(axes[0], sorted(by_size.items())):
        for index, (label, entry) in enumerate(entries):
            x = entry["bytes_sent_per_step"] * (1 + 0.08 * index)  # equal bytes side by side
            low, high = 100 * entry["min_rank_accuracy"], 100 * entry["max_rank_accuracy"]
            averaged = 100 * entry["mean_averaged_accuracy"]
            axis.errorbar([x], [averaged],
                          yerr=[[max(averaged - low, 0)], [max(high - averaged, 0)]],
                          fmt="os^"[index % 3], capsize=4, label=label)
        axis.set(xscale="log", xlabel="bytes each rank sends per step",
                 ylabel="test accuracy (%): averaged model; bars: ranks' own",
                 title=f"digits, {ranks} ranks on a ring, {entries[0][1]['seeds']} seeds")
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7, loc="lower center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
