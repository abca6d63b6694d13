"""Every algorithm and exchange on CUDA tensors against the same run on CPU tensors, through the
PyTorch engine on in-process ranks (``benchmarks/gpu_check.py``, which ``scripts/gpu_check.sh``
runs in full). Skipped without CUDA; the CPU-against-CPU case runs everywhere, so the comparison
itself stays tested."""
import pytest
import torch

from benchmarks import gpu_check

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_every_case_matches_the_cpu_run(device, dtype):
    failed = []
    for case in gpu_check.cases():
        row = gpu_check.run_case(case, 2, device, dtype, steps=3)
        if not row["passed"]:
            failed.append((row["algorithm"], row["exchange"], row.get("error"),
                           row.get("placement_problems")))
    assert not failed, failed
