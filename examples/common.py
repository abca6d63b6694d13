"""What the PyTorch and Keras examples share: the command line, the compressors, the data."""
import argparse

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import horovod_squeeze as hs

ALGORITHMS = {"doublesqueeze": hs.DoubleSqueeze, "errorfeedback": hs.ErrorFeedback,
              "nofeedback": hs.NoFeedback}
COMPRESSORS = {
    "scaledsign": lambda args: hs.ScaledSign(scale=args.scale, block_size=args.block_size),
    "topk": lambda args: hs.TopK(args.ratio, method="sampled"),
    "randk": lambda args: hs.RandK(args.ratio, seed=args.seed),
    "qsgd": lambda args: hs.ToContractive(hs.QSGD(args.levels, seed=args.seed)),
    "ternary": lambda args: hs.ToContractive(hs.Ternary(seed=args.seed)),
    "natural": lambda args: hs.ToContractive(hs.Natural(seed=args.seed)),
    "fp16": lambda args: hs.FP16(),
}


def argument_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--lr", type=float, default=0.1, help="scaled by the number of ranks")
    # Momentum applied after an error-compensated exchange amplifies the residuals' delay; plain
    # SGD is the setting the DoubleSqueeze analysis covers (see docs/algorithms.md).
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--algorithm", choices=["none", *ALGORITHMS], default="doublesqueeze")
    parser.add_argument("--compressor", choices=list(COMPRESSORS), default="scaledsign")
    parser.add_argument("--ratio", type=float, default=0.01, help="kept fraction for topk/randk")
    parser.add_argument("--levels", type=int, default=4, help="QSGD levels")
    parser.add_argument("--block-size", type=int, default=None, help="scaledsign: entries per scale")
    parser.add_argument("--scale", choices=["l1", "rms"], default="l1", help="scaledsign scale")
    parser.add_argument("--exchange", choices=["sharded", "allgather", "allreduce"],
                        default="sharded")
    parser.add_argument("--bucket-cap-mb", type=float, default=25.0)
    parser.add_argument("--warmup-steps", type=int, default=0, help="uncompressed initial steps")
    parser.add_argument("--json", help="rank 0 writes the final metrics to this file")
    return parser


def algorithm(args):
    """The algorithm the flags name, or None for the fp32 baseline."""
    if args.algorithm == "none":
        return None
    return ALGORITHMS[args.algorithm](COMPRESSORS[args.compressor](args))


def digits_split(seed):
    """scikit-learn's digits as (N, 8, 8) float32 images in [0, 1], with a fixed 80/20 split."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    return train_test_split(images, digits.target, test_size=0.2, random_state=seed,
                            stratify=digits.target)


def fp32_allreduce_bytes(numel, size):
    return 2 * (size - 1) * 4 * numel // size


def report(args, accuracy, stats, numel, size, label):
    """Rank 0's closing line and, with --json, the metrics file."""
    import json

    fp32_bytes = fp32_allreduce_bytes(numel, size)
    sent = stats.bytes.sent if stats else fp32_bytes
    print(f"test accuracy: {100 * accuracy:.2f}% ({size} ranks, {args.epochs} epochs, "
          f"{label}, {args.exchange if stats else 'allreduce'}); bytes sent per step per rank: "
          f"{sent} ({fp32_bytes / sent:.1f}x fewer than an fp32 allreduce)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"accuracy": accuracy, "bytes_sent_per_step": sent,
                       "fp32_allreduce_bytes_per_step": fp32_bytes, "epochs": args.epochs,
                       "seed": args.seed, "ranks": size, "compression": label}, f)
