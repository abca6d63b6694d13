"""Algorithm state in checkpoints, for both frameworks: gathered whole, restored per rank.

Each rank's state differs, and Horovod programs save from rank 0, so :func:`gather` (an exchange-
style generator, run by :mod:`horovod_squeeze.driver` over the engine's collectives) collects every
rank's state, and :func:`to_checkpoint` lays it out by parameter name::

    {"version": 2, "step": 12, "world_size": 4, "algorithm": "DoubleSqueeze(...)",
     "exchange": "sharded", "parameters": [("layer.weight", (64, 32)), ...],
     "state": {"worker_residual": {"placement": "worker", "units": "gradient",
                                   "tensors": {"layer.weight": <[ranks, *shape]>, ...}},
               "server_residual": {"placement": "server", "units": "gradient",
                                   "tensors": {"layer.weight": <[*shape]>, ...}}}}

Worker state stacks every rank's tensor; server state is the whole tensor, assembled from its
shards. Parameters are matched by name, or by position where a rebuilt model names them anew
(Keras) but their shapes line up. :func:`restore` hands a rank its part back: exactly at the same world size; at another,
each rank's worker residual becomes the old ranks' sum divided by the new count (so the sum is
preserved, which keeps ``lr * sum`` unchanged under Horovod's convention of scaling the learning
rate with the number of ranks), each rank's worker momentum the old ranks' mean (what they applied),
and server state is re-sharded. Arrays are NumPy here; each binding
converts (``torch.Tensor`` in ``state_dict()``, a serialized snapshot in TensorFlow checkpoints).
"""
from __future__ import annotations

import io
import warnings

import numpy as np

from horovod_squeeze.algorithms.base import MOMENT, WORKER
from horovod_squeeze.exchange import Collective, Sharded
from horovod_squeeze.plan import Plan

__all__ = ["FORMAT_VERSION", "gather", "to_checkpoint", "restore", "serialize", "deserialize",
           "check_version", "parameters_of"]

FORMAT_VERSION = 2


def gather(plan: Plan, codec, state: dict):
    """Generator: every rank's state, gathered (a collective: every rank must run it).

    ``state`` maps bucket index to this rank's ``{name: tensor}``; returns
    ``{bucket index: {name: tensor}}`` with worker state ``[ranks * numel]`` (rank-major) and server
    state ``[numel]``.
    """
    xp = codec.xp
    gathered = {}
    for bucket in plan.buckets:
        specs = plan.state_specs(bucket)
        if not specs:
            continue
        out = {}
        for spec in specs:
            tensor = state[bucket.index][spec.name]
            if spec.placement == WORKER:
                out[spec.name] = yield Collective(
                    "allgather", xp.slice(tensor, 0, bucket.numel), f"b{bucket.index}.{spec.name}")
            elif isinstance(bucket.exchange, Sharded):
                whole = yield Collective("allgather", tensor, f"b{bucket.index}.{spec.name}")
                out[spec.name] = xp.slice(whole, 0, bucket.numel)
            else:
                out[spec.name] = xp.slice(tensor, 0, bucket.numel)
        gathered[bucket.index] = out
    return gathered


def to_checkpoint(plan: Plan, gathered: dict, step: int, learning_rate=None) -> dict:
    """The gathered state (NumPy arrays) by parameter name, with what it belongs to and the
    learning rate its gradient-units residuals are measured in (None if not tracked)."""
    state = {}
    for spec in plan.state_specs():
        tensors = {}
        for bucket in plan.buckets:
            if spec not in plan.state_specs(bucket):
                continue
            flat = np.asarray(gathered[bucket.index][spec.name], _precision(plan))
            rows = flat.reshape(plan.size, bucket.numel) if spec.placement == WORKER else flat
            for name, shape, start, stop in bucket.spans():
                leading = rows.shape[:-1]
                tensors[name] = rows[..., start:stop].reshape(*leading, *shape).copy()
        state[spec.name] = {"placement": spec.placement, "units": spec.units, "tensors": tensors}
    return {"version": FORMAT_VERSION, "step": int(step), "world_size": plan.size,
            "learning_rate": None if learning_rate is None else float(learning_rate),
            "algorithm": repr(plan.algorithm), "exchange": plan.exchange.name,
            "parameters": parameters_of(plan), "state": state}


def check_version(saved) -> None:
    """A ``ValueError`` unless ``saved`` is a dict of this format's version."""
    version = saved.get("version") if isinstance(saved, dict) else None
    if version != FORMAT_VERSION:
        raise ValueError(f"unsupported horovod_squeeze state version {version!r} "
                         f"(this version reads {FORMAT_VERSION})")


def parameters_of(plan: Plan) -> list[tuple[str, tuple[int, ...]]]:
    """The parameters that have state, in bucket order: names and shapes."""
    return [(name, shape) for bucket in plan.buckets if plan.state_specs(bucket)
            for name, shape in zip(bucket.names, bucket.shapes)]


