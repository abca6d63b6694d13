"""Run a Python function on N Horovod ranks and collect what each rank returns.

The launcher is ``horovodrun`` itself (Gloo or MPI controller), so a test exercises exactly what a
user runs. Unlike ``horovod.run``, a rank that raises or hangs becomes an exception in the caller,
never a hang:

- a rank that raises: its traceback is written next to the job and re-raised here as
  :class:`RankFailed`, naming the rank; the other ranks are stopped after a short grace period;
- a rank that does not finish within ``timeout``: every rank dumps its Python stack shortly before
  the deadline (``faulthandler``), the job is killed, and :class:`RankTimeout` reports the ranks
  that did not finish with the stacks they were stuck in.

Example::

    from horovod_squeeze.testing import run_on_ranks

    def body(scale):
        import horovod.torch as hvd, torch
        hvd.init()
        return hvd.allreduce(torch.ones(3) * scale * hvd.rank(), op=hvd.Sum).tolist()

    results = run_on_ranks(body, num_proc=2, controller="gloo", args=(2.0,))
    assert results == [[2.0, 2.0, 2.0]] * 2

The function is pickled with cloudpickle; functions defined in an importable module (a test file
whose directory is on ``sys.path``) are pickled by reference, so their module is importable in
every rank through the parent's ``sys.path``, which is passed on.
"""
from __future__ import annotations

import dataclasses
import faulthandler
import json
import os
import pathlib
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Sequence

import cloudpickle

__all__ = ["run_on_ranks", "RankFailed", "RankTimeout", "CONTROLLERS", "rank_environment"]

CONTROLLERS = ("gloo", "mpi")

# Ranks must stop soon after one of them fails: collectives would otherwise wait forever.
_FAILURE_GRACE_S = 5.0
# Stacks are dumped this long before the deadline, so the report shows where a rank hung.
_STACK_DUMP_LEAD_S = 3.0
_POLL_S = 0.05
_OUTPUT_TAIL_CHARS = 4000


class RankFailed(AssertionError):
    """A rank raised; the message holds its rank number and traceback."""


class RankTimeout(AssertionError):
    """Some ranks did not finish in time; the message holds their last Python stacks."""


def rank_environment() -> dict[str, str]:
    """Environment for rank processes: one compute thread each and quiet, legacy-Keras TensorFlow."""
    return {
        "TF_USE_LEGACY_KERAS": "1",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONFAULTHANDLER": "1",
    }


def _horovodrun() -> str:
    exe = shutil.which("horovodrun", path=os.path.dirname(sys.executable) + os.pathsep
                       + os.environ.get("PATH", ""))
    if exe is None:
        raise RuntimeError("horovodrun not found next to this Python or on PATH; "
                           "run scripts/setup.sh to install Horovod")
    return exe


def _own_rank() -> int:
    for name in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if name in os.environ:
            return int(os.environ[name])
    raise RuntimeError("not started by horovodrun: no HOROVOD_RANK or OMPI_COMM_WORLD_RANK")


def _result_path(job_dir: pathlib.Path, rank: int) -> pathlib.Path:
    return job_dir / f"result-{rank}.pkl"


def _stack_path(job_dir: pathlib.Path, rank: int) -> pathlib.Path:
    return job_dir / f"stack-{rank}.txt"


