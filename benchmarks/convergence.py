"""Accuracy against bytes: the digits example on 4 ranks, every contender with the same epochs and seeds.

    .venv/bin/python benchmarks/convergence.py                 # PyTorch: 3 seeds, 60 epochs
    .venv/bin/python benchmarks/convergence.py --framework keras --contenders fp32,ds-sign
    .venv/bin/python benchmarks/convergence.py --seeds 1 --epochs 10   # a quick look
    .venv/bin/python benchmarks/convergence.py --optimizer momentum    # or adam
    .venv/bin/python benchmarks/convergence.py --epochs 30 --contenders fp32,dore-ternary-sign \
        --epochs-of dore-ternary-sign=34    # a contender given more steps (fewer bits per step)

Each contender trains ``examples/pytorch_digits.py`` (or ``examples/keras_digits.py``: the same
network, split and schedule under ``model.fit``) under ``horovodrun -np 4 --gloo`` once per seed.
Printed and written to ``benchmarks/results/convergence_<framework>[_<optimizer>].json`` (or
``--results``): per
contender and seed the held-out accuracy and the bytes each rank sent per step, and the mean
accuracy over seeds.

``nf-sign`` and ``ef-sign`` compress the second pass too (``server=ScaledSign``, without feedback:
what the recorded runs measured); ``nf-sign-exact`` and ``ef-sign-exact`` are ``NoFeedback(C)`` and
``ErrorFeedback(C)`` as they now default, the average returned exactly in fp32 (run only when
named).
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

from training_runs import choose_contenders

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = {"pytorch": "pytorch_digits.py", "keras": "keras_digits.py"}

CONTENDERS = {  # short name: (label, example flags)
    "fp32": ("fp32 allreduce", ["--algorithm", "none"]),
    "nf-sign": ("NoFeedback(ScaledSign, server=ScaledSign)",
                ["--algorithm", "nofeedback", "--compressor", "scaledsign",
                 "--server-compressor", "scaledsign"]),
    "ef-sign": ("ErrorFeedback(ScaledSign, server=ScaledSign)",
                ["--algorithm", "errorfeedback", "--compressor", "scaledsign",
                 "--server-compressor", "scaledsign"]),
    "nf-sign-exact": ("NoFeedback(ScaledSign), exact average",
                      ["--algorithm", "nofeedback", "--compressor", "scaledsign"]),
    "ef-sign-exact": ("ErrorFeedback(ScaledSign), exact average",
                      ["--algorithm", "errorfeedback", "--compressor", "scaledsign"]),
    "ds-sign": ("DoubleSqueeze(ScaledSign)",
                ["--algorithm", "doublesqueeze", "--compressor", "scaledsign"]),
    "ds-topk": ("DoubleSqueeze(TopK(0.01))",
                ["--algorithm", "doublesqueeze", "--compressor", "topk", "--ratio", "0.01"]),
    "ds-sign-after": ("DoubleSqueeze(ScaledSign), momentum applied after the exchange",
                      ["--algorithm", "doublesqueeze", "--compressor", "scaledsign",
                       "--no-worker-momentum"]),
    # Algorithms that take the model step (plain SGD); every tensor compressed.
    "dore-ternary": ("DORE(Ternary())", ["--algorithm", "dore", "--compressor", "ternary",
                                         "--min-compress-numel", "0"]),
    "dore-ternary-sign": ("DORE(Ternary(), server=ScaledSign(), eta=1)",
                          ["--algorithm", "dore", "--compressor", "ternary",
                           "--server-compressor", "scaledsign", "--eta", "1",
                           "--min-compress-numel", "0"]),
    "dq-4-8": ("DoubleQuantization(b=4, b_x=8)",
               ["--algorithm", "doublequantization", "--bits", "4", "--model-bits", "8",
                "--min-compress-numel", "0"]),
    # Gradient-only quantization, its cheapest exchange on few ranks (no fp32 second pass).
    "nf-q4": ("NoFeedback(QSGD.bits(4)), allgather",
              ["--algorithm", "nofeedback", "--compressor", "qbits", "--bits", "4",
               "--exchange", "allgather", "--min-compress-numel", "0"]),
}
#: What runs unless --contenders names others: the recorded runs' contenders.
DEFAULT = ["fp32", "nf-sign", "ef-sign", "ds-sign", "ds-topk"]

OPTIMIZERS = {  # --optimizer: (description, example flags); every contender, fp32 included, gets them
    "sgd": ("SGD, lr 0.1 x ranks", []),
    # lr 0.1 x ranks with momentum 0.9 diverges in fp32 too; 0.01 x ranks is its usual partner.
    "momentum": ("SGD momentum 0.9, lr 0.01 x ranks", ["--momentum", "0.9", "--lr", "0.01"]),
    "adam": ("Adam, lr 0.001 x ranks, 100 exact warm-up steps", ["--optimizer", "adam"]),
}


def run(example, contender_args, seed, epochs, num_proc):
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "metrics.json"
        command = [str(ROOT / ".venv" / "bin" / "horovodrun"), "-np", str(num_proc),
                   "-H", f"localhost:{num_proc}", "--gloo", sys.executable,
                   str(ROOT / "examples" / example), "--seed", str(seed),
                   "--epochs", str(epochs), "--json", str(out), *contender_args]
        env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
               "OMP_NUM_THREADS": "1"}
        for attempt in (1, 2):  # one retry: a run of 4 ranks on 2 cores can lose its launcher
            done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
            if done.returncode == 0:
                return {**json.loads(out.read_text()), "attempts": attempt}
            print(f"run failed (attempt {attempt}): {' '.join(command)}\n{done.stderr[-2000:]}",
                  file=sys.stderr)
        # Recorded, not fatal: a contender that diverges (NaN gradients are refused) is a result.
        errors = [line for line in done.stderr.splitlines() if "Error" in line]
        return {"accuracy": None, "failed": errors[0] if errors else done.stderr[-300:],
                "seed": seed, "attempts": 2}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=1,
                        help="seeds run from this one (a fresh set checks a result chosen on others)")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--num-proc", type=int, default=4)
    parser.add_argument("--framework", choices=list(EXAMPLES), default="pytorch")
    parser.add_argument("--optimizer", choices=list(OPTIMIZERS), default="sgd",
                        help="the optimizer every contender wraps (momentum and Adam: worker-side, "
                        "the examples' default)")
    parser.add_argument("--contenders", default=",".join(DEFAULT),
                        help=f"comma-separated, from {', '.join(CONTENDERS)} (fp32 is required; "
                        f"default: {','.join(DEFAULT)})")
    parser.add_argument("--results", type=pathlib.Path, default=None,
                        help="where to write the JSON (default: "
                        "benchmarks/results/convergence_<framework>.json)")
    parser.add_argument("--epochs-of", action="append", default=[], metavar="NAME=EPOCHS",
                        help="train contender NAME for EPOCHS epochs instead (its own schedule "
                        "over them): bits_to_loss.py then counts the bits of every epoch it took")
    args = parser.parse_args()
    chosen = choose_contenders(parser, args.contenders, CONTENDERS)
    epochs_of = {}
    for item in args.epochs_of:
        name, _, epochs = item.partition("=")
        if name not in chosen or not epochs.isdigit() or int(epochs) < 1:
            parser.error(f"--epochs-of {item!r}: expected NAME=EPOCHS, NAME among --contenders")
        epochs_of[name] = int(epochs)
    labels = {short: CONTENDERS[short][0] + (f", {epochs_of[short]} epochs" if short in epochs_of
                                            else "") for short in chosen}

    runs = []
    jobs = [(short, seed) for seed in range(args.first_seed, args.first_seed + args.seeds) for short in chosen]
    for short, seed in progress(jobs, desc="training runs"):
        metrics = run(EXAMPLES[args.framework], CONTENDERS[short][1] + OPTIMIZERS[args.optimizer][1],
                      seed, epochs_of.get(short, args.epochs), args.num_proc)
        runs.append({"contender": labels[short], **metrics})

    summary = {}
    for name in (labels[short] for short in chosen):
        mine = [r for r in runs if r["contender"] == name]
        done = [r for r in mine if r["accuracy"] is not None]
        summary[name] = {"mean_accuracy": statistics.mean(r["accuracy"] for r in done)
                         if done else None,
                         "accuracies": [r["accuracy"] for r in mine],
                         "failed_seeds": [r["seed"] for r in mine if r["accuracy"] is None]}
        if done:
            summary[name].update({
                "bytes_sent_per_step": done[0]["bytes_sent_per_step"],
                "fp32_allreduce_bytes_per_step": done[0]["fp32_allreduce_bytes_per_step"]})
    baseline = summary["fp32 allreduce"]["mean_accuracy"]
    print(f"{'contender':<42} {'accuracy (mean)':>16} {'vs fp32 (points)':>17} {'bytes/step':>11} "
          f"{'fewer bytes':>12}")
    for name, s in summary.items():
        if s["mean_accuracy"] is None or baseline is None:  # recorded in the JSON all the same
            print(f"{name:<42} every seed failed" if s["mean_accuracy"] is None
                  else f"{name:<42} {100 * s['mean_accuracy']:>15.2f}% (fp32 failed)")
            continue
        s["points_vs_fp32"] = 100 * (s["mean_accuracy"] - baseline)
        print(f"{name:<42} {100 * s['mean_accuracy']:>15.2f}% {s['points_vs_fp32']:>+17.2f} "
              f"{s['bytes_sent_per_step']:>11} "
              f"{s['fp32_allreduce_bytes_per_step'] / s['bytes_sent_per_step']:>11.1f}x")

    suffix = "" if args.optimizer == "sgd" else f"_{args.optimizer}"
    results = args.results or (ROOT / "benchmarks" / "results"
                               / f"convergence_{args.framework}{suffix}.json")
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({
        "benchmark": f"convergence_{args.framework}{suffix}",
        "command": f"python benchmarks/convergence.py --framework {args.framework} "
                   f"--optimizer {args.optimizer} --contenders {args.contenders} "
                   f"--seeds {args.seeds} --first-seed {args.first_seed} --epochs {args.epochs} --num-proc {args.num_proc}"
                   + "".join(f" --epochs-of {item}" for item in args.epochs_of),
        "task": f"examples/{EXAMPLES[args.framework]}: scikit-learn digits, {args.num_proc} ranks, "
                f"{OPTIMIZERS[args.optimizer][0]}, 1-epoch warm-up + cosine decay, "
                "batch 32 per rank",
        "summary": summary, "runs": runs}, indent=1))
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
