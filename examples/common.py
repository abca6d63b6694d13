"""What the PyTorch and Keras examples share: the command line, the compressors, the data."""
import argparse
import dataclasses

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import horovod_squeeze as hs

ALGORITHMS = {"doublesqueeze": hs.DoubleSqueeze, "errorfeedback": hs.ErrorFeedback,
              "nofeedback": hs.NoFeedback, "serverfeedback": hs.ServerFeedback, "dore": hs.DORE}
#: Algorithms that take the model step (plain SGD only) and compress unbiased quantizers as they
#: are, not scaled to be contractive.
MODEL_UPDATES = ("dore", "doublequantization")
COMPRESSORS = {
    "scaledsign": lambda args: hs.ScaledSign(scale=args.scale, block_size=args.block_size),
    "topk": lambda args: hs.TopK(args.ratio, method="sampled"),
    "randk": lambda args: hs.RandK(args.ratio, seed=args.seed),
    "qsgd": lambda args: hs.ToContractive(hs.QSGD(args.levels, seed=args.seed)),
    "ternary": lambda args: hs.ToContractive(hs.Ternary(seed=args.seed)),
    "natural": lambda args: hs.ToContractive(hs.Natural(seed=args.seed)),
    "fp16": lambda args: hs.FP16(),
    "qbits": lambda args: hs.QSGD.bits(args.bits, seed=args.seed),  # unbiased, --bits b
}


def argument_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    parser.add_argument("--lr", type=float, default=None,
                        help="scaled by the number of ranks (default: 0.1 for sgd, 0.001 for adam)")
    parser.add_argument("--momentum", type=float, default=0.0, help="sgd's momentum")
    parser.add_argument("--no-worker-momentum", dest="worker_momentum", action="store_false",
                        help="apply the optimizer's momentum (adam: its moments) to the averaged "
                        "gradient instead of compressing each worker's momentum")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--algorithm", choices=["none", *ALGORITHMS, "doublequantization"],
                        default="doublesqueeze",
                        help="dore and doublequantization take the model step: plain sgd only")
    parser.add_argument("--compressor", choices=list(COMPRESSORS), default="scaledsign",
                        help="pass 1 (worker) compressor")
    parser.add_argument("--server-compressor", choices=list(COMPRESSORS), default=None,
                        help="pass 2 (server) compressor; default: the algorithm's own "
                        "(DoubleSqueeze, ServerFeedback: the same as --compressor; ErrorFeedback, "
                        "NoFeedback: none, the average returns exactly). Takes the same --ratio, "
                        "--levels, --scale and --block-size")
    parser.add_argument("--ratio", type=float, default=0.01, help="kept fraction for topk/randk")
    parser.add_argument("--levels", type=int, default=4, help="QSGD levels")
    parser.add_argument("--block-size", type=int, default=None, help="scaledsign: entries per scale")
    parser.add_argument("--scale", choices=["l1", "rms"], default="l1", help="scaledsign scale")
    parser.add_argument("--alpha", type=float, default=0.1, help="dore: the shifts' step")
    parser.add_argument("--beta", type=float, default=1.0, help="dore: the model step")
    parser.add_argument("--eta", type=float, default=0.1, help="dore: the model error's weight")
    parser.add_argument("--bits", type=int, default=8, help="doublequantization: b, gradients")
    parser.add_argument("--model-bits", type=int, default=8,
                        help="doublequantization: b_x, model changes")
    parser.add_argument("--min-compress-numel", type=int, default=1024,
                        help="smaller tensors are averaged uncompressed")
    parser.add_argument("--exchange", choices=["sharded", "allgather", "allreduce"],
                        default="sharded")
    parser.add_argument("--bucket-cap-mb", type=float, default=25.0)
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="uncompressed initial steps (default: 0 for sgd, 100 for adam)")
    parser.add_argument("--json", help="rank 0 writes the final metrics to this file")
    return parser


def learning_rate(args) -> float:
    """The per-rank learning rate the flags give (before scaling by the number of ranks)."""
    if args.lr is not None:
        return args.lr
    return 0.1 if args.optimizer == "sgd" else 0.001


