"""Algorithm state in PyTorch checkpoints: ``optimizer.state_dict()["squeeze"]``.

:func:`gather` (a collective) collects every rank's state in :mod:`horovod_squeeze.checkpoint`'s
format, with torch tensors, so one rank's checkpoint holds the whole state; :func:`restore` takes
this rank's part back: exactly at the same world size, re-sharded (sums preserved) at another.
``DistributedOptimizer.state_dict(all_ranks=True)`` calls :func:`gather`; its plain
``state_dict()`` / ``load_state_dict()`` hold and take one rank's state without a collective
(:mod:`horovod_squeeze.resume`).

Example::

    saved = hst.state.gather(optimizer.squeeze_engine)     # every rank
    ...
    hst.state.restore(optimizer.squeeze_engine, saved)     # every rank, at any world size
"""
from __future__ import annotations

import torch

from horovod_squeeze import checkpoint
from horovod_squeeze.driver import run_to_end
from horovod_squeeze.torch import codecs

__all__ = ["gather", "restore"]


def gather(engine) -> dict:
    """Every rank's state (a collective: call it on every rank), as torch tensors on the CPU."""
    engine.agree()  # what was loaded is applied first, so the gathered state is current
    device = next((t.device for s in engine.state.values() for t in s.values()),
                  torch.device("cpu"))
    gathered = run_to_end(engine.comm, checkpoint.gather(engine.plan, codecs.on(device),
                                                         engine.state), f"{engine._scope}.state")
    numpy = {i: {n: t.cpu().numpy() for n, t in s.items()} for i, s in gathered.items()}
    saved = checkpoint.to_checkpoint(engine.plan, numpy, engine.step, engine.last_rate)
    for entry in saved["state"].values():
        entry["tensors"] = {n: torch.from_numpy(a) for n, a in entry["tensors"].items()}
    return saved


def restore(engine, saved: dict) -> bool:
    """Takes this rank's state and the step back from :func:`gather`'s dict. Returns True."""
    if isinstance(saved, dict) and isinstance(saved.get("state"), dict):
        saved = {**saved, "state": {
            name: {**entry, "tensors": {n: t.cpu().numpy() if isinstance(t, torch.Tensor) else t
                                        for n, t in entry["tensors"].items()}}
            for name, entry in saved["state"].items()}}
    step, restored = checkpoint.restore(engine.plan, saved, engine.comm.rank)
    for index, tensors in restored.items():
        for name, array in tensors.items():
            live = engine.state[index][name]
            live.copy_(torch.from_numpy(array).to(live.device))
    engine.step = step
    engine.last_rate = saved.get("learning_rate")
    return True
