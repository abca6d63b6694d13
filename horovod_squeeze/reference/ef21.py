"""EF21 in NumPy, from the paper's update (Richtárik, Sokolov, Fatkhullin, NeurIPS 2021,
Algorithm 1, with a step ``alpha`` on the estimates): compressed changes of per-worker gradient
estimates.

The oracle of :class:`horovod_squeeze.EF21`; it shares no code with the stages it checks.
"""


def step(algorithm, gradients, workers, server, worker_compress, server_compress):
    """One segment, n workers; returns what every worker applies, and the new state."""
    real = gradients[0].dtype.type
    alpha = real(algorithm.alpha)
    estimates = workers["worker_estimate"]
    sent = [worker_compress(i, g - h) for i, (g, h) in enumerate(zip(gradients, estimates))]
    c = sum(sent[1:], sent[0]) / real(len(sent))                       # mean_i c_i
    estimate = server["server_estimate"] + alpha * c                   # h += alpha mean_i c_i
    return (server_compress(estimate),
            {"worker_estimate": [h + alpha * c_i for h, c_i in zip(estimates, sent)]},
            {"server_estimate": estimate})
