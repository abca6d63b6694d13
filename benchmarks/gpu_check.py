"""CUDA check of the PyTorch engine: every algorithm x exchange on CUDA tensors against the same run
on CPU tensors, step by step.

    scripts/gpu_check.sh                       # on a machine with CUDA; elsewhere prints a skip
    .venv/bin/python benchmarks/gpu_check.py --device cpu        # the same comparison, CPU vs CPU
    .venv/bin/python benchmarks/gpu_check.py --device cpu --horovod   # + the horovodrun job (Gloo)

For each case (DoubleSqueeze, ErrorFeedback, NoFeedback and ServerFeedback with ScaledSign, TopK,
RandK and QSGD via ToContractive; a compressor per pass; over the sharded, allgather and, for linear
compressors, allreduce exchanges), each number of simulated ranks (``--ranks``, threads of one
process on :class:`horovod_squeeze.fake.FakeWorld`) and each gradient dtype (float32, float16,
bfloat16, float64: the engine then keeps float64 state), the :class:`~horovod_squeeze.torch.engine.SqueezeEngine` runs ``--steps`` steps twice on
the same gradients: on ``--device`` (rank r on ``cuda:(r mod device count)``) and on the CPU. Every
step's applied gradient and every state tensor of every rank must be bit-identical, or within a
relative 1e-6 of the CPU run (applied float16/bfloat16 gradients: one unit in the last place of
their dtype, as a float32 difference below 1e-6 may round either way), relative to the tensor's
largest magnitude. After every step every state tensor and applied gradient must live on the rank's
device, and applied gradients must have the gradient's dtype.

With more than one GPU and Horovod built with NCCL, a ``horovodrun`` job (one rank per GPU, at most
4) runs the engine over Horovod's collectives on CUDA tensors and compares each rank with the same
run on the fake world on CPU tensors, then trains a small model with ``DistributedOptimizer`` on
CUDA and checks that every rank holds the same parameters; otherwise it prints why it is skipped.
``--horovod`` runs that job whatever the device (with ``--device cpu``: over Gloo on CPU tensors).

Printed as a table; with ``--device cuda`` written to ``benchmarks/results/gpu_check.json`` (with
``--device cpu`` only where ``--output`` says). Exits 1 if any check fails, 0 when all pass or when
there is no CUDA device ("no CUDA device: skipped").
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

import horovod_squeeze as hs
from horovod_squeeze.fake import FakeWorld
from horovod_squeeze.exchange import make_exchange
from horovod_squeeze.plan import working_precision
from horovod_squeeze.torch.engine import SqueezeEngine

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "gpu_check.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
#: Relative tolerance of applied gradients per dtype (state is float32 for the low-precision
#: dtypes, float64 for float64: the engine's precision follows the wrappers' rule).
OUTPUT_TOLERANCE = {"float32": 1e-6, "float16": float(torch.finfo(torch.float16).eps),
                    "bfloat16": float(torch.finfo(torch.bfloat16).eps), "float64": 1e-6}
STATE_TOLERANCE = 1e-6

#: Registration order; sizes chosen so buckets split (see OPTIONS), shards need padding (1073 and
#: 4099 are odd) and the small tensors share the uncompressed bucket.
SHAPES = {"conv.weight": (16, 8, 3, 3), "conv.bias": (16,), "odd.weight": (37, 29),
          "fc.weight": (300, 20), "fc.bias": (300,), "head.weight": (4099,)}
#: Buckets of at most 5000 float32 entries, tensors under 1024 entries uncompressed, one warm-up
#: step (the uncompressed path, with state left at zero).
OPTIONS = {"bucket_cap_mb": 0.02, "min_compress_numel": 1024, "warmup_steps": 1}

_SCALES = {name: 10.0 ** -(i % 3) for i, name in enumerate(SHAPES)}


ALGORITHMS = (hs.DoubleSqueeze, hs.ErrorFeedback, hs.NoFeedback, hs.ServerFeedback)
#: What algorithms that update the model read as the optimizer's learning rate.
LEARNING_RATE = 0.25


def compressors():
    """The compressors every algorithm runs with, by short label."""
    return {"ScaledSign": hs.ScaledSign(), "TopK(0.05)": hs.TopK(0.05),
            "RandK(0.05)": hs.RandK(0.05, seed=7),
            "ToContractive(QSGD(4))": hs.ToContractive(hs.QSGD(4, seed=7))}


@dataclasses.dataclass(frozen=True)
class Case:
    label: str
    algorithm: hs.Algorithm
    exchange: str


def cases() -> list[Case]:
    """Every algorithm x compressor x exchange the exchange accepts, and a compressor per pass."""
    out = []
    for algorithm_cls in ALGORITHMS:
        for label, compressor in compressors().items():
            for exchange in ("sharded", "allgather", "allreduce"):
                algorithm = algorithm_cls(compressor)
                try:
                    make_exchange(exchange).check(algorithm)
                except ValueError:
                    continue
                out.append(Case(f"{algorithm_cls.__name__}({label})", algorithm, exchange))
    for label, algorithm in {
        "DoubleSqueeze(worker=TopK(0.05), server=ScaledSign)":
            hs.DoubleSqueeze(worker=hs.TopK(0.05), server=hs.ScaledSign()),
        "ErrorFeedback(ScaledSign, server=ScaledSign)":
            hs.ErrorFeedback(hs.ScaledSign(), server=hs.ScaledSign()),
        "NoFeedback(RandK(0.05), server=ScaledSign)":
            hs.NoFeedback(hs.RandK(0.05, seed=7), server=hs.ScaledSign()),
        "ServerFeedback(QSGD(4), server=ScaledSign)":
            hs.ServerFeedback(hs.QSGD(4, seed=7), server=hs.ScaledSign()),
        # Model increments (they read the engine's learning rate, LEARNING_RATE).
        "DORE(Ternary)": hs.DORE(hs.Ternary(seed=7)),
        "DoubleQuantization(b=4, b_x=8)": hs.DoubleQuantization(b=4, b_x=8, seed=7),
    }.items():
        for exchange in ("sharded", "allgather"):
            out.append(Case(label, algorithm, exchange))
    out.append(Case("NoFeedback(RandK(0.05), server=ScaledSign)",
                    hs.NoFeedback(hs.RandK(0.05, seed=7), server=hs.ScaledSign()), "allreduce"))
    return out


def gradient(name: str, rank: int, step: int, dtype: torch.dtype) -> torch.Tensor:
    """The same CPU tensor for the same (name, rank, step) in every run and process."""
    index = list(SHAPES).index(name)
    rng = np.random.default_rng([index, rank, step, 20240])
    values = rng.standard_normal(SHAPES[name]).astype(np.float32) * np.float32(_SCALES[name])
    return torch.from_numpy(values).to(dtype)


def device_of(device: str, rank: int) -> torch.device:
    """Rank ``rank``'s device: the CPU, or the rank's GPU (round robin over the visible ones)."""
    if device == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", rank % torch.cuda.device_count())


def run_rank(comm, case: Case, device: torch.device, dtype: torch.dtype, steps: int,
             options: dict = OPTIONS) -> dict:
    """One rank's engine for ``steps`` steps: per step the applied gradients (as float64 NumPy)
    and the state, and every placement problem seen."""
    engine = SqueezeEngine(case.algorithm, list(SHAPES.items()), collectives=comm, device=device,
                           exchange=case.exchange, learning_rate=lambda: LEARNING_RATE,
                           precision=working_precision([str(dtype)]), **options)
    problems, records = [], []

    def check_state(when):
        for bucket, tensors in engine.state.items():
            for name, tensor in tensors.items():
                if tensor.device != device:
                    problems.append(f"{when}: state[{bucket}][{name}] on {tensor.device}")

    check_state("built")
    for step in range(steps):
        for name in reversed(list(SHAPES)):  # as backward produces them
            engine.submit(name, gradient(name, comm.rank, step, dtype).to(device))
        applied = {}
        for name, shape in SHAPES.items():
            out = engine.result(name)
            if out.device != device:
                problems.append(f"step {step}: {name} applied on {out.device}")
            if out.dtype != dtype or tuple(out.shape) != shape:
                problems.append(f"step {step}: {name} applied as {out.dtype} {tuple(out.shape)}")
            applied[name] = out.detach().double().cpu().numpy()
        check_state(f"step {step}")
        records.append({"applied": applied,
                        "state": {b: {n: t.detach().cpu().numpy().copy() for n, t in s.items()}
                                  for b, s in engine.state.items()}})
    return {"records": records, "problems": problems,
            "state_names": sorted({n for s in engine.state.values() for n in s})}


def run_world(case: Case, size: int, device: str, dtype: torch.dtype, steps: int) -> list[dict]:
    return FakeWorld(size, timeout=120).run(
        lambda comm: run_rank(comm, case, device_of(device, comm.rank), dtype, steps))


@dataclasses.dataclass
class Difference:
    """The worst difference over a set of tensor pairs."""

    tensors: int = 0
    identical: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0
    worst: str = ""
    within: bool = True

    def add(self, where: str, got: np.ndarray, want: np.ndarray, tolerance: float) -> None:
        self.tensors += 1
        if got.shape != want.shape:
            self.within, self.worst, self.max_rel = False, f"{where}: shape {got.shape} != " \
                f"{want.shape}", float("inf")
            return
        if np.array_equal(got.view(np.uint32), want.view(np.uint32)):
            self.identical += 1
            return
        diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
        scale = max(float(np.max(np.abs(want))), float(np.finfo(np.float32).tiny))
        if np.all(np.isfinite(diff)):
            abs_ = float(diff.max())
            rel = abs_ / scale
        else:  # a NaN or infinity on one side only
            abs_ = rel = float("inf")
        if rel > self.max_rel or not self.worst:
            self.worst = f"{where}: max |diff| {abs_:.3g} (rel {rel:.3g})"
        self.max_abs, self.max_rel = max(self.max_abs, abs_), max(self.max_rel, rel)
        self.within = self.within and rel <= tolerance

    @property
    def verdict(self) -> str:
        if not self.within:
            return "FAIL"
        return "exact" if self.identical == self.tensors else "close"

    def summary(self) -> str:
        if self.verdict == "exact":
            return f"exact ({self.tensors})"
        return f"{self.verdict} {self.identical}/{self.tensors} exact, rel {self.max_rel:.1e}"


def compare(got: list[dict], want: list[dict], dtype_name: str) -> tuple[Difference, Difference]:
    """Applied gradients and state of every rank and step: ``got`` (device) against ``want``."""
    applied, state = Difference(), Difference()
    for rank, (mine, theirs) in enumerate(zip(got, want)):
        for step, (a, b) in enumerate(zip(mine["records"], theirs["records"])):
            for name in SHAPES:
                applied.add(f"rank {rank} step {step} {name}", a["applied"][name],
                            b["applied"][name], OUTPUT_TOLERANCE[dtype_name])
            for bucket, tensors in b["state"].items():
                for name, want_tensor in tensors.items():
                    got_tensor = a["state"].get(bucket, {}).get(name)
                    if got_tensor is None:
                        state.within, state.worst = False, f"state[{bucket}][{name}] missing"
                        continue
                    state.add(f"rank {rank} step {step} state[{bucket}][{name}]", got_tensor,
                              want_tensor, STATE_TOLERANCE)
    return applied, state


def vacuous(case: Case, got: list[dict]) -> list[str]:
    """Why agreement would prove little: no gradient applied, or state that never moved."""
    problems = []
    for rank, result in enumerate(got):
        last = result["records"][-1]
        if not any(np.any(a != 0) for a in last["applied"].values()):
            problems.append(f"rank {rank}: every applied gradient of the last step is zero")
        if case.algorithm.state() and not any(
                np.any(t != 0) for tensors in last["state"].values() for t in tensors.values()):
            problems.append(f"rank {rank}: the state is still zero after the last step")
    return problems


def run_case(case: Case, size: int, device: str, dtype_name: str, steps: int) -> dict:
    dtype = DTYPES[dtype_name]
    row = {"algorithm": case.label, "spec": repr(case.algorithm), "exchange": case.exchange,
           "ranks": size, "dtype": dtype_name, "steps": steps}
    try:
        start = time.perf_counter()
        got = run_world(case, size, device, dtype, steps)
        row["device_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        want = run_world(case, size, "cpu", dtype, steps)
        row["cpu_seconds"] = time.perf_counter() - start
    except Exception as error:  # noqa: BLE001 - a failing case is a row, not the end of the check
        row.update(passed=False, error=f"{type(error).__name__}: {error}",
                   traceback=traceback.format_exc(limit=6))
        return row
    applied, state = compare(got, want, dtype_name)
    problems = [f"rank {r}: {p}" for r, result in enumerate(got) for p in result["problems"]]
    problems += vacuous(case, got)
    row.update(
        state_names=got[0]["state_names"],
        applied={"verdict": applied.verdict, "tensors": applied.tensors,
                 "identical": applied.identical, "max_abs": applied.max_abs,
                 "max_rel": applied.max_rel, "worst": applied.worst,
                 "summary": applied.summary()},
        state={"verdict": state.verdict, "tensors": state.tensors, "identical": state.identical,
               "max_abs": state.max_abs, "max_rel": state.max_rel, "worst": state.worst,
               "summary": state.summary()},
        placement_problems=problems[:10],
        passed=applied.within and state.within and not problems)
    return row


# --- the horovodrun job ---------------------------------------------------------------------------


def horovod_plan(device: str, forced: bool) -> tuple[bool, str]:
    """Whether the horovodrun job runs, and why (not)."""
    try:
        import horovod.torch as hvd
    except ImportError as error:
        return False, f"horovod.torch does not import ({error})"
    if shutil.which("horovodrun", path=f"{pathlib.Path(sys.executable).parent}{os.pathsep}"
                    f"{os.environ.get('PATH', '')}") is None:
        return False, "horovodrun not found"
    if forced:
        return True, "--horovod"
    if device == "cpu":
        return False, "--device cpu (pass --horovod to run the job over Gloo on CPU tensors)"
    if not hvd.nccl_built():
        return False, "Horovod is built without NCCL (HOROVOD_GPU_OPERATIONS=NCCL)"
    if torch.cuda.device_count() < 2:
        return False, f"{torch.cuda.device_count()} CUDA device: a job needs one GPU per rank"
    return True, f"{torch.cuda.device_count()} GPUs, Horovod built with NCCL"


def horovod_cases() -> list[Case]:
    every = {(c.label, c.exchange): c for c in cases()}
    return [every[key] for key in [
        ("DoubleSqueeze(ScaledSign)", "sharded"), ("DoubleSqueeze(ScaledSign)", "allgather"),
        ("DoubleSqueeze(TopK(0.05))", "sharded"), ("DoubleSqueeze(RandK(0.05))", "allreduce"),
        ("ErrorFeedback(ScaledSign)", "sharded"), ("NoFeedback(ToContractive(QSGD(4)))", "sharded"),
        ("DoubleSqueeze(worker=TopK(0.05), server=ScaledSign)", "sharded"),
        ("ServerFeedback(QSGD(4), server=ScaledSign)", "sharded")]]


def run_horovod_job(device: str, steps: int, timeout: float) -> dict:
    """The horovodrun job from the parent: its ranks' rows, or what went wrong."""
    ranks = 2 if device == "cpu" else min(torch.cuda.device_count(), 4)
    runner = pathlib.Path(sys.executable).parent / "horovodrun"
    runner = str(runner) if runner.exists() else "horovodrun"
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "horovod.json"
        command = [runner, "-np", str(ranks), "-H", f"localhost:{ranks}",
                   *(["--gloo"] if device == "cpu" else []), sys.executable, __file__,
                   "--horovod-worker", "--device", device, "--steps", str(steps),
                   "--output", str(out)]
        start = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
        except subprocess.TimeoutExpired:
            return {"ran": True, "passed": False, "ranks": ranks,
                    "error": f"horovodrun did not finish in {timeout:.0f} s"}
        result = {"ran": True, "ranks": ranks, "command": " ".join(command[:7]) + " ...",
                  "seconds": time.perf_counter() - start}
        if done.returncode != 0 or not out.exists():
            tail = (done.stdout + done.stderr)[-3000:]
            return {**result, "passed": False, "error": f"exit {done.returncode}", "log": tail}
        return {**result, **json.loads(out.read_text())}


