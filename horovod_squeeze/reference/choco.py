"""CHOCO-SGD in NumPy, from the paper's update (Koloskova et al., ICML 2019, Algorithm 2 with the
local step first), keeping every public copy ``xhat_j`` explicitly (not the paper's memory-efficient
sum, which the binding uses)::

    q_i = Q(x_half_i - xhat_i);   xhat_j = xhat_j + q_j   for every j
    x_i = x_half_i + gamma * sum_j W_ij (xhat_j - xhat_i)

The oracle of :class:`horovod_squeeze.ChocoSGD`; it shares no code with the stages it checks.
State: ``{"public_model": [xhat_j per rank]}``.
"""
import numpy as np


def gossip(algorithm, models, state, weights, order, compress):
    """One step of every rank (arguments as :func:`horovod_squeeze.reference.dpsgd.gossip`'s)."""
    q = [compress(i, x - xhat) for i, (x, xhat) in enumerate(zip(models, state["public_model"]))]
    public = [xhat + q_j for xhat, q_j in zip(state["public_model"], q)]
    mixed = []
    for i, x in enumerate(models):
        disagreement = np.zeros_like(x)
        for j in order(i):
            disagreement = disagreement + (public[j] - public[i]) * float(weights[i, j])
        mixed.append(x + disagreement * algorithm.consensus_step)
    return mixed, {"public_model": public}


def init_state(numel, num_ranks, precision="float32"):
    return {"public_model": [np.zeros(numel, precision) for _ in range(num_ranks)]}
