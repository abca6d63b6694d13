"""Error feedback (EF-SGD / MEM-SGD) in NumPy, from its update: worker residuals, exact average
unless a server compressor is named (then compressed without feedback).

The oracle of :class:`horovod_squeeze.ErrorFeedback`; it shares no code with the stages it checks.
"""
import numpy as np


def step(algorithm, gradients, workers, server, worker_compress, server_compress):
    n = len(gradients)
    e = workers["worker_residual"]
    c, new_e = [], []
    for i in range(n):
        v_i = gradients[i] + e[i]                          # v_i = g_i + e_i
        c_i = worker_compress(i, v_i)                      # c_i = C(v_i)
        c.append(c_i)
        new_e.append(v_i - c_i)                            # e_i = v_i - c_i
    average = sum(c[1:], c[0]) / np.float32(n)             # exact: C_s is Identity by default
    return server_compress(average), {"worker_residual": new_e}, {}