def horovod_worker(args) -> None:
    """One rank of the horovodrun job."""
    import horovod.torch as hvd

    from horovod_squeeze.torch.collectives import HorovodCollectives
    import horovod_squeeze.torch as hst

    hvd.init()
    torch.set_num_threads(1)
    if args.device == "cpu":
        device = torch.device("cpu")
    else:
        torch.cuda.set_device(hvd.local_rank())
        device = torch.device("cuda", hvd.local_rank())
    rows = []
    plan = [(case, "float32") for case in horovod_cases()] + [
        (horovod_cases()[0], "float16"), (horovod_cases()[0], "bfloat16")]
    for case, dtype_name in plan:
        dtype = DTYPES[dtype_name]
        row = {"algorithm": case.label, "exchange": case.exchange, "ranks": hvd.size(),
               "dtype": dtype_name, "steps": args.steps}
        try:
            mine = run_rank(HorovodCollectives(), case, device, dtype, args.steps)
            # The same world on CPU tensors in this process; this rank's part of it.
            want = FakeWorld(hvd.size(), timeout=120).run(
                lambda comm: run_rank(comm, case, torch.device("cpu"), dtype, args.steps))
            applied, state = compare([mine], [want[hvd.rank()]], dtype_name)
            row.update(applied=applied.summary(), state=state.summary(),
                       worst=applied.worst or state.worst, problems=mine["problems"][:10],
                       passed=applied.within and state.within and not mine["problems"])
        except Exception as error:  # noqa: BLE001 - reported per rank
            row.update(passed=False, error=f"{type(error).__name__}: {error}")
        rows.append(row)

    # A few training steps through DistributedOptimizer: every rank must hold the same parameters.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(),
                                torch.nn.Linear(48, 10)).to(device)
    optimizer = hst.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05), named_parameters=model.named_parameters(),
        compression=hs.DoubleSqueeze(hs.ScaledSign()), min_compress_numel=0)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    generator = torch.Generator().manual_seed(hvd.rank())
    for _ in range(3):
        x = torch.randn(16, 64, generator=generator).to(device)
        y = torch.randint(0, 10, (16,), generator=generator).to(device)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu()
    gathered = hvd.allgather(flat[None], name="gpu_check.params")
    engine = optimizer.squeeze_engine
    misplaced = [f"state[{b}][{n}] on {t.device}" for b, s in engine.state.items()
                 for n, t in s.items() if t.device != device]
    same = all(torch.equal(gathered[0], gathered[r]) for r in range(hvd.size()))
    training = {"algorithm": "DoubleSqueeze(ScaledSign())", "spec": repr(engine.algorithm),
                "steps": 3, "ranks_agree": same,
                "misplaced_state": misplaced, "bytes_sent": engine.last_stats.bytes.sent,
                "passed": same and not misplaced}

    every = hvd.allgather_object({"rank": hvd.rank(), "rows": rows, "training": training})
    if hvd.rank() == 0:
        passed = all(r["passed"] for part in every for r in part["rows"]) and all(
            part["training"]["passed"] for part in every)
        pathlib.Path(args.output).write_text(json.dumps(
            {"device": str(device), "passed": passed, "ranks_results": every}, indent=1))


