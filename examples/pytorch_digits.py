"""Data-parallel training of a small convolutional network on scikit-learn's digits with Horovod.

Run on 4 local ranks:

    horovodrun -np 4 --gloo python examples/pytorch_digits.py --epochs 20

Each rank trains on its own shard of the training set; gradients are averaged across ranks by
Horovod's DistributedOptimizer, parameters start equal through a broadcast from rank 0, and the
final accuracy on the held-out split is averaged over ranks and printed by rank 0.
"""
import argparse

import horovod.torch as hvd
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--lr", type=float, default=0.05, help="scaled by the number of ranks")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args()


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
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr * hvd.size(), momentum=args.momentum)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    generator = torch.Generator().manual_seed(args.seed + hvd.rank())
    steps_per_epoch = len(x_train) // args.batch_size
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
        progress.set_postfix(loss=f"{loss.item():.4f}")

    model.eval()
    with torch.no_grad():
        correct = (model(x_test).argmax(1) == y_test).double().mean()
    accuracy = hvd.allreduce(correct, name="test_accuracy").item()
    if hvd.rank() == 0:
        print(f"test accuracy: {100 * accuracy:.2f}% ({hvd.size()} ranks, {args.epochs} epochs)")


if __name__ == "__main__":
    main()
