"""Starting a job on the cluster without ssh, under Horovod's Gloo or MPI controller.

Gloo: a rendezvous server in host 0, and each rank is ``ip netns exec HOST python -m
benchmarks.cluster.rank JOB_DIR`` with the variables ``horovodrun``'s Gloo launcher would set
(``horovod/runner/gloo_run.py``). MPI: ``mpirun`` in host 0, which starts the other hosts' daemons
through ``mpi_agent.sh`` (``ip netns exec`` in place of ssh) and keeps its traffic on ``eth0``.
Either way ``MASTER_ADDR`` / ``MASTER_PORT`` serve ``torch.distributed``. Every address handed to a rank passes the cluster's
guard. A job is bounded in time; a rank that fails or hangs stops the whole job, and every process
started here is killed before :func:`run_job` returns.
"""
from __future__ import annotations

import json
import os
import pathlib
import select
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable

from benchmarks.cluster.namespaces import Cluster

__all__ = ["CONTROLLERS", "JobFailed", "horovod_tuning", "run_job"]

REPO = pathlib.Path(__file__).resolve().parents[2]
CONTROLLERS = ("gloo", "mpi")
MPI_AGENT = pathlib.Path(__file__).resolve().with_name("mpi_agent.sh")
# torch.distributed's store on rank 0's host (a namespace of its own, so the port is always free).
MASTER_PORT = 29500
_FAILURE_GRACE_S = 10.0
_POLL_S = 0.2
_LOG_TAIL_CHARS = 3000


class JobFailed(RuntimeError):
    """A job did not complete; ``contender`` names the contender that raised, if one did."""

    def __init__(self, message: str, contender: str | None = None):
        super().__init__(message)
        self.contender = contender


def horovod_tuning(cycle_time_ms: float | None) -> dict[str, str]:
    """Horovod's tunables for every rank of a job, the same for every contender.

    ``cycle_time_ms``: ``HOROVOD_CYCLE_TIME``, how long Horovod's background thread sleeps between
    negotiation rounds (``None``: Horovod's default, 1 ms). Each round sends a small message to
    the coordinator even when no tensor is pending, so the round rate sets Horovod's idle traffic.
    """
    if cycle_time_ms is None:
        return {}
    if not cycle_time_ms > 0:
        raise ValueError(f"cycle_time_ms must be positive, got {cycle_time_ms!r}")
    return {"HOROVOD_CYCLE_TIME": f"{cycle_time_ms:g}"}


def _rank_env(made: Cluster, rank: int, rendezvous_port: int,
              tuning: dict[str, str] | None = None) -> dict[str, str]:
    host = made.hosts[rank]
    size = len(made.hosts)
    return {
        **{k: v for k, v in os.environ.items() if k != "HOROVOD_CYCLE_TIME"},
        **(tuning or {}),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "HOROVOD_GLOO_RENDEZVOUS_ADDR": made.require_member(made.hosts[0].address),
        "HOROVOD_GLOO_RENDEZVOUS_PORT": str(rendezvous_port),
        "HOROVOD_CONTROLLER": "gloo", "HOROVOD_CPU_OPERATIONS": "gloo",
        "HOROVOD_GLOO_IFACE": host.iface,
        "HOROVOD_HOSTNAME": made.require_member(host.address),
        "HOROVOD_RANK": str(rank), "HOROVOD_SIZE": str(size),
        "HOROVOD_LOCAL_RANK": "0", "HOROVOD_LOCAL_SIZE": "1",
        "HOROVOD_CROSS_RANK": str(rank), "HOROVOD_CROSS_SIZE": str(size),
        "MASTER_ADDR": made.require_member(made.hosts[0].address),
        "MASTER_PORT": str(MASTER_PORT),
    }