# --- the report -----------------------------------------------------------------------------------


def environment(device: str) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "machine": platform.machine()}
    try:
        import horovod
        import horovod.torch as hvd

        info["horovod"] = {"version": horovod.__version__, "nccl_built": bool(hvd.nccl_built()),
                           "gloo_built": bool(hvd.gloo_built()), "mpi_built": bool(hvd.mpi_built())}
    except ImportError as error:
        info["horovod"] = f"does not import: {error}"
    if device != "cpu":
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def print_table(rows: list[dict]) -> None:
    header = (f"{'algorithm':<52} {'exchange':<9} {'n':>2} {'dtype':<8} {'applied':<34} "
              f"{'state':<34} {'ok':<4}")
    print(header)
    print("-" * len(header))
    for row in rows:
        if "error" in row:
            applied, state = f"ERROR {row['error']}"[:34], ""
        else:
            applied, state = row["applied"]["summary"], row["state"]["summary"]
        print(f"{row['algorithm']:<52} {row['exchange']:<9} {row['ranks']:>2} {row['dtype']:<8} "
              f"{applied:<34} {state:<34} {'yes' if row['passed'] else 'NO':<4}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="where the checked run's tensors live (cpu: the same comparison, CPU "
                        "against CPU, to check the check)")
    parser.add_argument("--ranks", default="2,4", help="simulated ranks, comma-separated")
    parser.add_argument("--steps", type=int, default=4,
                        help="steps per run (the first uncompressed)")
    parser.add_argument("--dtypes", default=",".join(DTYPES),
                        help="gradient dtypes, comma-separated")
    parser.add_argument("--filter", default="",
                        help="only cases whose algorithm label contains this")
    parser.add_argument("--horovod", action=argparse.BooleanOptionalAction, default=None,
                        help="run the horovodrun job (default: with more than one GPU and NCCL)")
    parser.add_argument("--horovod-timeout", type=float, default=600.0)
    parser.add_argument("--output", type=pathlib.Path, default=None,
                        help=f"JSON results (default with --device cuda: {RESULTS})")
    parser.add_argument("--horovod-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: skipped")
        return 0
    if args.horovod_worker:
        horovod_worker(args)
        return 0
    sizes = [int(s) for s in args.ranks.split(",")]
    dtypes = args.dtypes.split(",")
    unknown = set(dtypes) - set(DTYPES)
    if unknown:
        parser.error(f"--dtypes: unknown {sorted(unknown)}; choose from {list(DTYPES)}")
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is the uncompressed warm-up)")
    torch.set_num_threads(1)

    chosen = [c for c in cases() if args.filter in c.label]
    where = ("cpu (checking the check: CPU against CPU)" if args.device == "cpu" else
             ", ".join(f"cuda:{i} {torch.cuda.get_device_name(i)}"
                       for i in range(torch.cuda.device_count())))
    print(f"gpu_check: {len(chosen)} cases x ranks {sizes} x {dtypes}, {args.steps} steps, "
          f"checked device: {where}; reference: cpu")
    started = time.perf_counter()
    rows = []
    print()
    for dtype_name in dtypes:
        for size in sizes:
            for case in chosen:
                rows.append(run_case(case, size, args.device, dtype_name, args.steps))
    print_table(rows)

    run_job, why = (horovod_plan(args.device, bool(args.horovod)) if args.horovod is not False
                    else (False, "--no-horovod"))
    if run_job:
        print(f"\nhorovodrun job ({why}) ...", flush=True)
        job = run_horovod_job(args.device, args.steps, args.horovod_timeout)
        for part in job.get("ranks_results", []):
            for row in part["rows"]:
                detail = row.get("error") or f"applied {row['applied']}, state {row['state']}"
                print(f"  rank {part['rank']}: {row['algorithm']:<52} {row['exchange']:<9} "
                      f"{row['dtype']:<8} {detail} {'ok' if row['passed'] else 'FAILED'}")
            t = part["training"]
            print(f"  rank {part['rank']}: DistributedOptimizer, {t['algorithm']}, 3 steps: "
                  f"ranks agree {t['ranks_agree']}, state misplaced {len(t['misplaced_state'])} "
                  f"{'ok' if t['passed'] else 'FAILED'}")
        if "error" in job:
            print(f"  horovodrun job failed: {job['error']}\n{job.get('log', '')}")
        print(f"horovodrun job: {'passed' if job.get('passed') else 'FAILED'}")
    else:
        job = {"ran": False, "skipped": why}
        print(f"\nhorovodrun job skipped: {why}")

    failed = [r for r in rows if not r["passed"]]
    passed = not failed and (job.get("passed", True) if job.get("ran") else True)
    for row in failed[:20]:
        detail = row.get("error") or "; ".join(
            filter(None, [row["applied"]["worst"] if row["applied"]["verdict"] == "FAIL" else "",
                          row["state"]["worst"] if row["state"]["verdict"] == "FAIL" else "",
                          *row["placement_problems"][:3]]))
        print(f"FAILED {row['algorithm']} {row['exchange']} n={row['ranks']} {row['dtype']}: "
              f"{detail}")
    exact = sum(1 for r in rows if r["passed"] and r["applied"]["verdict"] == "exact"
                and r["state"]["verdict"] == "exact")
    print(f"\n{len(rows) - len(failed)}/{len(rows)} runs passed ({exact} bit-identical), "
          f"{time.perf_counter() - started:.0f} s: {'PASSED' if passed else 'FAILED'}")

    output = args.output or (RESULTS if args.device == "cuda" else None)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps({
            "benchmark": "gpu_check",
            "command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None
                                                                     else argv),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "checked_device": args.device, "environment": environment(args.device),
            "tolerance": {"state": STATE_TOLERANCE, "applied": OUTPUT_TOLERANCE,
                          "relative_to": "the CPU tensor's largest magnitude"},
            "shapes": {k: list(v) for k, v in SHAPES.items()}, "options": OPTIONS,
            "passed": passed, "runs": rows, "horovod_job": job}, indent=1))
        print(f"wrote {output}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
