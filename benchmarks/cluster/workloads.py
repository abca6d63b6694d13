"""What one step computes: gradient sets shaped like real models, and a real training step.

Gradient-set workloads hold parameters in a real model's layer shapes (ResNet-18, a 25M-parameter
MLP, BERT-base's encoder stack) with a deliberately tiny computation, so the exchange dominates the
step: ``loss = a * sum(p * d) + b * sum(p * p) / 2`` with fixed random directions ``d`` and per-step,
per-rank scalars ``(a, b)``, hence ``grad = a * d + b * p``: dense, different on every rank and step,
and two element-wise operations per entry to compute. ``digits`` is a real step: the example
model's forward and backward on scikit-learn's digits (:mod:`examples.pytorch_digits`).

Every workload's model is an ``nn.Module`` whose ``forward(*batch)`` returns the scalar loss, so
Horovod's optimizers and DDP wrap it the same way.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import pathlib
import sys
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["Workload", "WORKLOADS", "get", "resnet18_shapes", "mlp_shapes", "bert_base_shapes"]

Shapes = list[tuple[str, tuple[int, ...]]]

_EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "pytorch_digits.py"


def resnet18_shapes(num_classes: int = 1000) -> Shapes:
    """ResNet-18's trainable parameters in torchvision's names and shapes (11,689,512 for 1000 classes)."""
    shapes: Shapes = [("conv1.weight", (64, 3, 7, 7)), ("bn1.weight", (64,)), ("bn1.bias", (64,))]
    in_channels = 64
    for stage, channels in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            prefix = f"layer{stage}.{block}"
            stride_or_widen = block == 0 and stage > 1
            shapes += [(f"{prefix}.conv1.weight", (channels, in_channels, 3, 3)),
                       (f"{prefix}.bn1.weight", (channels,)), (f"{prefix}.bn1.bias", (channels,)),
                       (f"{prefix}.conv2.weight", (channels, channels, 3, 3)),
                       (f"{prefix}.bn2.weight", (channels,)), (f"{prefix}.bn2.bias", (channels,))]
            if stride_or_widen:
                shapes += [(f"{prefix}.downsample.0.weight", (channels, in_channels, 1, 1)),
                           (f"{prefix}.downsample.1.weight", (channels,)),
                           (f"{prefix}.downsample.1.bias", (channels,))]
            in_channels = channels
    return shapes + [("fc.weight", (num_classes, 512)), ("fc.bias", (num_classes,))]


def mlp_shapes(widths: tuple[int, ...] = (1024, 4096, 4096, 1024, 1000)) -> Shapes:
    """A fully connected network: 26.2M parameters with the default widths."""
    shapes: Shapes = []
    for layer, (fan_in, fan_out) in enumerate(zip(widths, widths[1:])):
        shapes += [(f"fc{layer}.weight", (fan_out, fan_in)), (f"fc{layer}.bias", (fan_out,))]
    return shapes


def bert_base_shapes(layers: int = 12, hidden: int = 768, ffn: int = 3072) -> Shapes:
    """BERT-base's encoder layers without embeddings: 12 x 7,087,872 = 85.1M parameters."""
    shapes: Shapes = []
    for layer in range(layers):
        prefix = f"encoder.layer.{layer}"
        for proj in ("query", "key", "value"):
            shapes += [(f"{prefix}.attention.self.{proj}.weight", (hidden, hidden)),
                       (f"{prefix}.attention.self.{proj}.bias", (hidden,))]
        shapes += [(f"{prefix}.attention.output.dense.weight", (hidden, hidden)),
                   (f"{prefix}.attention.output.dense.bias", (hidden,)),
                   (f"{prefix}.attention.output.LayerNorm.weight", (hidden,)),
                   (f"{prefix}.attention.output.LayerNorm.bias", (hidden,)),
                   (f"{prefix}.intermediate.dense.weight", (ffn, hidden)),
                   (f"{prefix}.intermediate.dense.bias", (ffn,)),
                   (f"{prefix}.output.dense.weight", (hidden, ffn)),
                   (f"{prefix}.output.dense.bias", (hidden,)),
                   (f"{prefix}.output.LayerNorm.weight", (hidden,)),
                   (f"{prefix}.output.LayerNorm.bias", (hidden,))]
    return shapes