def _start_rendezvous(made: Cluster, deadline: float) -> tuple[subprocess.Popen, int]:
    addresses = [made.require_member(host.address) for host in made.hosts]
    server = subprocess.Popen(
        ["ip", "netns", "exec", made.hosts[0].namespace, sys.executable, "-m",
         "benchmarks.cluster.rendezvous", *addresses],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    # The server prints its port once listening; wait for it no longer than the job may take.
    ready, _, _ = select.select([server.stdout], [], [], max(0.0, deadline - time.monotonic()))
    line = server.stdout.readline() if ready else ""
    if not line.strip().isdigit():
        _stop(server)
        raise JobFailed(f"the rendezvous server did not start (it printed {line!r})")
    return server, int(line)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _tail(path: pathlib.Path) -> str:
    try:
        return path.read_text(errors="replace")[-_LOG_TAIL_CHARS:]
    except FileNotFoundError:
        return "(no output)"


def _mpi_env(made: Cluster, hosts_file: pathlib.Path,
             tuning: dict[str, str] | None = None) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if k != "HOROVOD_CYCLE_TIME"},
        **(tuning or {}),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "HOROVOD_CONTROLLER": "mpi", "HOROVOD_CPU_OPERATIONS": "mpi",
        "MASTER_ADDR": made.require_member(made.hosts[0].address),
        "MASTER_PORT": str(MASTER_PORT),
        "HSQ_MPI_HOSTS": str(hosts_file),
    }


def _start_mpirun(made: Cluster, job_dir: pathlib.Path, log: pathlib.Path,
                  tuning: dict[str, str] | None = None) -> subprocess.Popen:
    """``mpirun`` inside host 0, starting the other hosts' ranks through :data:`MPI_AGENT`."""
    hosts_file = job_dir / "mpi_hosts"
    hosts_file.write_text("".join(f"{made.require_member(host.address)} {host.namespace}\n"
                                  for host in made.hosts))
    env = _mpi_env(made, hosts_file, tuning)
    exported = [arg for name in ("PYTHONPATH", "TF_USE_LEGACY_KERAS", "TF_CPP_MIN_LOG_LEVEL",
                                 "OMP_NUM_THREADS", "PYTHONUNBUFFERED", "HOROVOD_CONTROLLER",
                                 "HOROVOD_CPU_OPERATIONS", "MASTER_ADDR", "MASTER_PORT",
                                 *sorted(tuning or {}))
                for arg in ("-x", name)]
    iface = made.hosts[0].iface
    command = ["ip", "netns", "exec", made.hosts[0].namespace, "mpirun", "--allow-run-as-root",
               "-np", str(len(made.hosts)),
               "-H", ",".join(f"{host.address}:1" for host in made.hosts),
               "--mca", "plm_rsh_agent", str(MPI_AGENT), "--mca", "btl", "self,tcp",
               # Daemons talk to mpirun directly: with the default tree routing one launch in
               # three failed ("ORTE does not know how to route a message to the daemon").
               "--mca", "routed", "direct",
               # One slot per host, so Open MPI thinks no node oversubscribed and its waiting
               # ranks spin; here they share 2 cores with the ranks that compute.
               "--mca", "mpi_yield_when_idle", "1",
               "--mca", "btl_tcp_if_include", iface, "--mca", "oob_tcp_if_include", iface,
               "--tag-output", *exported,
               sys.executable, "-m", "benchmarks.cluster.rank", str(job_dir)]
    with open(log, "wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=REPO, env=env,
                                start_new_session=True)


