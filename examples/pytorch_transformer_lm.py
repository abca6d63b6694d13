"""Data-parallel training of a small byte-level transformer language model with AdamW and Horovod.

Run on 4 local ranks with DoubleSqueeze and 1-bit scaled-sign compression:

    horovodrun -np 4 -H localhost:4 --gloo .venv/bin/python examples/pytorch_transformer_lm.py \
        --algorithm doublesqueeze --compressor scaledsign

``--algorithm none`` trains with Horovod's plain fp32 allreduce, the baseline; the compression flags
are the digits examples' (``--compressor``, ``--server-compressor``, ``--ratio``, ``--exchange``,
...). The text is the Python standard library's own source (``examples/stdlib_corpus.py``: no
download; it depends on the Python version, which the metrics record). The model is a decoder-only
transformer (pre-norm blocks, causal mask, learned positions, output tied to the byte embedding).
Every rank draws its own random windows (seeded per rank); parameters start equal through a
broadcast from rank 0. The learning rate warms up linearly, then decays along a cosine. Rank 0
prints the validation loss in nats per byte (mean cross-entropy over a fixed set of validation
windows, averaged over ranks) beside what a unigram and a bigram byte model reach, and the bytes
each rank sent per step against an fp32 allreduce; ``--json`` writes them.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import sys
import time

import horovod.torch as hvd
import numpy as np
import torch
import torch.nn.functional as F

import horovod_squeeze.torch as hst
from horovod_squeeze.progress import progress as progress_of
from common import ALGORITHMS, COMPRESSORS, algorithm, fp32_allreduce_bytes, label
from stdlib_corpus import (DEFAULT_MAX_BYTES, VOCAB_SIZE, bigram_cross_entropy, build_corpus,
                           unigram_cross_entropy)


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    training = parser.add_argument_group("training")
    training.add_argument("--steps", type=int, default=700)
    training.add_argument("--batch-size", type=int, default=16, help="windows per rank per step")
    training.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate "
                          "(not scaled by the number of ranks)")
    training.add_argument("--lr-warmup-steps", type=int, default=50,
                          help="linear learning-rate warm-up; then cosine decay to "
                          "--min-lr-ratio x --lr")
    training.add_argument("--min-lr-ratio", type=float, default=0.1)
    training.add_argument("--weight-decay", type=float, default=0.1,
                          help="AdamW's, on weight matrices only")
    training.add_argument("--clip-norm", type=float, default=0.0,
                          help="clip the norm of what the exchange returns (0: off; with a "
                          "compressed exchange and Adam's worker momentum that is the averaged "
                          "first moment after warm-up, not the gradient)")
    training.add_argument("--seed", type=int, default=42)
    training.add_argument("--eval-every", type=int, default=100,
                          help="also evaluate every this many steps (0: only at the end)")
    training.add_argument("--eval-windows", type=int, default=256,
                          help="fixed validation windows, spread evenly over the validation text")
    training.add_argument("--log-every", type=int, default=50,
                          help="train loss reported as the mean over this many last steps")
    training.add_argument("--json", help="rank 0 writes the final metrics to this file")

    model = parser.add_argument_group("model and data")
    model.add_argument("--layers", type=int, default=2)
    model.add_argument("--d-model", type=int, default=128)
    model.add_argument("--heads", type=int, default=4)
    model.add_argument("--context", type=int, default=128, help="bytes per window")
    model.add_argument("--corpus-mb", type=float, default=DEFAULT_MAX_BYTES / 1e6,
                       help="cap on the standard-library text read, in MB")

    squeeze = parser.add_argument_group("compression (as in examples/pytorch_digits.py)")
    squeeze.add_argument("--algorithm", choices=["none", *ALGORITHMS], default="doublesqueeze",
                         help="none: Horovod's fp32 allreduce")
    squeeze.add_argument("--compressor", choices=list(COMPRESSORS), default="scaledsign",
                         help="pass 1 (worker) compressor")
    squeeze.add_argument("--server-compressor", choices=list(COMPRESSORS), default=None,
                         help="pass 2 (server) compressor; default: the algorithm's own")
    squeeze.add_argument("--ratio", type=float, default=0.01, help="kept fraction for topk/randk")
    squeeze.add_argument("--levels", type=int, default=4, help="QSGD levels")
    squeeze.add_argument("--block-size", type=int, default=None,
                         help="scaledsign: entries per scale")
    squeeze.add_argument("--scale", choices=["l1", "rms"], default="l1", help="scaledsign scale")
    squeeze.add_argument("--exchange", choices=["sharded", "allgather", "allreduce"],
                         default="sharded")
    squeeze.add_argument("--bucket-cap-mb", type=float, default=25.0)
    squeeze.add_argument("--warmup-steps", type=int, default=None,
                         help="uncompressed initial steps (default: the optimizer wrapper's)")
    squeeze.add_argument("--no-worker-momentum", dest="worker_momentum", action="store_false",
                         help="apply AdamW's moments to the averaged gradient instead of "
                         "compressing each worker's first moment")
    return parser


class ByteTransformer(torch.nn.Module):
    """Decoder-only transformer over bytes: pre-norm blocks with a causal mask; the output layer
    shares the byte embedding's weights."""

    def __init__(self, layers, d_model, heads, context):
        super().__init__()
        self.embedding = torch.nn.Embedding(VOCAB_SIZE, d_model)
        self.position = torch.nn.Embedding(context, d_model)
        self.blocks = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=4 * d_model,
                                             dropout=0.0, activation="gelu", batch_first=True,
                                             norm_first=True)
            for _ in range(layers))
        self.norm = torch.nn.LayerNorm(d_model)
        self.register_buffer("causal_mask",
                             torch.nn.Transformer.generate_square_subsequent_mask(context),
                             persistent=False)
        torch.nn.init.normal_(self.embedding.weight, std=0.02)
        torch.nn.init.normal_(self.position.weight, std=0.02)

    def forward(self, tokens):
        length = tokens.shape[1]
        hidden = self.embedding(tokens) + self.position.weight[:length]
        mask = self.causal_mask[:length, :length]
        for block in self.blocks:
            hidden = block(hidden, src_mask=mask, is_causal=True)
        return self.norm(hidden) @ self.embedding.weight.T


