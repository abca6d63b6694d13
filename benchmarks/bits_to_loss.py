"""Bits to a loss: how many bits each contender of a convergence run sent to reach a held-out loss.

    .venv/bin/python benchmarks/bits_to_loss.py benchmarks/results/convergence_pytorch_model_updates.json

Reads a results file of ``benchmarks/convergence.py`` (its runs record the held-out loss after
every epoch and the bytes each rank sends per step, both passes together) and, per contender, with
the loss averaged over seeds:

- the first epoch whose loss is at most fp32's final loss, and the bits sent until then, against
  everything fp32 training sent (every rank sends alike, so the ratio is the same summed over ranks);
- for each pair of contenders named with ``--pair A B``, the bits each sent to reach the loss both
  reach (the larger of their final losses).

Writes ``<results>_bits.json`` beside the results file and plots the loss against the bits sent
(``--plot``, a PNG).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics


def curves(results: dict) -> dict[str, dict]:
    """Per contender: the seeds' mean loss after each epoch and the bits per epoch one rank sends."""
    out = {}
    for run in results["runs"]:
        if run.get("accuracy") is None:
            continue
        entry = out.setdefault(run["contender"], {"losses": [], "bits_per_epoch": None,
                                                  "fp32_bits_per_epoch": None, "accuracy": []})
        entry["losses"].append(run["test_loss_per_epoch"])
        entry["accuracy"].append(run["accuracy"])
        entry["bits_per_epoch"] = 8 * run["bytes_sent_per_step"] * run["steps_per_epoch"]
        entry["fp32_bits_per_epoch"] = 8 * run["fp32_allreduce_bytes_per_step"] * run["steps_per_epoch"]
    for entry in out.values():
        entry["mean_loss"] = [statistics.mean(epoch) for epoch in zip(*entry.pop("losses"))]
        entry["mean_accuracy"] = statistics.mean(entry.pop("accuracy"))
    return out


def epochs_to(loss: list[float], target: float) -> int | None:
    """The number of epochs after which the loss is first at most ``target`` (None: never)."""
    return next((epoch + 1 for epoch, value in enumerate(loss) if value <= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=pathlib.Path)
    parser.add_argument("--baseline", default="fp32 allreduce")
    parser.add_argument("--pair", nargs=2, action="append", default=[], metavar=("A", "B"))
    parser.add_argument("--plot", type=pathlib.Path)
    args = parser.parse_args()
    data = curves(json.loads(args.results.read_text()))
    fp32 = data[args.baseline]
    target = fp32["mean_loss"][-1]
    fp32_total = fp32["bits_per_epoch"] * len(fp32["mean_loss"])
    rows = []
    print(f"fp32's final held-out loss (mean of seeds): {target:.4f}")
    for name, entry in data.items():
        epochs = epochs_to(entry["mean_loss"], target)
        bits = None if epochs is None else entry["bits_per_epoch"] * epochs
        row = {"contender": name, "final_loss": entry["mean_loss"][-1],
               "mean_accuracy": entry["mean_accuracy"],
               "points_vs_fp32": 100 * (entry["mean_accuracy"] - fp32["mean_accuracy"]),
               "epochs_to_fp32_final_loss": epochs, "bits_to_fp32_final_loss": bits,
               "fewer_bits_than_fp32_training": None if bits is None else 1 - bits / fp32_total,
               "bits_per_epoch": entry["bits_per_epoch"], "mean_loss": entry["mean_loss"]}
        rows.append(row)
        reached = ("never" if bits is None else
                   f"epoch {epochs}, {bits / 1e6:.1f} Mbit, "
                   f"{100 * row['fewer_bits_than_fp32_training']:.1f}% fewer bits than fp32")
        print(f"{name:<42} accuracy {100 * entry['mean_accuracy']:.2f}% "
              f"({row['points_vs_fp32']:+.2f}), final loss {row['final_loss']:.4f}; reaches "
              f"fp32's: {reached}")
    pairs = []
    for a, b in args.pair:
        level = max(data[a]["mean_loss"][-1], data[b]["mean_loss"][-1])
        pair = {"contenders": [a, b], "loss": level}
        for name in (a, b):
            epochs = epochs_to(data[name]["mean_loss"], level)
            pair[name] = {"epochs": epochs, "bits": data[name]["bits_per_epoch"] * epochs}
        pairs.append(pair)
        print(f"to loss {level:.4f}: {a} {pair[a]['bits'] / 1e6:.1f} Mbit "
              f"(epoch {pair[a]['epochs']}), {b} {pair[b]['bits'] / 1e6:.1f} Mbit "
              f"(epoch {pair[b]['epochs']})")
    out = args.results.with_name(args.results.stem + "_bits.json")
    out.write_text(json.dumps({"source": args.results.name, "baseline": args.baseline,
                               "fp32_final_loss": target, "fp32_total_bits": fp32_total,
                               "bits": "sent by one rank, both passes (every rank alike)",
                               "rows": rows, "pairs": pairs}, indent=1) + "\n")
    print(f"wrote {out}")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4))
        for row in rows:
            bits = [row["bits_per_epoch"] * (epoch + 1) for epoch in range(len(row["mean_loss"]))]
            ax.loglog(bits, row["mean_loss"], label=row["contender"])
        ax.axhline(target, color="grey", linestyle=":", label="fp32's final loss")
        ax.set_xlabel("bits sent per rank (both passes)")
        ax.set_ylabel("held-out loss (mean of seeds)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
