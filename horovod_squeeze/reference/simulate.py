"""NumPy simulation of n workers running an algorithm over one exchange: the test oracle.

The simulation follows the exchanges' data layout exactly (bucket padding, shard ownership, nonces),
so a multi-rank run can be compared with it step by step:

- ``sharded``: the bucket is zero-padded to ``n * shard`` entries (:func:`shard_numel`); worker i
  compresses each shard j of ``g_i + e_i`` separately and sends it to rank j (pass 1, alltoall);
  rank j averages the n pieces, adds its server residual and compresses (pass 2, allgather);
- ``allgather``: worker i compresses its whole bucket, every rank decodes all n payloads and runs
  the server stage itself on the replicated server residual;
- ``allreduce``: like ``allgather``, for linear compressors whose ranks share random streams.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from horovod_squeeze import reference
from horovod_squeeze.algorithms import (
    SERVER, WORKER, Algorithm, server_stage, stage_nonce, worker_stage,
)
from horovod_squeeze.exchange import EXCHANGES, shard_numel, shard_valid_numel

__all__ = ["SimulationState", "init_state", "simulate_step"]


@dataclasses.dataclass
class SimulationState:
    """Residuals of every worker and of every shard server, for one bucket."""

    worker_residuals: list[np.ndarray]  # per worker, over the (padded) bucket
    server_residuals: list[np.ndarray]  # per shard owner (one replicated copy unless sharded)


def init_state(numel: int, num_workers: int, exchange: str) -> SimulationState:
    """Zero residuals for a bucket of ``numel`` entries."""
    if exchange == "sharded":
        shard = shard_numel(numel, num_workers)
        return SimulationState([np.zeros(shard * num_workers, np.float32)] * num_workers,
                               [np.zeros(shard, np.float32)] * num_workers)
    return SimulationState([np.zeros(numel, np.float32)] * num_workers, [np.zeros(numel, np.float32)])


def simulate_step(algorithm: Algorithm, exchange: str, gradients: list[np.ndarray],
                  state: SimulationState, *, step: int, bucket: int = 0
                  ) -> tuple[np.ndarray, SimulationState]:
    """One synchronous step; returns the averaged gradient every worker applies and the new state."""
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
    n = len(gradients)
    numel = gradients[0].size
    if exchange == "sharded":
        shard = shard_numel(numel, n)
        pieces = [[None] * n for _ in range(n)]  # pieces[owner][worker]
        worker_residuals = []
        for rank, gradient in enumerate(gradients):
            padded = np.zeros(shard * n, np.float32)
            padded[:numel] = gradient
            residual_parts = []
            for owner in range(n):
                part = slice(owner * shard, (owner + 1) * shard)
                out = worker_stage(reference, algorithm, padded[part],
                                   state.worker_residuals[rank][part],
                                   nonce=stage_nonce(step, bucket, owner, WORKER, rank),
                                   name=f"bucket{bucket}")
                valid = shard_valid_numel(numel, n, owner)
                pieces[owner][rank] = _zero_tail(out.decoded, valid)
                residual_parts.append(_zero_tail(_residual(out, shard), valid))
            worker_residuals.append(np.concatenate(residual_parts))
        served = [server_stage(reference, algorithm, pieces[owner], state.server_residuals[owner],
                               nonce=stage_nonce(step, bucket, owner, SERVER),
                               name=f"bucket{bucket}") for owner in range(n)]
        applied = np.concatenate([s.decoded for s in served])[:numel]
        server_residuals = [_zero_tail(_residual(s, shard), shard_valid_numel(numel, n, owner))
                            for owner, s in enumerate(served)]
        return applied, SimulationState(worker_residuals, server_residuals)

    shared_stream = exchange == "allreduce"
    outs = [worker_stage(reference, algorithm, gradient, state.worker_residuals[rank],
                         nonce=stage_nonce(step, bucket, 0, WORKER, 0 if shared_stream else rank),
                         name=f"bucket{bucket}")
            for rank, gradient in enumerate(gradients)]
    served = server_stage(reference, algorithm, [o.decoded for o in outs], state.server_residuals[0],
                          nonce=stage_nonce(step, bucket, 0, SERVER), name=f"bucket{bucket}")
    return served.decoded, SimulationState([_residual(o, numel) for o in outs],
                                           [_residual(served, numel)])


def _zero_tail(x: np.ndarray, valid: int) -> np.ndarray:
    out = x.copy()
    out[valid:] = 0
    return out


def _residual(out, numel: int) -> np.ndarray:
    return out.residual if out.residual is not None else np.zeros(numel, np.float32)
