"""Resuming from what ranks saved, without a collective at save or load time.

Horovod programs save from rank 0 only and restore on rank 0 before broadcasting, so saving and
loading must never wait for other ranks. A rank's ``state_dict()`` therefore holds its own state
(:func:`to_local`); :func:`horovod_squeeze.checkpoint.gather` (a collective every rank calls)
holds every rank's. Loading validates at once (:func:`prepare`: a ``ValueError`` names what is
wrong) and applies nothing yet: at the first step every rank sends one row (:func:`agreement_row`)
in one small allgather, and :func:`decide` turns the rows into the same decision on every rank:

- every rank loaded its own state, saved at the same step by a job of this size: each restores it
  (exact: the per-rank-file path);
- every rank loaded every rank's state, saved at the same step: each restores its part (exact,
  re-sharded at another world size);
- nobody loaded anything: nothing changes;
- anything else (rank 0 alone loaded its state, ranks loaded different steps, a file of another
  rank): every rank starts from zero state at the latest step loaded, and rank 0 logs why. Never
  one rank's residual copied onto all: the ranks' residuals differ, and DORE's shifts must keep
  ``h = mean_i h_i``.

The same rows carry a fingerprint of each rank's configuration, so ranks that build different
algorithms, exchanges, parameters or options fail at the first step, every rank with the same
message, instead of waiting on collectives that never match.
"""
from __future__ import annotations

import zlib
from typing import NamedTuple

import numpy as np

from horovod_squeeze import checkpoint
from horovod_squeeze.plan import Plan

__all__ = ["LOCAL_KIND", "NOTHING", "OWN", "EVERY_RANK", "FOREIGN", "Pending", "Decision",
           "to_local", "prepare", "agreement_row", "decide", "FINGERPRINT_FIELDS"]

#: ``kind`` of one rank's saved state.
LOCAL_KIND = "one rank"

#: What a rank loaded, as its agreement row says: nothing; its own state; every rank's state;
#: another rank's (or another job size's) state, which this rank cannot restore.
NOTHING, OWN, EVERY_RANK, FOREIGN = 0, 1, 2, 3
_LOADED = {OWN: "its own state", EVERY_RANK: "every rank's state",
           FOREIGN: "another rank's state"}

#: The configuration every rank must share, in agreement-row order.
FINGERPRINT_FIELDS = ("algorithm", "exchange", "parameters", "options")


class Pending(NamedTuple):
    """Loaded state waiting for the agreement: what it is, and this rank's part if restorable."""

    source: int  # OWN, EVERY_RANK or FOREIGN
    step: int
    learning_rate: float | None
    state: dict | None  # {bucket index: {name: array}} for this rank, or None (FOREIGN)
    saved: dict  # as loaded: what state_dict() returns until the agreement


class Decision(NamedTuple):
    """What every rank does at the agreement: ``"keep"``, ``"restore"`` (its pending state) or
    ``"reset"`` (zero state at ``step``; ``message`` says why)."""

    action: str
    step: int
    message: str = ""


def to_local(plan: Plan, live: dict, rank: int, step: int, learning_rate=None) -> dict:
    """This rank's live state (``{bucket index: {name: array}}``) as ``state_dict()`` saves it."""
    return {"version": checkpoint.FORMAT_VERSION, "kind": LOCAL_KIND, "rank": int(rank),
            "world_size": plan.size, "step": int(step),
            "learning_rate": None if learning_rate is None else float(learning_rate),
            "algorithm": repr(plan.algorithm), "exchange": plan.exchange.name,
            "parameters": checkpoint.parameters_of(plan),
            "buckets": {index: dict(tensors) for index, tensors in live.items() if tensors}}


def prepare(plan: Plan, saved: dict, rank: int) -> Pending:
    """What ``saved`` (one rank's state, or every rank's) gives this rank; checked now."""
    if not (isinstance(saved, dict) and saved.get("kind") == LOCAL_KIND):
        step, state = checkpoint.restore(plan, saved, rank)
        return Pending(EVERY_RANK, step, saved.get("learning_rate"), state, saved)
    checkpoint.check_version(saved)
    for field, mine in (("algorithm", repr(plan.algorithm)), ("exchange", plan.exchange.name)):
        if saved[field] != mine:
            raise ValueError(f"the saved state comes from {field} {saved[field]}, this optimizer "
                             f"runs {mine}")
    shapes = [tuple(shape) for _, shape in saved["parameters"]]
    if shapes != [shape for _, shape in checkpoint.parameters_of(plan)]:
        raise ValueError(f"the saved state's parameter shapes {shapes} differ from this model's: "
                         "it comes from another model")
    step, rate = int(saved["step"]), saved.get("learning_rate")
    if saved["rank"] != rank or saved["world_size"] != plan.size:
        return Pending(FOREIGN, step, rate, None, saved)
    state = {}
    for bucket in plan.buckets:
        layout = plan.state_layout(bucket)
        if not layout:
            continue
        tensors = saved["buckets"].get(bucket.index, {})
        state[bucket.index] = {}
        for name, numel in layout.items():
            array = np.asarray(tensors.get(name))
            if array.shape != (numel,):
                raise ValueError(f"the saved {name} of bucket {bucket.index} has shape "
                                 f"{array.shape}, expected ({numel},)")
            state[bucket.index][name] = array.astype(plan.precision)
    return Pending(OWN, step, rate, state, saved)


def _fingerprint(plan: Plan) -> list[int]:
    parts = (repr(plan.algorithm), plan.exchange.name,
             repr([(b.shapes, b.exchange.name) for b in plan.buckets]),
             repr((plan.options.warmup_steps, plan.precision)))
    return [zlib.crc32(part.encode()) for part in parts]


def agreement_row(plan: Plan, pending: Pending | None, step: int) -> list[int]:
    """This rank's row: what it loaded, the step it would resume at, its configuration."""
    if pending is None:
        return [NOTHING, int(step), *_fingerprint(plan)]
    return [pending.source, pending.step, *_fingerprint(plan)]


def decide(rows, rank: int) -> Decision:
    """Every rank's rows (rank order) -> the decision, the same on every rank; a ``ValueError``,
    the same on every rank, if their configurations differ."""
    rows = np.asarray(rows, np.int64)
    for k, field in enumerate(FINGERPRINT_FIELDS):
        column = rows[:, 2 + k]
        differ = [r for r in range(len(rows)) if column[r] != column[0]]
        if differ:
            raise ValueError(f"ranks {differ} were built with another {field} than rank 0 "
                             f"(this is rank {rank}): every rank must wrap the same model with "
                             "the same algorithm, exchange and options")
    sources, steps = rows[:, 0], rows[:, 1]
    if not sources.any():
        return Decision("keep", int(steps[0]))
    same_step = len(set(steps.tolist())) == 1
    if same_step and (all(sources == OWN) or all(sources == EVERY_RANK)):
        return Decision("restore", int(steps[0]))
    step = int(steps[sources != NOTHING].max())
    loaded = "; ".join(
        f"rank {r} " + (f"loaded {_LOADED[int(s)]} of step {int(t)}" if s else "loaded none")
        for r, (s, t) in enumerate(zip(sources, steps)))
    return Decision("reset", step, (
        f"the saved algorithm state cannot be restored exactly on every rank ({loaded}), so "
        f"every rank starts from zero state at step {step}. To resume exactly, have every rank "
        "save its own state_dict() and load its own file, or save state_dict(all_ranks=True) "
        "(a collective) and load it on every rank"))
