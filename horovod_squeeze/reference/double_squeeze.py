"""DoubleSqueeze in NumPy, from the paper's update (Tang et al., ICML 2019, Algorithm 1).

The oracle of :class:`horovod_squeeze.DoubleSqueeze`; it shares no code with the stages it checks.
"""
import numpy as np


def step(algorithm, gradients, workers, server, worker_compress, server_compress):
    """One segment, n workers. ``worker_compress(i, v)`` and ``server_compress(v)`` are C_w and
    C_s as the receiver decodes them."""
    n = len(gradients)
    e = workers["worker_residual"]
    c, new_e = [], []
    for i in range(n):
        v_i = gradients[i] + e[i]                          # v_i = g_i + e_i
        c_i = worker_compress(i, v_i)                      # c_i = C_w(v_i)
        c.append(c_i)
        new_e.append(v_i - c_i)                            # e_i = v_i - c_i
    v = sum(c[1:], c[0]) / np.float32(n) + server["server_residual"]   # v = mean_i c_i + e
    c_server = server_compress(v)                          # c = C_s(v)
    return c_server, {"worker_residual": new_e}, {"server_residual": v - c_server}