class GradientSet(torch.nn.Module):
    """Parameters in given shapes; ``forward(coefficients)`` is the cheap loss described above."""

    def __init__(self, shapes: Shapes, directions: list[torch.Tensor], seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.params = torch.nn.ParameterDict()
        for name, shape in shapes:
            # ParameterDict keys may not contain dots; the real names stay readable with '/'.
            self.params[name.replace(".", "/")] = torch.nn.Parameter(
                torch.randn(shape, generator=generator) / math.sqrt(max(1, shape[-1])))
        # Plain attributes, not buffers: DDP would otherwise broadcast them every step.
        self._directions = directions

    def forward(self, coefficients: torch.Tensor) -> torch.Tensor:
        a, b = coefficients[0], coefficients[1]
        loss = coefficients.new_zeros(())
        for param, direction in zip(self.params.values(), self._directions):
            loss = loss + a * (param * direction).sum() + b * 0.5 * (param * param).sum()
        return loss


@dataclasses.dataclass
class Workload:
    """A model factory and the batches of each rank and step (deterministic in the seed)."""

    name: str
    description: str
    build_model: Callable[[], torch.nn.Module]
    batch: Callable[[int, int], tuple[torch.Tensor, ...]]  # (step, rank) -> model inputs
    numel: int
    test_set: tuple[torch.Tensor, torch.Tensor] | None = None  # (inputs, labels) for accuracy
    steps_per_epoch: int | None = None


def _gradient_set(name: str, description: str, shapes: Shapes, seed: int) -> Workload:
    generator = torch.Generator().manual_seed(seed + 1)
    # Shared by every contender's model in a rank, so N contenders do not hold N copies.
    directions = [torch.randn(shape, generator=generator) for _, shape in shapes]

    def batch(step: int, rank: int) -> tuple[torch.Tensor, ...]:
        draw = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + rank)
        return (torch.rand(2, generator=draw) * torch.tensor([1.0, 0.1]) + torch.tensor([0.5, 0.0]),)

    return Workload(name, description, lambda: GradientSet(shapes, directions, seed), batch,
                    sum(math.prod(shape) for _, shape in shapes))


def _load_example():
    # The example imports its sibling ``common``, as it does when run as a script from its folder.
    folder = str(_EXAMPLE.parent)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location("pytorch_digits_example", _EXAMPLE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if added:
            sys.path.remove(folder)
    return module


class DigitsLoss(torch.nn.Module):
    """The example's network; ``forward(images, labels)`` returns the cross-entropy."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.net(images), labels)


def digits(seed: int, batch_size: int = 32, num_ranks: int = 1) -> Workload:
    """The example model's real training step: each rank draws batches from its shard."""
    example = _load_example()
    x_train, y_train, x_test, y_test = example.load_split(seed)

    def build() -> torch.nn.Module:
        torch.manual_seed(seed)
        return DigitsLoss(example.DigitsNet())

    def batch(step: int, rank: int) -> tuple[torch.Tensor, ...]:
        shard = torch.arange(rank, len(x_train), num_ranks)
        steps_per_epoch = len(shard) // batch_size
        epoch, index = divmod(step, steps_per_epoch)
        order = shard[torch.randperm(len(shard),
                                     generator=torch.Generator().manual_seed(seed + epoch))]
        chosen = order[index * batch_size:(index + 1) * batch_size]
        return x_train[chosen], y_train[chosen]

    return Workload("digits", "the example's CNN on scikit-learn digits (real forward/backward)",
                    build, batch, sum(p.numel() for p in build().parameters()),
                    test_set=(x_test, y_test),
                    steps_per_epoch=(len(x_train) // num_ranks) // batch_size)


WORKLOADS = {
    "resnet18": lambda seed, **_: _gradient_set(
        "resnet18", "ResNet-18's 11.7M parameters in its real layer shapes", resnet18_shapes(), seed),
    "mlp25m": lambda seed, **_: _gradient_set(
        "mlp25m", "an MLP 1024-4096-4096-1024-1000 (26.2M parameters)", mlp_shapes(), seed),
    "bert-base": lambda seed, **_: _gradient_set(
        "bert-base", "BERT-base's 12 encoder layers (85.1M parameters)", bert_base_shapes(), seed),
    "digits": digits,
}


def get(name: str, seed: int, **options) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from {sorted(WORKLOADS)}")
    return WORKLOADS[name](seed, **options)
