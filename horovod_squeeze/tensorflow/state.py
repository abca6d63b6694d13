"""Residual state in checkpoints: every rank's residuals gathered into the engine's snapshot.

Horovod programs save checkpoints from rank 0 only, and each rank's residuals differ, so the
engine's live residuals are not tracked. Instead the engine tracks a *snapshot*:
``worker_snapshots[b]`` stacks every rank's worker residual of bucket b (``[ranks, numel]``),
``server_snapshots[b]`` is the whole server residual assembled from the shards, and
``snapshot_step`` is the step they belong to (-1: none). ``gather`` (a collective) fills it before
a save; after a restore, ``restore`` hands each rank its part back, so training resumes exactly.

Example (custom loop)::

    engine = tape.squeeze.engine
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, squeeze=engine)
    hstf.state.gather(engine)                   # every rank
    if hvd.rank() == 0:
        checkpoint.save(prefix)
    ...
    checkpoint.restore(path)                    # every rank, in a new process
    hstf.state.restore(engine)

The Keras callback :class:`~horovod_squeeze.tensorflow.keras.callbacks.ResidualCheckpointCallback`
does both around ``ModelCheckpoint``.
"""
from __future__ import annotations

import tensorflow as tf

__all__ = ["gather", "restore"]


def _require_snapshot(engine) -> None:
    if not hasattr(engine, "snapshot_step"):
        raise ValueError("this engine was built with checkpoint_residuals=False: it keeps no "
                         "snapshot of its residuals")


def gather(engine) -> None:
    """Copies every rank's residuals into the snapshot (a collective: call it on every rank)."""
    _require_snapshot(engine)
    comm = engine.comm
    for bucket in engine.buckets:
        if not bucket.compressed:
            continue
        worker = engine.worker_residuals[bucket.index][:bucket.numel]
        stacked = comm.allgather(worker, f"{engine._config.prefix}.state.b{bucket.index}.worker")
        engine.worker_snapshots[bucket.index].assign(tf.reshape(stacked, [comm.size, -1]))
        server = engine.server_residuals[bucket.index]
        if bucket.exchange == "sharded":
            server = comm.allgather(server, f"{engine._config.prefix}.state.b{bucket.index}.server")
        engine.server_snapshots[bucket.index].assign(server[:bucket.numel])
    engine.snapshot_step.assign(engine.step)


def restore(engine) -> bool:
    """Takes this rank's residuals and the step from a restored snapshot.

    Only a fresh engine (step 0) restores, so calling it again later (a second ``fit``) never
    rolls training back. Returns whether it restored.
    """
    _require_snapshot(engine)
    snapshot_step = int(engine.snapshot_step.numpy())
    if snapshot_step < 0 or int(engine.step.numpy()) != 0:
        return False
    comm = engine.comm
    for bucket in engine.buckets:
        if not bucket.compressed:
            continue
        stacked = engine.worker_snapshots[bucket.index]
        if stacked.shape[0] != comm.size:
            raise ValueError(f"the checkpoint's residuals come from {stacked.shape[0]} ranks, "
                             f"this job has {comm.size}")
        worker = engine.worker_residuals[bucket.index]
        worker.assign(tf.pad(stacked[comm.rank], [[0, worker.shape[0] - bucket.numel]]))
        full = engine.server_snapshots[bucket.index]
        server = engine.server_residuals[bucket.index]
        if bucket.exchange == "sharded":
            shard = server.shape[0]
            own = full[comm.rank * shard:(comm.rank + 1) * shard]
            server.assign(tf.pad(own, [[0, shard - own.shape[0]]]))
        else:
            server.assign(full)
    engine.step.assign(snapshot_step)
    return True