def make_optimizer(args, model):
    # Decay weight matrices only: biases, norms' gains and the embeddings' offsets stay free.
    decayed = [p for name, p in model.named_parameters() if p.dim() >= 2 and "position" not in name]
    free = [p for name, p in model.named_parameters() if p.dim() < 2 or "position" in name]
    optimizer = torch.optim.AdamW([{"params": decayed, "weight_decay": args.weight_decay},
                                   {"params": free, "weight_decay": 0.0}], lr=args.lr)
    if args.algorithm == "none":
        return hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    # Left out, an option takes the wrapper's default for this optimizer.
    kwargs = {}
    if args.warmup_steps is not None:
        kwargs["warmup_steps"] = args.warmup_steps
    if not args.worker_momentum:
        kwargs["worker_momentum"] = False
    return hst.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                    compression=algorithm(args), exchange=args.exchange,
                                    bucket_cap_mb=args.bucket_cap_mb, **kwargs)


def warmup_cosine(args):
    """Learning-rate factor per step: linear warm-up, then cosine decay to ``min_lr_ratio``."""
    def factor(step):
        if step < args.lr_warmup_steps:
            return (step + 1) / args.lr_warmup_steps
        progress = (step - args.lr_warmup_steps) / max(1, args.steps - args.lr_warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * cosine
    return factor


def windows(text: np.ndarray, starts, context):
    """(inputs, targets): ``context`` bytes from each start and the same shifted by one."""
    rows = torch.from_numpy(text[np.asarray(starts)[:, None] + np.arange(context + 1)])
    rows = rows.long()
    return rows[:, :-1], rows[:, 1:]


def validation_starts(validation: np.ndarray, count, context):
    """The fixed validation windows: ``count`` starts spread evenly over the validation text."""
    return np.linspace(0, validation.size - context - 1, count).astype(np.int64)


@torch.no_grad()
def validation_loss(model, validation, starts, context, batch_size=64):
    """Mean cross-entropy in nats per byte over every position of the fixed windows, the windows
    divided among the ranks and the sums allreduced, so every rank returns the same figure."""
    model.eval()
    mine = starts[hvd.rank()::hvd.size()]
    total = torch.zeros(2, dtype=torch.float64)  # summed loss, predicted bytes
    for first in range(0, len(mine), batch_size):
        inputs, targets = windows(validation, mine[first:first + batch_size], context)
        logits = model(inputs)
        total[0] += F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), targets.reshape(-1),
                                    reduction="sum").double()
        total[1] += targets.numel()
    model.train()
    total = hvd.allreduce(total, op=hvd.Sum, name="validation_loss")
    return (total[0] / total[1]).item()


