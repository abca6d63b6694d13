"""Algorithm state in TensorFlow checkpoints: every rank's state gathered into the engine's snapshot.

Horovod programs save checkpoints from rank 0 only, and each rank's state differs, so the engine's
live state is not tracked. Instead the engine tracks ``snapshot``, a string variable holding every
rank's state serialized by :mod:`horovod_squeeze.checkpoint` (the format PyTorch's
``state_dict()["squeeze"]`` uses). :func:`gather` (a collective) fills it before a save; after a
restore, :func:`restore` hands each rank its part back: exactly at the same world size, re-sharded
(sums preserved) at another.

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

from horovod_squeeze import checkpoint
from horovod_squeeze.driver import run_to_end
from horovod_squeeze.tensorflow import codecs

__all__ = ["gather", "restore"]


def gather(engine) -> dict:
    """Every rank's state (a collective: call it on every rank), stored in ``engine.snapshot``
    and returned in :mod:`horovod_squeeze.checkpoint`'s format."""
    gathered = run_to_end(engine.comm, checkpoint.gather(engine.plan, codecs.on(), engine.state),
                          f"{engine._config.prefix}.state")
    numpy = {i: {n: t.numpy() for n, t in s.items()} for i, s in gathered.items()}
    saved = checkpoint.to_checkpoint(engine.plan, numpy, int(engine.step.numpy()))
    engine.snapshot.assign(checkpoint.serialize(saved))
    return saved


def restore(engine, saved: dict | None = None) -> bool:
    """Takes this rank's state and the step back, from ``saved`` or from a restored snapshot.

    From the snapshot, only a fresh engine (step 0) restores, so calling it again later (a second
    ``fit``) never rolls training back. Returns whether it restored.
    """
    if saved is None:
        blob = engine.snapshot.numpy()
        if not blob or int(engine.step.numpy()) != 0:
            return False
        saved = checkpoint.deserialize(blob)
    step, restored = checkpoint.restore(engine.plan, saved, engine.comm.rank)
    for index, tensors in restored.items():
        for name, array in tensors.items():
            engine.state[index][name].assign(array)
    engine.step.assign(step)
    return True
