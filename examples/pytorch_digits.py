"""Data-parallel training of a small convolutional network on scikit-learn's digits with Horovod.

Run on 4 local ranks with DoubleSqueeze and 1-bit scaled-sign compression:

    horovodrun -np 4 --gloo python examples/pytorch_digits.py --algorithm doublesqueeze \
        --compressor scaledsign

``--optimizer adam`` or ``--momentum 0.9`` train with Adam or momentum SGD (each worker's
momentum is what is compressed; ``--no-worker-momentum`` applies it after the exchange instead).
``--algorithm dore`` (``--alpha``, ``--beta``, ``--eta``) and ``--algorithm doublequantization``
(``--bits``, ``--model-bits``) take the model step themselves, with plain SGD.
``--server-compressor`` names pass 2's compressor (e.g. ``--algorithm errorfeedback --compressor
topk --server-compressor scaledsign``); by default it is the algorithm's own. ``--algorithm none``
trains with Horovod's plain fp32 allreduce, the baseline. Each rank trains on
its own shard of the training set; parameters start equal through a broadcast from rank 0; rank 0
prints the held-out accuracy and the bytes each rank sent per step against an fp32 allreduce.
"""
import math

import horovod.torch as hvd
import torch
import torch.nn.functional as F

import horovod_squeeze.torch as hst
from horovod_squeeze.progress import progress as progress_of
from common import (
    algorithm, argument_parser, digits_split, engine_options, learning_rate, report,
)


def make_optimizer(args, model):
    lr = learning_rate(args) * hvd.size()
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    if args.algorithm == "none":
        return hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    return hst.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                    compression=algorithm(args), **engine_options(args))


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
    """Digits as (N, 1, 8, 8) tensors, with the fixed 80/20 split."""
    x_train, x_test, y_train, y_test = digits_split(seed)
    return (torch.from_numpy(x_train[:, None]), torch.from_numpy(y_train),
            torch.from_numpy(x_test[:, None]), torch.from_numpy(y_test))


def rank_split(seed):
    """This rank's shard of the training set and the whole test set; seeds torch, one thread."""
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = load_split(seed)
    shard = slice(hvd.rank(), None, hvd.size())
    return x_train[shard], y_train[shard], x_test, y_test


def warmup_cosine(optimizer, steps_per_epoch, epochs):
    """Linear warm-up over the first epoch, then cosine decay to zero, stepped every batch."""
    total_steps = epochs * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
        (step + 1) / steps_per_epoch, 0.5 * (1 + math.cos(math.pi * step / total_steps))))


def main():
    args = argument_parser(__doc__.split("\n")[0]).parse_args()
    hvd.init()
    x_train, y_train, x_test, y_test = rank_split(args.seed)

    model = DigitsNet()
    optimizer = make_optimizer(args, model)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    generator = torch.Generator().manual_seed(args.seed + hvd.rank())
    steps_per_epoch = len(x_train) // args.batch_size
    # The learning rate is scaled by the number of ranks, as Horovod recommends.
    schedule = warmup_cosine(optimizer, steps_per_epoch, args.epochs)
    progress = progress_of(range(args.epochs), desc="epochs", enabled=hvd.rank() == 0)
    test_losses = []  # every rank holds the same model: each computes the same held-out loss
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
        model.eval()
        with torch.no_grad():
            test_losses.append(F.cross_entropy(model(x_test), y_test).item())
        progress.set_postfix(loss=f"{loss.item():.4f}", test_loss=f"{test_losses[-1]:.4f}")

    model.eval()
    with torch.no_grad():
        correct = (model(x_test).argmax(1) == y_test).double().mean()
    accuracy = hvd.allreduce(correct, name="test_accuracy").item()
    stats = getattr(optimizer, "compression_stats", None)
    if hvd.rank() == 0:
        report(args, accuracy, stats, sum(p.numel() for p in model.parameters()), hvd.size(),
               algorithm(args), steps_per_epoch=steps_per_epoch, test_losses=test_losses)


if __name__ == "__main__":
    main()