def run_on_ranks(fn: Callable[..., Any], num_proc: int, controller: str = "gloo", *,
                 args: Sequence[Any] = (), kwargs: dict | None = None, timeout: float = 120.0,
                 env: dict[str, str] | None = None) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``num_proc`` ranks under ``horovodrun``; return rank-ordered results.

    Args:
      fn: picklable callable; it calls ``hvd.init()`` itself, for whichever framework it uses.
      num_proc: number of ranks (Horovod only runs its collectives' hooks with 2 or more).
      controller: ``"gloo"`` or ``"mpi"``.
      timeout: seconds for the whole job, start-up included.
      env: extra environment variables for the ranks.

    Raises:
      RankFailed: a rank raised (its traceback is in the message) or the launcher failed.
      RankTimeout: a rank did not finish within ``timeout`` (its stack is in the message).
    """
    if controller not in CONTROLLERS:
        raise ValueError(f"controller must be one of {CONTROLLERS}, got {controller!r}")
    if num_proc < 1:
        raise ValueError(f"num_proc must be >= 1, got {num_proc}")
    if timeout <= _STACK_DUMP_LEAD_S:
        raise ValueError(f"timeout must exceed {_STACK_DUMP_LEAD_S} s, got {timeout}")

    job_dir = pathlib.Path(tempfile.mkdtemp(prefix="hvd-squeeze-job-"))
    try:
        deadline = time.monotonic() + timeout
        (job_dir / "job.json").write_text(json.dumps({
            "sys_path": sys.path, "stack_dump_at": time.time() + timeout - _STACK_DUMP_LEAD_S}))
        with open(job_dir / "job.pkl", "wb") as f:
            cloudpickle.dump((fn, tuple(args), dict(kwargs or {})), f)
        command = [_horovodrun(), "-np", str(num_proc), "-H", f"localhost:{num_proc}",
                   f"--{controller}", sys.executable, "-m", "horovod_squeeze.testing", str(job_dir)]
        rank_env = {**os.environ, **rank_environment(), **(env or {})}
        with open(job_dir / "output.log", "wb") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=rank_env,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                return _collect(proc, job_dir, num_proc, deadline, timeout)
            finally:
                _kill_group(proc)
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)


def _collect(proc: subprocess.Popen, job_dir: pathlib.Path, num_proc: int, deadline: float,
             timeout: float) -> list[Any]:
    failed_since: float | None = None
    while True:
        outcomes = _read_outcomes(job_dir, num_proc)
        errors = {r: o for r, o in outcomes.items() if o.failed}
        if errors and failed_since is None:
            failed_since = time.monotonic()
        launcher_done = proc.poll() is not None
        all_reported = len(outcomes) == num_proc
        if errors and (all_reported or launcher_done
                       or time.monotonic() - failed_since > _FAILURE_GRACE_S):
            # The first failure is the cause; the others are usually Horovod shutting down.
            first = min(errors, key=lambda r: errors[r].finished_at)
            others = "".join(f"\n--- rank {r} also raised ---\n{errors[r].value}"
                             for r in sorted(errors) if r != first)
            raise RankFailed(f"rank {first} of {num_proc} raised:\n{errors[first].value}{others}")
        if all_reported and not errors:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            return [outcomes[r].value for r in range(num_proc)]
        if launcher_done:
            # Give slow result files a last chance, then blame the launcher or missing ranks.
            outcomes = _read_outcomes(job_dir, num_proc)
            if len(outcomes) == num_proc:
                continue
            missing = sorted(set(range(num_proc)) - set(outcomes))
            raise RankFailed(f"horovodrun exited with code {proc.returncode} before ranks "
                             f"{missing} reported a result\n--- output ---\n{_output_tail(job_dir)}")
        if time.monotonic() > deadline:
            missing = sorted(set(range(num_proc)) - set(outcomes))
            _kill_group(proc)
            stacks = "\n".join(f"--- rank {r} stack ---\n{_read_text(_stack_path(job_dir, r))}"
                               for r in missing)
            raise RankTimeout(f"ranks {missing} of {num_proc} did not finish within {timeout} s\n"
                              f"{stacks}\n--- output ---\n{_output_tail(job_dir)}")
        time.sleep(_POLL_S)


@dataclasses.dataclass
class _Outcome:
    failed: bool
    value: Any  # the return value, or the formatted traceback when failed
    finished_at: float


def _read_outcomes(job_dir: pathlib.Path, num_proc: int) -> dict[int, _Outcome]:
    outcomes = {}
    for rank in range(num_proc):
        path = _result_path(job_dir, rank)
        if path.exists():
            with open(path, "rb") as f:
                outcomes[rank] = pickle.load(f)
    return outcomes


def _read_text(path: pathlib.Path) -> str:
    try:
        return path.read_text(errors="replace").strip() or "(empty)"
    except FileNotFoundError:
        return "(no stack dumped: the rank may not have started)"


def _output_tail(job_dir: pathlib.Path) -> str:
    text = _read_text(job_dir / "output.log")
    return text[-_OUTPUT_TAIL_CHARS:]


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _rank_main(job_dir: pathlib.Path) -> int:
    """Entry point inside each rank: run the job and write its :class:`_Outcome`."""
    rank = _own_rank()
    meta = json.loads((job_dir / "job.json").read_text())
    stack_file = open(_stack_path(job_dir, rank), "w")
    faulthandler.dump_traceback_later(max(meta["stack_dump_at"] - time.time(), 0.1),
                                      file=stack_file)
    try:
        # Unpickling may import the test's module, so the parent's sys.path comes first.
        sys.path[:0] = meta["sys_path"]
        with open(job_dir / "job.pkl", "rb") as f:
            fn, args, kwargs = pickle.load(f)
        outcome = _Outcome(False, fn(*args, **kwargs), time.time())
        code = 0
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        outcome = _Outcome(True, traceback.format_exc(), time.time())
        code = 1
    faulthandler.cancel_dump_traceback_later()
    tmp = _result_path(job_dir, rank).with_suffix(".tmp")
    with open(tmp, "wb") as f:
        try:
            cloudpickle.dump(outcome, f)
        except Exception:  # noqa: BLE001 - an unpicklable result is reported, not lost
            f.seek(0)
            f.truncate()
            cloudpickle.dump(_Outcome(True, f"result of rank {rank} is not picklable:\n"
                                            f"{traceback.format_exc()}", time.time()), f)
            code = 1
    os.replace(tmp, _result_path(job_dir, rank))
    return code


if __name__ == "__main__":
    # Import by module name so that pickled outcomes reference horovod_squeeze.testing, not __main__.
    from horovod_squeeze.testing import _rank_main as rank_main

    sys.exit(rank_main(pathlib.Path(sys.argv[1])))
