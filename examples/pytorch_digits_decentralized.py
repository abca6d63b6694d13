"""Decentralized training of the digits network: local steps, compressed gossip with neighbours.

Run on 4 local ranks in a ring with DeepSqueeze and 1-bit scaled-sign compression (MPI is required:
the neighbour exchange uses MPI's distributed graph communicators):

    horovodrun --mpi -np 4 python examples/pytorch_digits_decentralized.py --algorithm deepsqueeze \
        --compressor scaledsign --consensus-step 0.2

``--algorithm dpsgd`` sends the model uncompressed (the baseline), ``choco`` runs CHOCO-SGD;
``--topology`` picks ring, torus, exponential or fully_connected. Each rank trains its own model on
its own shard; rank 0 prints the held-out accuracy of the ranks' average model, the range of the
ranks' own accuracies, and the bytes each rank sent per step against D-PSGD's.
"""
import horovod.torch as hvd
import torch
import torch.nn.functional as F

import horovod_squeeze as hs
import horovod_squeeze.torch as hst
from horovod_squeeze.decentralized import message_nbytes
from horovod_squeeze.progress import progress as progress_of
from common import COMPRESSORS, short_repr
from pytorch_digits import DigitsNet, rank_split, warmup_cosine

GOSSIP = {"dpsgd": lambda args, compressor: hs.DPSGD(),
          "deepsqueeze": lambda args, compressor: hs.DeepSqueeze(compressor, args.consensus_step),
          "choco": lambda args, compressor: hs.ChocoSGD(compressor, args.consensus_step)}


def arguments():
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algorithm", choices=list(GOSSIP), default="deepsqueeze")
    parser.add_argument("--compressor", choices=["scaledsign", "topk", "ternary", "qsgd"],
                        default="scaledsign")
    parser.add_argument("--ratio", type=float, default=0.01, help="topk's kept fraction")
    parser.add_argument("--levels", type=int, default=4, help="qsgd levels")
    parser.add_argument("--block-size", type=int, default=None, help="scaledsign: entries per scale")
    parser.add_argument("--consensus-step", type=float, default=0.2)
    parser.add_argument("--topology", choices=list(hs.topology.TOPOLOGIES), default="ring")
    parser.add_argument("--lr", type=float, default=0.4, help="each rank's local learning rate")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", help="rank 0 writes the final metrics to this file")
    args = parser.parse_args()
    args.scale, args.bits = "l1", 8  # what COMPRESSORS reads besides the flags above
    return args


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).double().mean().item()


def main():
    args = arguments()
    hvd.init()
    x_train, y_train, x_test, y_test = rank_split(args.seed)

    model = DigitsNet()
    compressor = COMPRESSORS[args.compressor](args)
    algorithm = GOSSIP[args.algorithm](args, compressor)
    optimizer = hst.DecentralizedOptimizer(
        torch.optim.SGD(model.parameters(), lr=args.lr), model.named_parameters(),
        algorithm=algorithm, topology=args.topology)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    generator = torch.Generator().manual_seed(args.seed + hvd.rank())
    steps_per_epoch = len(x_train) // args.batch_size
    schedule = warmup_cosine(optimizer, steps_per_epoch, args.epochs)
    for _ in progress_of(range(args.epochs), desc="epochs", enabled=hvd.rank() == 0):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        for step in range(steps_per_epoch):
            batch = order[step * args.batch_size:(step + 1) * args.batch_size]
            optimizer.zero_grad()
            F.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
            optimizer.step()
            schedule.step()

    distance = optimizer.consensus_distance()
    own = hvd.allgather(torch.tensor([accuracy(model, x_test, y_test)])).tolist()
    for p in model.parameters():  # the ranks' average model
        p.data.copy_(hvd.allreduce(p.data, op=hvd.Average))
    averaged = accuracy(model, x_test, y_test)
    sizes = tuple(p.numel() for p in model.parameters())
    dpsgd_bytes = message_nbytes(hs.DPSGD(), sum(sizes), sizes) * len(optimizer.neighbors)
    if hvd.rank() == 0:
        name = algorithm if args.algorithm == "dpsgd" else (
            f"{type(algorithm).__name__}({short_repr(compressor)}, "
            f"consensus_step={args.consensus_step})")
        print(f"averaged model: {100 * averaged:.2f}%, ranks' own: {100 * min(own):.2f}% to "
              f"{100 * max(own):.2f}% ({hvd.size()} ranks, {optimizer.topology.name}, {name}); "
              f"bytes sent per step per rank: {optimizer.bytes_sent_per_step} "
              f"({dpsgd_bytes / optimizer.bytes_sent_per_step:.1f}x fewer than D-PSGD); "
              f"consensus distance {distance:.3g}")
        if args.json:
            import json

            with open(args.json, "w") as f:
                json.dump({"averaged_accuracy": averaged, "rank_accuracies": own,
                           "bytes_sent_per_step": optimizer.bytes_sent_per_step,
                           "dpsgd_bytes_per_step": dpsgd_bytes, "consensus_distance": distance,
                           "epochs": args.epochs, "steps_per_epoch": steps_per_epoch,
                           "seed": args.seed, "ranks": hvd.size(),
                           "topology": optimizer.topology.name, "algorithm": str(name)}, f)


if __name__ == "__main__":
    main()
