"""Error feedback (EF-SGD / MEM-SGD) in NumPy, from its update: worker residuals, exact average
unless a server compressor is named (then compressed without feedback).

The oracle of :class:`horovod_squeeze.ErrorFeedback`; it shares no code with the stages it checks.
"""
import numpy as np


def compensated_workers(gradients, residuals, compress):
    """``v_i = g_i + e_i;  c_i = C(v_i);  e_i = v_i - c_i`` for every worker: ``(c, e)``."""
    c, new_e = [], []
    for i, (g_i, e_i) in enumerate(zip(gradients, residuals)):
        v_i = g_i + e_i
        c_i = compress(i, v_i)
        c.append(c_i)
        new_e.append(v_i - c_i)
    return c, new_e


def step(algorithm, gradients, workers, server, worker_compress, server_compress):
    c, e = compensated_workers(gradients, workers["worker_residual"], worker_compress)
    average = sum(c[1:], c[0]) / np.float32(len(c))        # exact: C_s is Identity by default
    return server_compress(average), {"worker_residual": e}, {}
