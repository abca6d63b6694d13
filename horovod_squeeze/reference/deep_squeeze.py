"""DeepSqueeze in NumPy, from the paper's update (Tang et al., 2019, Algorithm 1)::

    v_i = x_half_i + e_i;   c_i = C(v_i);   e_i = v_i - c_i
    x_i = x_half_i + eta * sum_j (W_ij - [j == i]) c_j

The oracle of :class:`horovod_squeeze.DeepSqueeze`; it shares no code with the stages it checks.
"""
import numpy as np


def gossip(algorithm, models, state, weights, order, compress):
    """One step of every rank (arguments as :func:`horovod_squeeze.reference.dpsgd.gossip`'s)."""
    v = [x + e for x, e in zip(models, state["model_error"])]
    c = [compress(i, v_i) for i, v_i in enumerate(v)]
    mixed = []
    for i, x in enumerate(models):
        pull = None
        for j in order(i):
            term = c[j] * (float(weights[i, j]) - (1.0 if j == i else 0.0))   # (W_ij - I_ij) c_j
            pull = term if pull is None else pull + term
        mixed.append(x + pull * algorithm.consensus_step)
    return mixed, {"model_error": [v_i - c_i for v_i, c_i in zip(v, c)]}


def init_state(numel, num_ranks, precision="float32"):
    return {"model_error": [np.zeros(numel, precision) for _ in range(num_ranks)]}