def _saved_names(plan: Plan, saved: dict) -> dict[str, str]:
    """This plan's parameter name -> the checkpoint's. By name; if names differ but the
    checkpoint's parameters have the same shapes in the same order (Keras names layers anew when a
    model is rebuilt), by position."""
    current = parameters_of(plan)
    stored = [(name, tuple(shape)) for name, shape in saved.get("parameters", [])]
    names = {name for name, _ in stored}
    if all(name in names for name, _ in current):
        return {name: name for name, _ in current}
    if [shape for _, shape in stored] == [shape for _, shape in current]:
        return {name: old for (name, _), (old, _) in zip(current, stored)}
    missing = [name for name, _ in current if name not in names]
    raise ValueError(f"the checkpoint has no state for parameters {missing}, and its parameters' "
                     f"shapes {[s for _, s in stored]} differ from this model's "
                     f"{[s for _, s in current]}: it comes from another model")


def restore(plan: Plan, saved: dict, rank: int) -> tuple[int, dict]:
    """``(step, {bucket index: {name: array}})``: this rank's state from a checkpoint, each array
    of the live tensor's length (padding zero)."""
    check_version(saved)
    old_size = int(saved["world_size"])
    wanted = {spec.name: spec for spec in plan.state_specs()}
    missing = sorted(set(wanted) - set(saved["state"]))
    if missing:
        raise ValueError(f"the checkpoint has no {missing} state for {plan.algorithm!r}: it was "
                         f"saved by {saved['algorithm']}")
    extra = sorted(set(saved["state"]) - set(wanted))
    if extra:
        warnings.warn(f"checkpoint state {extra} (from {saved['algorithm']}) is not used by "
                      f"{plan.algorithm!r} and is dropped", stacklevel=3)
    saved_name = _saved_names(plan, saved)
    restored = {}
    for bucket in plan.buckets:
        layout = plan.state_layout(bucket)
        if not layout:
            continue
        restored[bucket.index] = {}
        for spec in plan.state_specs(bucket):
            name = spec.name
            tensors = saved["state"][name]["tensors"]
            tensors = {n: tensors[saved_name[n]] for n in bucket.names
                       if saved_name[n] in tensors}
            absent = [n for n in bucket.names if n not in tensors]
            if absent:
                raise ValueError(f"the checkpoint's {name} state has no parameters {absent}")
            live = np.zeros(layout[name], _precision(plan))
            if spec.placement == WORKER:
                stacked = np.concatenate([_check_shape(tensors[n], (old_size, *s), name, n)
                                          .reshape(old_size, -1)
                                          for n, s in zip(bucket.names, bucket.shapes)], axis=1)
                if old_size == plan.size:
                    live[:bucket.numel] = stacked[rank]
                elif spec.units == MOMENT:  # what the ranks apply is the mean: keep it
                    live[:bucket.numel] = stacked.mean(axis=0)
                else:
                    live[:bucket.numel] = stacked.sum(axis=0) / plan.size
            else:
                whole = np.concatenate([_check_shape(tensors[n], s, name, n).reshape(-1)
                                        for n, s in zip(bucket.names, bucket.shapes)])
                start, stop = plan.state_span(bucket, spec, rank)
                live[:stop - start] = whole[start:stop]
            restored[bucket.index][name] = live
    return int(saved["step"]), restored


def serialize(checkpoint: dict) -> bytes:
    """A checkpoint dict as bytes (NumPy's ``.npz``), for frameworks that store one blob."""
    arrays = {"meta": np.array(repr({k: v for k, v in checkpoint.items() if k != "state"}))}
    for name, entry in checkpoint["state"].items():
        arrays[f"spec/{name}"] = np.array([entry["placement"], entry["units"]])
        for param, array in entry["tensors"].items():
            arrays[f"tensor/{name}/{param}"] = array
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def deserialize(blob: bytes) -> dict:
    """Inverse of :func:`serialize`."""
    import ast

    with np.load(io.BytesIO(blob), allow_pickle=False) as arrays:
        checkpoint = ast.literal_eval(str(arrays["meta"]))
        checkpoint["state"] = {}
        for key in arrays.files:
            kind, _, rest = key.partition("/")
            if kind == "spec":
                placement, units = arrays[key].tolist()
                checkpoint["state"].setdefault(rest, {"tensors": {}}).update(
                    placement=placement, units=units)
            elif kind == "tensor":
                name, _, param = rest.partition("/")
                checkpoint["state"].setdefault(name, {"tensors": {}})["tensors"][param] = arrays[key]
    return checkpoint


def _precision(plan: Plan):
    """The dtype of the plan's state: what checkpoints hold (a float32 checkpoint restores into a
    float64 run exactly; the other way rounds)."""
    return np.dtype(plan.precision)


def _check_shape(array, shape, state_name: str, param: str) -> np.ndarray:
    array = np.asarray(array)
    if array.shape != tuple(shape):
        raise ValueError(f"the checkpoint's {state_name} of {param!r} has shape {array.shape}, "
                         f"expected {tuple(shape)}")
    return array

