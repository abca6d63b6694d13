"""In-process fake collectives: n ranks as threads of one process, for tests without ``horovodrun``.

:class:`FakeWorld` gives each rank a :class:`FakeCollectives` with the interface the exchange driver
uses (``rank``, ``size``, ``launch``, ``wait``). Collectives are matched across ranks by name, as
Horovod matches them, and computed in NumPy in rank order: ``alltoall`` (split along dim 0, equally
or by ``splits``), ``allgather`` (concatenation) and ``allreduce_average`` (the mean in float32, or
float64 for float64 tensors, summed in rank order). ``splits`` must be the same list on every rank
and match the tensors, as :class:`~horovod_squeeze.exchange.Collective` describes it; a mismatch
raises, naming the rank. Results come back as the framework's tensors on the input's device. A rank
whose peers never join a collective gets :class:`FakeTimeout` naming it, never a hang.

Example::

    import torch
    from horovod_squeeze.fake import FakeWorld

    def body(comm):
        handle = comm.launch("allgather", torch.full((2,), float(comm.rank)), "x")
        return comm.wait(handle).tolist()

    assert FakeWorld(3).run(body) == [[0, 0, 1, 1, 2, 2]] * 3
"""
from __future__ import annotations

import threading
from typing import Any, Callable

import numpy as np

from horovod_squeeze._collectives import OPS

__all__ = ["FakeWorld", "FakeCollectives", "FakeTimeout"]


class FakeTimeout(RuntimeError):
    """A collective that not every rank joined in time."""


class FakeWorld:
    """``size`` simulated ranks; ``timeout`` seconds before a collective gives up."""

    def __init__(self, size: int, timeout: float = 60.0):
        if size < 1:
            raise ValueError(f"a world needs at least one rank, got {size}")
        self.size, self.timeout = size, timeout
        self._lock = threading.Condition()
        self._calls: dict[str, dict] = {}
        self._scopes = [0] * size

    def collectives(self, rank: int) -> "FakeCollectives":
        return FakeCollectives(self, rank)

    def run(self, fn: Callable[["FakeCollectives"], Any]) -> list:
        """Runs ``fn(collectives)`` on every rank, each in its own thread; returns the results in
        rank order and re-raises the first rank's exception, naming the rank."""
        results, errors = [None] * self.size, [None] * self.size

        def body(rank):
            try:
                results[rank] = fn(self.collectives(rank))
            except BaseException as error:  # noqa: BLE001 - re-raised in the caller
                errors[rank] = error

        threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(self.size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for rank, error in enumerate(errors):
            if error is not None:
                raise RuntimeError(f"rank {rank} failed: {error!r}") from error
        return results

    def _join(self, op: str, name: tuple[str, int], rank: int, array: np.ndarray,
              splits: tuple[int, ...] | None) -> np.ndarray:
        """``name`` is the collective's name and how often this rank used it before: a rank may
        reuse a name (the next step) before the slowest rank has collected the last result."""
        with self._lock:
            call = self._calls.setdefault(name, {"op": op, "splits": splits, "inputs": {},
                                                 "output": None, "collected": 0})
            if call["op"] != op:
                raise RuntimeError(f"collective {name!r}: rank {rank} calls {op}, another rank "
                                   f"{call['op']}")
            if call["splits"] != splits:
                raise RuntimeError(f"collective {name!r}: rank {rank} gives splits {splits}, "
                                   f"another rank {call['splits']}")
            _check_splits(op, name, rank, array, splits, self.size)
            call["inputs"][rank] = array
            if len(call["inputs"]) == self.size:
                call["output"] = _compute(op, [call["inputs"][r] for r in range(self.size)],
                                          splits)
                self._lock.notify_all()
            elif not self._lock.wait_for(lambda: call["output"] is not None, self.timeout):
                missing = sorted(set(range(self.size)) - set(call["inputs"]))
                raise FakeTimeout(f"collective {name!r} ({op}): ranks {missing} never joined "
                                  f"within {self.timeout} s")
            output = call["output"]
            call["collected"] += 1
            if call["collected"] == self.size:
                del self._calls[name]
            return output[rank] if op == "alltoall" else output


def _check_splits(op: str, name, rank: int, array: np.ndarray, splits, size: int) -> None:
    """Refuses splits that do not describe this rank's tensor (what Horovod would reject or
    mis-slice)."""
    if splits is None:
        return
    if op == "allreduce_average" or len(splits) != size or min(splits) < 0:
        raise ValueError(f"collective {name!r} ({op}): rank {rank} gives splits {splits}; "
                         f"expected {size} non-negative piece sizes for alltoall or allgather")
    mine = sum(splits) if op == "alltoall" else splits[rank]
    if array.shape[0] != mine:
        raise ValueError(f"collective {name!r} ({op}): rank {rank} sends {array.shape[0]} "
                         f"entries, its splits {splits} say {mine}")


def _compute(op: str, inputs: list[np.ndarray], splits):
    if op == "allgather":
        return np.concatenate(inputs)
    if op == "allreduce_average":
        wide = np.float64 if inputs[0].dtype == np.float64 else np.float32
        total = inputs[0].astype(wide)
        for piece in inputs[1:]:
            total = total + piece
        return (total / wide(len(inputs))).astype(inputs[0].dtype)
    # alltoall: pieces[sender][receiver]
    cuts = len(inputs) if splits is None else np.cumsum(splits)[:-1]
    pieces = [np.split(x, cuts) for x in inputs]
    return [np.concatenate([pieces[sender][receiver] for sender in range(len(inputs))])
            for receiver in range(len(inputs))]


class FakeCollectives:
    """One simulated rank's collectives. ``launch`` blocks until every rank has joined (threads
    stand in for processes), so ``wait`` only hands the result back."""

    def __init__(self, world: FakeWorld, rank: int):
        self._world, self.rank, self.size = world, rank, world.size
        self._uses: dict[str, int] = {}

    def new_scope(self) -> str:
        """A name prefix for one engine's collectives (counted per simulated rank, as each
        process counts its own)."""
        scope = self._world._scopes[self.rank]
        self._world._scopes[self.rank] += 1
        return f"squeeze{scope}"

    def launch(self, op: str, tensor, name: str, splits=None):
        if op not in OPS:
            raise ValueError(f"unknown collective {op!r}; expected one of {OPS}")
        use = self._uses.get(name, 0)
        self._uses[name] = use + 1
        splits = None if splits is None else tuple(int(s) for s in splits)
        output = self._world._join(op, (name, use), self.rank, _to_numpy(tensor), splits)
        return _to_native(output.copy(), tensor)  # each rank owns its result, as each process does

    def wait(self, handle):
        return handle


def _to_numpy(tensor) -> np.ndarray:
    if type(tensor).__module__.startswith("torch"):
        return tensor.detach().cpu().numpy()
    return np.asarray(tensor.numpy() if hasattr(tensor, "numpy") else tensor)


def _to_native(array: np.ndarray, like):
    if type(like).__module__.startswith("torch"):
        import torch

        return torch.from_numpy(np.ascontiguousarray(array)).to(like.device)
    if type(like).__module__.startswith("tensorflow"):
        import tensorflow as tf

        return tf.constant(array)
    return array