def run_job(made: Cluster, job: dict, timeout_s: float,
            on_progress: Callable[[dict], None] | None = None,
            controller: str = "gloo", cycle_time_ms: float | None = None) -> list[dict]:
    """Runs ``job`` (see :mod:`benchmarks.cluster.rank`) on every host; returns rank-ordered results.

    ``controller`` is Horovod's: ``"gloo"`` (a rendezvous server and one ``ip netns exec`` per
    rank) or ``"mpi"`` (``mpirun`` in host 0, the other ranks started through
    ``mpi_agent.sh`` instead of ssh). ``torch.distributed`` always uses its own TCP store.
    ``cycle_time_ms`` is Horovod's cycle time for every rank (see :func:`horovod_tuning`).

    Raises:
      JobFailed: a rank failed (naming the contender if one raised) or the job ran past
        ``timeout_s``; the message holds the failing rank's output.
    """
    if controller not in CONTROLLERS:
        raise ValueError(f"controller must be one of {CONTROLLERS}, got {controller!r}")
    tuning = horovod_tuning(cycle_time_ms)
    deadline = time.monotonic() + timeout_s
    job = {**job, "hosts": [host.address for host in made.hosts], "iface": made.hosts[0].iface}
    size = len(made.hosts)
    with tempfile.TemporaryDirectory(prefix="hsq-job-") as tmp:
        job_dir = pathlib.Path(tmp)
        (job_dir / "job.json").write_text(json.dumps(job))
        started: list[subprocess.Popen] = []
        try:
            if controller == "mpi":
                logs = [job_dir / "output-mpirun.log"] * size
                started.append(_start_mpirun(made, job_dir, logs[0], tuning))
                launchers = started[:]
            else:
                server, port = _start_rendezvous(made, deadline)
                started.append(server)
                logs = [job_dir / f"output-{rank}.log" for rank in range(size)]
                for rank, host in enumerate(made.hosts):
                    with open(logs[rank], "wb") as log:
                        started.append(subprocess.Popen(
                            ["ip", "netns", "exec", host.namespace, sys.executable, "-m",
                             "benchmarks.cluster.rank", str(job_dir)],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            cwd=REPO, env=_rank_env(made, rank, port, tuning), start_new_session=True))
                launchers = started[1:]
            return _collect(job_dir, size, launchers, logs, deadline, timeout_s, on_progress)
        finally:
            for process in reversed(started):
                _stop(process)


def _collect(job_dir: pathlib.Path, size: int, launchers: list[subprocess.Popen],
             logs: list[pathlib.Path], deadline: float, timeout_s: float,
             on_progress: Callable[[dict], None] | None) -> list[dict]:
    failed_since: float | None = None
    while True:
        if on_progress is not None and (job_dir / "progress.json").exists():
            try:
                on_progress(json.loads((job_dir / "progress.json").read_text()))
            except json.JSONDecodeError:
                pass
        results = {rank: json.loads(path.read_text()) for rank in range(size)
                   if (path := job_dir / f"result-{rank}.json").exists()}
        failures = {rank: r for rank, r in results.items() if not r["ok"]}
        exited_badly = [index for index, p in enumerate(launchers) if p.poll() not in (None, 0)]
        if len(results) == size and not failures:
            return [results[rank] for rank in range(size)]
        if (failures or exited_badly) and failed_since is None:
            failed_since = time.monotonic()
        if failed_since is not None and (
                len(results) == size or time.monotonic() - failed_since > _FAILURE_GRACE_S):
            if failures:
                # The first rank to fail holds the cause; the others mostly saw a peer vanish.
                rank = min(failures, key=lambda r: failures[r]["failed_at"])
                others = "".join(f"\n--- rank {r} also failed: "
                                 f"{_last_line(failures[r]['error'])}"
                                 for r in sorted(failures) if r != rank)
                # A rank that died without a result (e.g. a C++ abort) may hold the real cause.
                others += "".join(f"\n--- rank {r} ended without a result; its output ends:\n"
                                  f"{_tail(logs[r])[-1500:]}"
                                  for r in range(size) if r not in results)
                raise JobFailed(f"rank {rank} failed first:\n{failures[rank]['error']}{others}",
                                failures[rank]["failed_contender"])
            index = exited_badly[0]
            name = "mpirun" if len(launchers) < size else f"rank {index}"
            raise JobFailed(f"{name} exited with code {launchers[index].returncode}:\n"
                            f"{_tail(logs[index])}")
        if time.monotonic() > deadline:
            missing = [rank for rank in range(size) if rank not in results]
            raise JobFailed(f"ranks {missing} did not finish within {timeout_s:.0f} s; rank "
                            f"{missing[0]} output:\n{_tail(logs[missing[0]])}")
        time.sleep(_POLL_S)
