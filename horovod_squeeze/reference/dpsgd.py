"""D-PSGD in NumPy, from the paper's update (Lian et al., NeurIPS 2017), local step first:
``x_i = sum_j W_ij x_half_j``, the models travelling as float32.

The oracle of :class:`horovod_squeeze.DPSGD`; it shares no code with the stages it checks.
"""


def gossip(algorithm, models, state, weights, order, compress):
    """One step of every rank. ``models``: the ``x_half`` of each rank; ``weights``: W;
    ``order(i)``: the ranks whose messages rank i mixes, itself first; ``compress(i, v)``: what
    rank i's message decodes to. Returns the new models and state."""
    sent = [compress(i, x) for i, x in enumerate(models)]
    mixed = []
    for i in range(len(models)):
        total = None
        for j in order(i):
            term = sent[j] * float(weights[i, j])                 # W_ij x_half_j
            total = term if total is None else total + term
        mixed.append(total)
    return mixed, state


def init_state(numel, num_ranks, precision="float32"):
    return {}
