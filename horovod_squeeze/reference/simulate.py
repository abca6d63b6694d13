"""NumPy simulation of n workers running an algorithm over one exchange: the test oracle.

Each algorithm's update is written from its paper in its own module beside this one
(``horovod_squeeze.reference.<module>``, named like the algorithm's module), over one segment of n
workers. This module adds the exchanges' documented data layout, written independently of the
exchange code it checks:

- segments: the bucket is its tensors laid end to end (``sizes``); every compression is told the
  real segments of its vector, so each tensor gets its own scales: the tensors' sizes, cut where a
  shard boundary falls inside one, the padding in none.
- ``sharded``: the bucket is zero-padded to ``n * shard`` entries (:func:`shard_numel`); shard j is a
  vector of its own: worker i compresses its part of shard j with nonce ``(step, bucket, j, pass 1,
  i)``, the owner j compresses the server's with ``(step, bucket, j, pass 2, 0)``. Padding carries
  nothing: it travels in no payload and decodes to 0.
- ``allgather``: one vector, the whole bucket; worker i's nonce ``(step, bucket, 0, pass 1, i)``.
- ``allreduce``: like ``allgather``, but every worker draws from rank 0's stream.

State: ``{"worker": {name: [per rank]}, "server": {name: [per shard, or one copy]}}``; a worker
tensor covers the (padded) bucket, a server tensor its shard.

Precision: gradients, state and arithmetic are float32, or float64 with ``precision="float64"``;
compressors see their input rounded to float32 either way, and what they decode is exact in both.
"""
from __future__ import annotations

import functools
import importlib

import numpy as np

from horovod_squeeze import reference
from horovod_squeeze.algorithms import MODEL_INCREMENT
from horovod_squeeze.compressors import Identity
from horovod_squeeze.exchange import PASS1, PASS2, shard_numel, stage_nonce

__all__ = ["init_state", "simulate_step", "reference_module"]


def reference_module(algorithm):
    """The NumPy module written from ``algorithm``'s paper: the one named like its module."""
    return importlib.import_module(
        f"horovod_squeeze.reference.{type(algorithm).__module__.rsplit('.', 1)[-1]}")


def init_state(algorithm, exchange: str, numel: int, num_workers: int,
               precision: str = "float32") -> dict:
    """Zero state for a bucket of ``numel`` entries."""
    sharded = exchange == "sharded"
    length = shard_numel(numel, num_workers) if sharded else numel
    workers = {s.name: [np.zeros(length * (num_workers if sharded else 1), precision)
                        for _ in range(num_workers)]
               for s in algorithm.state() if s.placement == "worker"}
    server = {s.name: [np.zeros(length, precision) for _ in range(num_workers if sharded else 1)]
              for s in algorithm.state() if s.placement == "server"}
    return {"worker": workers, "server": server}


def _segments_within(sizes, first: int, last: int) -> tuple[int, ...]:
    """How much of each tensor (laid end to end) lies in entries ``[first, last)``, where any."""
    segments, start = [], 0
    for size in sizes:
        overlap = min(start + size, last) - max(start, first)
        if overlap > 0:
            segments.append(overlap)
        start += size
    return tuple(segments)


def simulate_step(algorithm, exchange: str, gradients: list[np.ndarray], state: dict, *,
                  step: int, bucket: int = 0, sizes=None,
                  learning_rate: float | None = None,
                  precision: str = "float32") -> tuple[np.ndarray, dict]:
    """One synchronous step: what every worker applies, and the new state.

    ``sizes``: the entries of the bucket's tensors, in order (default: one tensor, the bucket).
    ``learning_rate``: the step's, for an algorithm whose output is a model increment.
    ``precision``: ``"float32"`` or ``"float64"``, that of the gradients, state and arithmetic.
    """
    if exchange not in ("sharded", "allgather", "allreduce"):
        raise ValueError(f"unknown exchange {exchange!r}")
    module = reference_module(algorithm)
    if algorithm.output == MODEL_INCREMENT:
        if learning_rate is None:
            raise ValueError(f"{algorithm!r} outputs a model increment: pass learning_rate")
        update = functools.partial(module.step, learning_rate=learning_rate)
    else:
        update = module.step
    n, numel = len(gradients), gradients[0].size
    sizes = [numel] if sizes is None else [int(size) for size in sizes]
    if sum(sizes) != numel:
        raise ValueError(f"tensor sizes {sizes} do not add up to the bucket's {numel} entries")

    def codec(compressor, nonce, segments, travels=True):
        if not travels and isinstance(compressor, Identity):
            return lambda v: v.astype(precision)  # a replicated server's pass 2 stays local

        def apply(v):
            payload = reference.compress(compressor, v, nonce=nonce, segments=segments)
            return reference.decompress(compressor, payload, v.size,
                                        segments=segments).astype(precision)
        return apply

    if exchange != "sharded":
        shared = exchange == "allreduce"
        segments = _segments_within(sizes, 0, numel)
        workers = {k: list(v) for k, v in state["worker"].items()}
        server = {k: v[0] for k, v in state["server"].items()}
        output, new_workers, new_server = update(
            algorithm, [g.astype(precision) for g in gradients], workers, server,
            lambda i, v: codec(algorithm.worker,
                               stage_nonce(step, bucket, 0, PASS1, 0 if shared else i),
                               segments)(v),
            codec(algorithm.server, stage_nonce(step, bucket, 0, PASS2, 0), segments,
                  travels=False))
        return output, {"worker": new_workers, "server": {k: [v] for k, v in new_server.items()}}

    shard = shard_numel(numel, n)
    padded = [np.concatenate([g.astype(precision), np.zeros(shard * n - numel, precision)])
              for g in gradients]
    outputs, new_workers = [], {k: [[] for _ in range(n)] for k in state["worker"]}
    new_server = {k: [] for k in state["server"]}
    for owner in range(n):
        part = slice(owner * shard, (owner + 1) * shard)
        segments = _segments_within(sizes, part.start, part.stop)
        output, workers, server = update(
            algorithm, [p[part] for p in padded],
            {k: [w[part] for w in v] for k, v in state["worker"].items()},
            {k: v[owner] for k, v in state["server"].items()},
            lambda i, v, owner=owner, segments=segments: codec(
                algorithm.worker, stage_nonce(step, bucket, owner, PASS1, i), segments)(v),
            codec(algorithm.server, stage_nonce(step, bucket, owner, PASS2, 0), segments))
        outputs.append(output)
        for k, per_rank in workers.items():
            for i, value in enumerate(per_rank):
                new_workers[k][i].append(value)
        for k, value in server.items():
            new_server[k].append(value)
    workers = {k: [np.concatenate(parts) for parts in per_rank]
               for k, per_rank in new_workers.items()}
    return np.concatenate(outputs)[:numel], {"worker": workers, "server": new_server}
