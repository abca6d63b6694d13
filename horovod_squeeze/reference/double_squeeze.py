"""DoubleSqueeze in NumPy, from the paper's update (Tang et al., ICML 2019, Algorithm 1): error
feedback on the workers, then again on the server.

The oracle of :class:`horovod_squeeze.DoubleSqueeze`; it shares no code with the stages it checks.
"""
import numpy as np

from horovod_squeeze.reference.error_feedback import compensated_workers


def step(algorithm, gradients, workers, server, worker_compress, server_compress):
    """One segment, n workers. ``worker_compress(i, v)`` and ``server_compress(v)`` are C_w and
    C_s as the receiver decodes them."""
    c, e = compensated_workers(gradients, workers["worker_residual"], worker_compress)
    v = sum(c[1:], c[0]) / np.float32(len(c)) + server["server_residual"]   # v = mean_i c_i + e
    c_server = server_compress(v)                                            # c = C_s(v)
    return c_server, {"worker_residual": e}, {"server_residual": v - c_server}
