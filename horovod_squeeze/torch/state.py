"""Residual state as it appears in ``optimizer.state_dict()["squeeze"]``, keyed by parameter name.

``gather`` collects every rank's residuals (a collective), so one rank's checkpoint holds the whole
state: ``worker_residuals[name]`` stacks the ranks' worker residuals (shape ``[ranks, *param]``) and
``server_residuals[name]`` is the full server residual, assembled from the shards. ``restore``
takes this rank's part back: exactly at the same world size; at another, each rank's worker
residual becomes the old ranks' sum divided by the new count and the server residual is re-sharded,
so both sums are preserved.
"""
from __future__ import annotations

import math

import torch

from horovod_squeeze.exchange import shard_numel

__all__ = ["gather", "restore"]

FORMAT_VERSION = 1


def _allgather(engine, tensor: torch.Tensor, name: str) -> torch.Tensor:
    return engine.comm.wait(engine.comm.allgather(tensor, name))


def _per_parameter(bucket, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Splits a bucket-flat tensor (last dim) into per-parameter tensors."""
    out = {}
    for name, shape, offset in zip(bucket.names, bucket.shapes, bucket.offsets):
        piece = flat[..., offset:offset + math.prod(shape)]
        out[name] = piece.reshape(*flat.shape[:-1], *shape).clone()
    return out


def gather(engine) -> dict:
    size = engine.comm.size
    workers, servers = {}, {}
    for bucket in engine.buckets:
        worker = engine.worker_residuals[bucket.index]
        if worker.numel() == 0:
            continue  # uncompressed bucket: no residuals
        stacked = _allgather(engine, worker[:bucket.numel].reshape(1, -1),
                             f"squeeze.state.b{bucket.index}.worker")
        workers.update(_per_parameter(bucket, stacked))
        server = engine.server_residuals[bucket.index]
        if bucket.exchange == "sharded":
            server = _allgather(engine, server, f"squeeze.state.b{bucket.index}.server")
        servers.update(_per_parameter(bucket, server[:bucket.numel]))
    return {"version": FORMAT_VERSION, "step": engine.step, "world_size": size,
            "algorithm": repr(engine.algorithm), "exchange": engine.exchange,
            "worker_residuals": workers, "server_residuals": servers}


def restore(engine, state: dict) -> None:
    if state.get("version") != FORMAT_VERSION:
        raise ValueError(f"unsupported squeeze state version {state.get('version')!r}")
    size, rank = engine.comm.size, engine.comm.rank
    old_size = state["world_size"]
    expected = {n for b in engine.buckets if engine.worker_residuals[b.index].numel() for n in b.names}
    missing = expected - set(state["worker_residuals"])
    if missing:
        raise ValueError(f"squeeze state has no residuals for parameters {sorted(missing)}")
    for bucket in engine.buckets:
        if engine.worker_residuals[bucket.index].numel() == 0:
            continue
        stacked = torch.cat([state["worker_residuals"][n].reshape(old_size, -1)
                             for n in bucket.names], dim=1)
        worker = stacked[rank] if old_size == size else stacked.sum(dim=0) / size
        engine.worker_residuals[bucket.index].zero_()
        engine.worker_residuals[bucket.index][:bucket.numel] = worker
        full = torch.cat([state["server_residuals"][n].reshape(-1) for n in bucket.names])
        server = engine.server_residuals[bucket.index]
        server.zero_()
        if bucket.exchange == "sharded":
            shard = shard_numel(bucket.numel, size)
            own = full[rank * shard:(rank + 1) * shard]
            server[:own.numel()] = own
        else:
            server.copy_(full)
    engine.step = state["step"]
