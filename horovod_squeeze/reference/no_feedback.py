"""Compressed averaging without feedback in NumPy: ``mean_i C(g_i)``, then C_s (exact by default).

The oracle of :class:`horovod_squeeze.NoFeedback`; it shares no code with the stages it checks.
"""
import numpy as np


def step(algorithm, gradients, workers, server, worker_compress, server_compress):
    n = len(gradients)
    c = [worker_compress(i, g) for i, g in enumerate(gradients)]
    return server_compress(sum(c[1:], c[0]) / np.float32(n)), {}, {}
