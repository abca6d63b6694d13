"""The program of one rank (``python -m benchmarks.cluster.rank JOB_DIR``), run inside its host.

Reads ``JOB_DIR/job.json``, joins Horovod and ``torch.distributed``, and either

- ``speed``: runs the contenders in rounds, rotating their order every round so that a slow
  period of the machine is spread over all of them; each step is preceded by a barrier and
  bracketed by readings of this host's interface counters; or
- ``convergence``: trains a fresh model with each contender for some epochs and measures test
  accuracy and the bytes it took.

Writes ``JOB_DIR/result-RANK.json``. A contender that raises is named in the result, so the
harness can record its failure and run the others without it.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys
import time
import traceback

import torch

from benchmarks.cluster import contenders as contenders_module
from benchmarks.cluster import counters, workloads

# Horovod's and Gloo's background threads send a little even between steps; this long an idle
# window measures that rate, which is part of the protocol overhead.
_IDLE_WINDOW_S = 2.0


class ContenderFailed(RuntimeError):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def _timed_step(contender, batch, iface: str) -> dict:
    _barrier()
    # A collective returns once this rank has what it needs, but what it sent last may still wait
    # in its socket or its shaper's queue, uncounted: before each reading, wait until the peers
    # have acknowledged everything, so a step's bytes are counted in that step (on 100 Mbit/s, up
    # to ~1 MB of a ring allreduce's last chunk was otherwise lost between two steps' readings).
    waited = time.perf_counter()
    drained = counters.wait_drained()
    before = counters.read_local(iface)
    waited = time.perf_counter() - waited
    start = time.perf_counter()
    record = contender.step(batch)
    seconds = time.perf_counter() - start
    at_return = counters.read_local(iface) - before  # the reading without waiting, for comparison
    drain_start = time.perf_counter()
    drained = counters.wait_drained() and drained
    wire = counters.read_local(iface) - before
    waited += time.perf_counter() - drain_start
    return {"step_s": seconds, "wire_sent": wire.sent, "wire_received": wire.received,
            "wire_sent_at_return": at_return.sent, "drained": drained, "drain_s": waited,
            **record}


def _cycle_time_ms() -> float | None:
    """The ``HOROVOD_CYCLE_TIME`` this rank ran under (``None``: Horovod's default, 1 ms)."""
    value = os.environ.get("HOROVOD_CYCLE_TIME")
    return float(value) if value else None


def _idle_rate(iface: str) -> float:
    _barrier()
    before = counters.read_local(iface)
    time.sleep(_IDLE_WINDOW_S)
    return (counters.read_local(iface) - before).sent / _IDLE_WINDOW_S


class _Progress:
    """Rank 0 writes how many steps are done, for the harness's progress bar."""

    def __init__(self, job_dir: pathlib.Path, rank: int, total: int):
        self.path = job_dir / "progress.json" if rank == 0 else None
        self.total, self.done = total, 0

    def advance(self, label: str) -> None:
        self.done += 1
        if self.path is not None:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"done": self.done, "total": self.total, "label": label}))
            os.replace(tmp, self.path)


def _build(job: dict, name: str, workload, rank_size: int):
    try:
        return contenders_module.build(name, workload.build_model(), lr=job["lr"],
                                       momentum=job["momentum"], num_ranks=rank_size,
                                       powersgd_start_iter=job["warmup_steps"])
    except Exception as error:
        raise ContenderFailed(name) from error


def run_speed(job: dict, rank: int, size: int, job_dir: pathlib.Path) -> dict:
    workload = workloads.get(job["workload"], job["seed"], num_ranks=size)
    names = job["contenders"]
    built = {name: _build(job, name, workload, size) for name in names}
    steps = job["rounds"] * job["steps_per_round"] + job["warmup_steps"]
    progress = _Progress(job_dir, rank, steps * len(names))
    idle = _idle_rate(job["iface"])
    records = []
    for round_index in range(job["rounds"]):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            contender = built[name]
            count = job["steps_per_round"] + (job["warmup_steps"] if round_index == 0 else 0)
            for _ in range(count):
                try:
                    record = _timed_step(contender, workload.batch(contender.steps_done, rank),
                                         job["iface"])
                except Exception as error:
                    raise ContenderFailed(name) from error
                record.update(contender=name, round=round_index,
                              warmup=contender.steps_done <= job["warmup_steps"])
                records.append(record)
                progress.advance(name)
    return {"idle_wire_bytes_per_s": idle, "numel": workload.numel,
            "horovod_cycle_time_ms": _cycle_time_ms(), "steps": records}


def run_convergence(job: dict, rank: int, size: int, job_dir: pathlib.Path) -> dict:
    workload = workloads.get(job["workload"], job["seed"], num_ranks=size,
                             batch_size=job["batch_size"])
    if workload.test_set is None:
        raise ValueError(f"workload {job['workload']!r} has no test set; convergence needs one")
    steps = job["epochs"] * workload.steps_per_epoch
    progress = _Progress(job_dir, rank, steps * len(job["contenders"]))
    results = {}
    for name in job["contenders"]:
        contender = _build(job, name, workload, size)
        wire_sent = payload_sent = 0
        for step in range(steps):
            try:
                record = _timed_step(contender, workload.batch(step, rank), job["iface"])
            except Exception as error:
                raise ContenderFailed(name) from error
            wire_sent += record["wire_sent"]
            payload_sent += record["payload_sent"]
            progress.advance(name)
        with torch.no_grad():
            images, labels = workload.test_set
            accuracy = float((contender.model.net(images).argmax(1) == labels).double().mean())
        results[name] = {"accuracy": accuracy, "steps": steps,
                         "wire_sent_per_step": wire_sent / steps,
                         "payload_sent_per_step": payload_sent / steps}
        del contender
    return {"numel": workload.numel, "convergence": results}


def main(job_dir: pathlib.Path) -> int:
    job = json.loads((job_dir / "job.json").read_text())
    # Gloo ranks get Horovod's variables; under mpirun, Open MPI's.
    rank = int(os.environ.get("HOROVOD_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", -1)))
    size = int(os.environ.get("HOROVOD_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", -1)))
    if os.environ["MASTER_ADDR"] not in job["hosts"]:  # second line of the address guard
        raise ValueError(f"MASTER_ADDR {os.environ['MASTER_ADDR']} is not a cluster host")
    torch.set_num_threads(1)
    torch.manual_seed(job["seed"])
    result_path = job_dir / f"result-{rank}.json"
    try:
        contenders_module.init_process_groups(os.environ["MASTER_ADDR"],
                                              int(os.environ["MASTER_PORT"]), rank, size,
                                              job["collective_timeout_s"],
                                              contenders_module.uses_horovod(job["contenders"]))
        run = run_speed if job["mode"] == "speed" else run_convergence
        result = {"ok": True, **run(job, rank, size, job_dir)}
        code = 0
    except ContenderFailed as failure:
        result = {"ok": False, "failed_contender": failure.name, "failed_at": time.time(),
                  "error": "".join(traceback.format_exception(failure.__cause__))}
        code = 1
    except Exception:  # noqa: BLE001 - every failure must reach the harness
        result = {"ok": False, "failed_contender": None, "failed_at": time.time(),
                  "error": traceback.format_exc()}
        code = 1
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, result_path)
    sys.stdout.flush()
    # Skip interpreter teardown: Horovod's and Gloo's threads can block it when a peer died.
    os._exit(code)


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
