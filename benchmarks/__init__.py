"""Benchmarks of horovod-squeeze (run from the repository root, e.g. ``python -m benchmarks.cluster.run``)."""