def engine_options(args) -> dict:
    """The DistributedOptimizer options the flags give (warm-up only where named)."""
    options = {"exchange": args.exchange, "bucket_cap_mb": args.bucket_cap_mb,
               "min_compress_numel": args.min_compress_numel,
               "worker_momentum": args.worker_momentum}
    if args.warmup_steps is not None:
        options["warmup_steps"] = args.warmup_steps
    return options


def algorithm(args):
    """The algorithm the flags name, or None for the fp32 baseline."""
    if args.algorithm == "none":
        return None
    if args.algorithm == "doublequantization":
        return hs.DoubleQuantization(b=args.bits, b_x=args.model_bits, seed=args.seed)
    model_update = args.algorithm in MODEL_UPDATES

    def compressor(name):
        spec = COMPRESSORS[name](args)
        return spec.inner if model_update and isinstance(spec, hs.ToContractive) else spec

    steps = {"alpha": args.alpha, "beta": args.beta, "eta": args.eta} if model_update else {}
    if args.server_compressor is None:
        return ALGORITHMS[args.algorithm](compressor(args.compressor), **steps)
    return ALGORITHMS[args.algorithm](compressor(args.compressor),
                                      server=compressor(args.server_compressor), **steps)


def short_repr(spec) -> str:
    """A spec as it would be written: fields left at their defaults omitted, the first required
    field positional, e.g. ``TopK(0.01, method='sampled')`` or ``ScaledSign()``."""
    if not dataclasses.is_dataclass(spec):
        return repr(spec)
    parts = []
    for field in dataclasses.fields(spec):
        if not field.init:
            continue
        value = getattr(spec, field.name)
        required = (field.default is dataclasses.MISSING
                    and field.default_factory is dataclasses.MISSING)
        if not required and value == field.default:
            continue
        text = short_repr(value) if dataclasses.is_dataclass(value) else repr(value)
        parts.append(text if required and not parts else f"{field.name}={text}")
    return f"{type(spec).__name__}({', '.join(parts)})"


def label(compression) -> str:
    """How an algorithm is written (its repr, compressors without their default fields): the pass-2
    compressor only when it is not the algorithm's default, e.g. ``DoubleSqueeze(ScaledSign())``,
    ``ErrorFeedback(TopK(0.01, method='sampled'), server=ScaledSign())``."""
    if compression is None:
        return "fp32 allreduce"
    parts = [short_repr(compression.worker)]
    if compression.server != compression.default_server():
        parts.append(f"server={short_repr(compression.server)}")
    for field in dataclasses.fields(compression):  # an algorithm's own hyperparameters
        if field.init and field.name not in ("worker", "server"):
            parts.append(f"{field.name}={short_repr(getattr(compression, field.name))}")
    return f"{type(compression).__name__}({', '.join(parts)})"


def digits_split(seed):
    """scikit-learn's digits as (N, 8, 8) float32 images in [0, 1], with a fixed 80/20 split."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    return train_test_split(images, digits.target, test_size=0.2, random_state=seed,
                            stratify=digits.target)


def fp32_allreduce_bytes(numel, size):
    return 2 * (size - 1) * 4 * numel // size


def report(args, accuracy, stats, numel, size, compression, *, steps_per_epoch, test_losses):
    """Rank 0's closing line and, with --json, the metrics file (``compression``: the algorithm, or
    None for the fp32 baseline; ``test_losses``: the held-out loss after each epoch)."""
    import json

    fp32_bytes = fp32_allreduce_bytes(numel, size)
    sent = stats.bytes.sent if stats else fp32_bytes
    print(f"test accuracy: {100 * accuracy:.2f}% ({size} ranks, {args.epochs} epochs, "
          f"{label(compression)}, {args.exchange if stats else 'allreduce'}); bytes sent per step "
          f"per rank: {sent} ({fp32_bytes / sent:.1f}x fewer than an fp32 allreduce)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"accuracy": accuracy, "bytes_sent_per_step": sent,
                       "fp32_allreduce_bytes_per_step": fp32_bytes, "epochs": args.epochs,
                       "steps_per_epoch": steps_per_epoch,
                       "test_loss_per_epoch": [float(loss) for loss in test_losses],
                       "seed": args.seed, "ranks": size, "compression": label(compression),
                       "algorithm": None if compression is None else repr(compression)}, f)
