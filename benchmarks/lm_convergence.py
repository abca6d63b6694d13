"""Validation loss against bytes: the byte-level transformer language model on 4 ranks with AdamW.

    .venv/bin/python benchmarks/lm_convergence.py                       # 3 seeds, default steps
    .venv/bin/python benchmarks/lm_convergence.py --seeds 1 --steps 200 --contenders fp32,ds-sign

Each contender trains ``examples/pytorch_transformer_lm.py`` (the Python standard library's source
as bytes, a small decoder-only transformer, AdamW with warm-up and cosine decay) under
``horovodrun -np 4 --gloo`` once per seed, every contender with the same steps and seeds. Printed
and written to ``benchmarks/results/lm_convergence.json`` (or ``--results``): per contender and
seed the final validation loss in nats per byte and the bytes each rank sent in the last step (after
the compressed exchange's warm-up, when ``--steps`` exceeds it); per contender the mean loss over
seeds, its difference from fp32 in percent, and the bytes against an fp32 allreduce.
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
EXAMPLE = ROOT / "examples" / "pytorch_transformer_lm.py"

CONTENDERS = {  # short name: (label, example flags)
    "fp32": ("fp32 allreduce", ["--algorithm", "none"]),
    "ds-sign": ("DoubleSqueeze(ScaledSign)",
                ["--algorithm", "doublesqueeze", "--compressor", "scaledsign"]),
    "ds-sign-averaged-moments": ("DoubleSqueeze(ScaledSign), AdamW on the averaged gradient",
                                 ["--algorithm", "doublesqueeze", "--compressor", "scaledsign",
                                  "--no-worker-momentum"]),
    "ef-sign": ("ErrorFeedback(ScaledSign)",
                ["--algorithm", "errorfeedback", "--compressor", "scaledsign"]),
    "nf-sign": ("NoFeedback(ScaledSign)",
                ["--algorithm", "nofeedback", "--compressor", "scaledsign"]),
    "sf-sign": ("ServerFeedback(ScaledSign)",
                ["--algorithm", "serverfeedback", "--compressor", "scaledsign"]),
    "ds-topk": ("DoubleSqueeze(TopK(0.01))",
                ["--algorithm", "doublesqueeze", "--compressor", "topk", "--ratio", "0.01"]),
    "ef-topk": ("ErrorFeedback(TopK(0.01))",
                ["--algorithm", "errorfeedback", "--compressor", "topk", "--ratio", "0.01"]),
}
#: What runs unless --contenders names others.
DEFAULT = ["fp32", "ds-sign", "ef-sign"]


def run(contender_args, seed, steps, num_proc):
    """One training run; the example's metrics, plus the run's wall time with start-up."""
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "metrics.json"
        command = [str(ROOT / ".venv" / "bin" / "horovodrun"), "-np", str(num_proc),
                   "-H", f"localhost:{num_proc}", "--gloo", sys.executable, str(EXAMPLE),
                   "--seed", str(seed), "--json", str(out), *contender_args]
        if steps is not None:
            command += ["--steps", str(steps)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        finished = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
        if finished.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({finished.returncode}):\n"
                               f"{finished.stdout[-3000:]}\n{finished.stderr[-3000:]}")
        metrics = json.loads(out.read_text())
        metrics.pop("algorithm", None)  # the label says it; the full repr only adds noise
        return metrics


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per run (default: the example's)")
    parser.add_argument("--num-proc", type=int, default=4)
    parser.add_argument("--contenders", default=",".join(DEFAULT),
                        help=f"comma-separated, from {', '.join(CONTENDERS)} (fp32 is required; "
                        f"default: {','.join(DEFAULT)})")
    parser.add_argument("--results", type=pathlib.Path,
                        default=ROOT / "benchmarks" / "results" / "lm_convergence.json")
    args = parser.parse_args()
    chosen = choose_contenders(parser, args.contenders, CONTENDERS)

    runs = []
    jobs = [(short, seed) for seed in range(1, args.seeds + 1) for short in chosen]
    for short, seed in progress(jobs, desc="training runs"):
        label, flags = CONTENDERS[short]
        runs.append({"contender": label, **run(flags, seed, args.steps, args.num_proc)})

    summary = {}
    for name in (CONTENDERS[short][0] for short in chosen):
        mine = [r for r in runs if r["contender"] == name]
        summary[name] = {"mean_val_loss": statistics.mean(r["val_loss"] for r in mine),
                         "val_losses": [r["val_loss"] for r in mine],
                         "mean_train_loss": statistics.mean(r["train_loss"] for r in mine),
                         "bytes_sent_per_step": mine[0]["bytes_sent_per_step"],
                         "fp32_allreduce_bytes_per_step": mine[0]["fp32_allreduce_bytes_per_step"],
                         "mean_seconds": statistics.mean(r["seconds"] for r in mine)}
    baseline = summary["fp32 allreduce"]["mean_val_loss"]
    first = runs[0]
    print(f"validation loss in nats/byte; unigram {first['unigram_val_loss']:.3f}, bigram "
          f"{first['bigram_val_loss']:.3f} (Python {first['corpus']['python_version']} stdlib)")
    width = max(len(name) for name in summary)
    print(f"{'contender':<{width}} {'val loss (mean)':>15} {'vs fp32':>9} {'bytes/step':>11} "
          f"{'fewer bytes':>12} {'seconds':>8}")
    for name, s in summary.items():
        s["percent_vs_fp32"] = 100 * (s["mean_val_loss"] - baseline) / baseline
        s["fewer_bytes_than_fp32"] = s["fp32_allreduce_bytes_per_step"] / s["bytes_sent_per_step"]
        print(f"{name:<{width}} {s['mean_val_loss']:>15.4f} {s['percent_vs_fp32']:>+8.2f}% "
              f"{s['bytes_sent_per_step']:>11} {s['fewer_bytes_than_fp32']:>11.1f}x "
              f"{s['mean_seconds']:>8.0f}")
        if name != "fp32 allreduce" and s["fewer_bytes_than_fp32"] <= 1.0:
            print(f"  note: {name} still sent fp32 at its last step: --steps does not exceed "
                  "the compressed exchange's warm-up")

    steps = first["steps"]
    model, training = first["model"], first["training"]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({
        "benchmark": "lm_convergence",
        "command": f"python benchmarks/lm_convergence.py --contenders {args.contenders} "
                   f"--seeds {args.seeds} --steps {steps} --num-proc {args.num_proc}",
        "task": f"examples/pytorch_transformer_lm.py: byte-level language model on the Python "
                f"{first['corpus']['python_version']} standard library's source "
                f"({first['corpus']['train_bytes']} training bytes), {args.num_proc} ranks, "
                f"{model['layers']}-layer transformer, d_model {model['d_model']}, "
                f"{model['heads']} heads, context {model['context']} "
                f"({first['parameters']} parameters), AdamW lr {training['lr']} with "
                f"{training['lr_warmup_steps']}-step warm-up and cosine decay, weight decay "
                f"{training['weight_decay']}, batch {training['batch_size_per_rank']} windows per "
                f"rank, {steps} steps; validation loss over {training['eval_windows']} fixed "
                "windows; compressed contenders use the optimizer wrapper's default warm-up",
        "baselines": {"unigram_val_loss": first["unigram_val_loss"],
                      "bigram_val_loss": first["bigram_val_loss"]},
        "summary": summary, "runs": runs}, indent=1))
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
