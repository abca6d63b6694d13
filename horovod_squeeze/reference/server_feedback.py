"""Server-only error feedback in NumPy, from its update: ``c_i = C_w(g_i)``, then
``v = mean_i c_i + e;  c = C_s(v);  e = v - c``.

The oracle of :class:`horovod_squeeze.ServerFeedback`; it shares no code with the stages it checks.
"""
import numpy as np


def step(algorithm, gradients, workers, server, worker_compress, server_compress):
    c = [worker_compress(i, g) for i, g in enumerate(gradients)]
    v = sum(c[1:], c[0]) / np.float32(len(c)) + server["server_residual"]
    c_server = server_compress(v)
    return c_server, {}, {"server_residual": v - c_server}
