"""Compress + decompress throughput of every compressor, per framework, on one CPU core.

    .venv/bin/python benchmarks/compressor_throughput.py            # sizes 1e3 .. 1e7
    .venv/bin/python benchmarks/compressor_throughput.py --quick    # sizes 1e3 .. 1e5

Throughput is GB/s of float32 input (4 bytes per entry) through one ``compress`` and one
``decompress``, best of ``--repeats`` timed runs after a warm-up. PyTorch runs twice: with the
default allocator, where every fresh 40 MB output of a 1e7-entry tensor is paid in page faults, and
with PyTorch's transparent-huge-page allocation (``THP_MEM_ALLOC_ENABLE=1``). Results are printed as
a table and written to ``benchmarks/results/compressor_throughput.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

import horovod_squeeze as hs  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results" / "compressor_throughput.json"

SPECS = {
    "FP16": hs.FP16(),
    "ScaledSign": hs.ScaledSign(),
    "ScaledSign(block=4096)": hs.ScaledSign(block_size=4096),
    "TopK(0.01, sampled)": hs.TopK(0.01, method="sampled"),
    "TopK(0.01, exact)": hs.TopK(0.01),
    "RandK(0.01)": hs.RandK(0.01),
    "QSGD(4)": hs.QSGD(4),
    "Ternary": hs.Ternary(),
    "Natural": hs.Natural(),
}


# Each configuration runs in its own process: PyTorch reads THP_MEM_ALLOC_ENABLE at start-up.
CONFIGURATIONS = [
    {"framework": "torch", "allocator": "default", "env": {}},
    {"framework": "torch", "allocator": "transparent huge pages",
     "env": {"THP_MEM_ALLOC_ENABLE": "1"}},
    {"framework": "tensorflow", "allocator": "default", "env": {}},
]


def _codecs(framework):
    if framework == "torch":
        import torch

        from horovod_squeeze.torch import codecs

        torch.set_num_threads(1)
        return codecs, torch.from_numpy
    import tensorflow as tf

    from horovod_squeeze.tensorflow import codecs

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    return codecs, tf.constant


def _time_round_trip(codecs, spec, x, numel, repeats):
    codecs.decompress(spec, codecs.compress(spec, x), numel)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        codecs.decompress(spec, codecs.compress(spec, x), numel)
        best = min(best, time.perf_counter() - start)
    return best


def _measure(framework, sizes, repeats):
    """Rows for one framework in this process."""
    codecs, to_tensor = _codecs(framework)
    rng = np.random.default_rng(0)
    rows = []
    for size in sizes:
        x = to_tensor(rng.standard_normal(size).astype(np.float32))
        for label, spec in SPECS.items():
            seconds = _time_round_trip(codecs, spec, x, size, repeats)
            rows.append({"compressor": label, "spec": repr(spec), "numel": size,
                         "seconds": seconds, "gb_per_s": 4 * size / seconds / 1e9})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="sizes up to 1e5 only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [10 ** e for e in range(3, 6 if args.quick else 8)]
    if args.child:
        print(json.dumps(_measure(args.child, sizes, args.repeats)))
        return

    results = []
    print(f"{'framework':<11} {'allocator':<23} {'compressor':<24} {'numel':>9} {'ms':>9} {'GB/s':>7}")
    for config in CONFIGURATIONS:
        command = [sys.executable, __file__, "--child", config["framework"],
                   "--repeats", str(args.repeats)] + (["--quick"] if args.quick else [])
        output = subprocess.run(command, env={**os.environ, **config["env"]}, check=True,
                                capture_output=True, text=True).stdout
        for row in json.loads(output.strip().splitlines()[-1]):
            row = {"framework": config["framework"], "allocator": config["allocator"], **row}
            results.append(row)
            print(f"{row['framework']:<11} {row['allocator']:<23} {row['compressor']:<24} "
                  f"{row['numel']:>9} {row['seconds'] * 1e3:>9.2f} {row['gb_per_s']:>7.3f}")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "compressor_throughput",
        "command": "python benchmarks/compressor_throughput.py" + (" --quick" if args.quick else ""),
        "unit": "GB/s of float32 input through compress + decompress, one thread",
        "machine": {"processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "threads_used": 1},
        "results": results,
    }, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