def main(argv=None):
    args = argument_parser().parse_args(argv)
    hvd.init()
    started = time.perf_counter()
    torch.set_num_threads(1)  # the ranks share the machine's cores
    torch.manual_seed(args.seed)

    corpus = build_corpus(int(args.corpus_mb * 1e6))
    model = ByteTransformer(args.layers, args.d_model, args.heads, args.context)
    optimizer = make_optimizer(args, model)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args))
    numel = sum(p.numel() for p in model.parameters())

    sampler = np.random.default_rng([args.seed, hvd.rank()])  # each rank its own windows
    eval_starts = validation_starts(corpus.validation, args.eval_windows, args.context)
    recent_losses, history = collections.deque(maxlen=args.log_every), []
    progress = progress_of(range(1, args.steps + 1), desc="steps", enabled=hvd.rank() == 0,
                           stream=sys.stdout, min_interval=30)
    for step in progress:
        starts = sampler.integers(0, corpus.train.size - args.context - 1, args.batch_size)
        inputs, targets = windows(corpus.train, starts, args.context)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(inputs).reshape(-1, VOCAB_SIZE), targets.reshape(-1))
        loss.backward()
        if args.clip_norm > 0:
            # Clip what the exchange returned, identical on every rank (see --clip-norm):
            # exchange first, then step without exchanging again.
            optimizer.synchronize()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_norm)
            with optimizer.skip_synchronize():
                optimizer.step()
        else:
            optimizer.step()
        schedule.step()
        recent_losses.append(loss.item())
        if step % args.log_every == 0:
            progress.set_postfix(loss=f"{np.mean(recent_losses):.3f}", refresh=False)
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            history.append((step, validation_loss(model, corpus.validation, eval_starts,
                                                  args.context)))
            if hvd.rank() == 0:
                progress.write(f"step {step}: validation loss {history[-1][1]:.4f} nats/byte")

    val_loss = validation_loss(model, corpus.validation, eval_starts, args.context)
    history.append((args.steps, val_loss))
    train_loss = hvd.allreduce(torch.tensor(float(np.mean(recent_losses)), dtype=torch.float64),
                               name="train_loss").item()
    seconds = time.perf_counter() - started
    stats = getattr(optimizer, "compression_stats", None)
    if hvd.rank() != 0:
        return None
    compression = algorithm(args)
    fp32_bytes = fp32_allreduce_bytes(numel, hvd.size())
    sent = stats.bytes.sent if stats else fp32_bytes
    metrics = {
        "val_loss": val_loss, "train_loss": train_loss,
        "unigram_val_loss": unigram_cross_entropy(corpus.train, corpus.validation),
        "bigram_val_loss": bigram_cross_entropy(corpus.train, corpus.validation),
        "val_history": history, "steps": args.steps, "seed": args.seed, "ranks": hvd.size(),
        "compression": label(compression),
        "algorithm": None if compression is None else repr(compression),
        "exchange": args.exchange if stats else "allreduce",
        "warmup_steps": args.warmup_steps, "worker_momentum": args.worker_momentum,
        "bytes_sent_per_step": sent, "fp32_allreduce_bytes_per_step": fp32_bytes,
        "parameters": numel,
        "seconds": seconds,  # rank 0, from hvd.init() to the final evaluation
        "model": {"layers": args.layers, "d_model": args.d_model, "heads": args.heads,
                  "context": args.context},
        "training": {"batch_size_per_rank": args.batch_size, "lr": args.lr,
                     "lr_warmup_steps": args.lr_warmup_steps, "min_lr_ratio": args.min_lr_ratio,
                     "weight_decay": args.weight_decay, "clip_norm": args.clip_norm,
                     "eval_windows": args.eval_windows},
        "corpus": corpus.describe(),
    }
    print(f"validation loss: {val_loss:.4f} nats/byte after {args.steps} steps (unigram "
          f"{metrics['unigram_val_loss']:.3f}, bigram {metrics['bigram_val_loss']:.3f}); train "
          f"loss {train_loss:.4f}; {hvd.size()} ranks, {label(compression)}, {metrics['exchange']}; "
          f"bytes sent per step per rank: {sent} ({fp32_bytes / sent:.1f}x fewer than an fp32 "
          f"allreduce); {seconds:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(metrics, f, indent=1)
    return metrics


if __name__ == "__main__":
    main()
