"""Data-parallel training of a small convolutional network on scikit-learn's digits with Horovod.

Run on 4 local ranks with DoubleSqueeze and 1-bit scaled-sign compression:

    horovodrun -np 4 --gloo python examples/pytorch_digits.py --algorithm doublesqueeze \
        --compressor scaledsign

``--algorithm none`` trains with Horovod's plain fp32 allreduce, the baseline. Each rank trains on
its own shard of the training set; parameters start equal through a broadcast from rank 0; rank 0
prints the held-out accuracy and the bytes each rank sent per step against an fp32 allreduce.
"""
import argparse
import json
import math

import horovod.torch as hvd
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import horovod_squeeze as hs
import horovod_squeeze.torch as hst

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


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
    return parser.parse_args()


def make_optimizer(args, model):
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr * hvd.size(), momentum=args.momentum)
    if args.algorithm == "none":
        return hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    algorithm = ALGORITHMS[args.algorithm](COMPRESSORS[args.compressor](args))
    return hst.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                    compression=algorithm, exchange=args.exchange,
                                    bucket_cap_mb=args.bucket_cap_mb,
                                    warmup_steps=args.warmup_steps)


class DigitsNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = torch.nn.Linear(32 * 4 * 4, 128)
        self.fc2 = torch.nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def load_split(seed):
    """Digits as (N, 1, 8, 8) float tensors scaled to [0, 1], with a fixed 80/20 split."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.2, random_state=seed, stratify=digits.target)
    return (torch.from_numpy(x_train), torch.from_numpy(y_train),
            torch.from_numpy(x_test), torch.from_numpy(y_test))


def main():
    args = parse_args()
    hvd.init()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)

    x_train, y_train, x_test, y_test = load_split(args.seed)
    shard = slice(hvd.rank(), None, hvd.size())
    x_train, y_train = x_train[shard], y_train[shard]

    model = DigitsNet()
    optimizer = make_optimizer(args, model)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    generator = torch.Generator().manual_seed(args.seed + hvd.rank())
    steps_per_epoch = len(x_train) // args.batch_size
    # Linear warm-up over the first epoch (the learning rate is scaled by the number of ranks, as
    # Horovod recommends), then cosine decay to zero.
    total_steps = args.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
        (step + 1) / steps_per_epoch, 0.5 * (1 + math.cos(math.pi * step / total_steps))))
    progress = tqdm(range(args.epochs), desc="epochs", disable=hvd.rank() != 0)
    for _ in progress:
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        for step in range(steps_per_epoch):
            batch = order[step * args.batch_size:(step + 1) * args.batch_size]
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
            loss.backward()
            optimizer.step()
            schedule.step()
        progress.set_postfix(loss=f"{loss.item():.4f}")

    model.eval()
    with torch.no_grad():
        correct = (model(x_test).argmax(1) == y_test).double().mean()
    accuracy = hvd.allreduce(correct, name="test_accuracy").item()
    stats = getattr(optimizer, "compression_stats", None)
    numel = sum(p.numel() for p in model.parameters())
    fp32_bytes = 2 * (hvd.size() - 1) * 4 * numel // hvd.size()
    sent = stats.bytes.sent if stats else fp32_bytes
    if hvd.rank() == 0:
        label = "fp32 allreduce" if args.algorithm == "none" else repr(
            ALGORITHMS[args.algorithm](COMPRESSORS[args.compressor](args)))
        print(f"test accuracy: {100 * accuracy:.2f}% ({hvd.size()} ranks, {args.epochs} epochs, "
              f"{label}, {args.exchange if stats else 'allreduce'}); bytes sent per step per rank: "
              f"{sent} ({fp32_bytes / sent:.1f}x fewer than an fp32 allreduce)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"accuracy": accuracy, "bytes_sent_per_step": sent,
                           "fp32_allreduce_bytes_per_step": fp32_bytes, "epochs": args.epochs,
                           "seed": args.seed, "ranks": hvd.size(), "compression": label}, f)


if __name__ == "__main__":
    main()
