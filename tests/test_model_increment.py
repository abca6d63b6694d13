"""An algorithm whose output is a model increment: the PyTorch DistributedOptimizer adds it to the
parameters (the wrapped optimizer's own step does not run) and its stages see the learning rate."""
import numpy as np
import pytest

import horovod_squeeze as hs
from horovod_squeeze.testing import run_on_ranks
from model_increment_algorithm import SGDIncrement


def _train(steps, lr):
    import horovod.torch as hvd
    import torch

    import horovod_squeeze.torch as hst

    hvd.init()
    # 3000 entries through the algorithm, 10 through the plain bucket (below min_compress_numel).
    big, small = torch.nn.Parameter(torch.zeros(3000)), torch.nn.Parameter(torch.zeros(10))
    # Momentum would change the trajectory if the wrapped step ran: it must not.
    optimizer = hst.DistributedOptimizer(torch.optim.SGD([big, small], lr=lr, momentum=0.9),
                                         named_parameters=[("big", big), ("small", small)],
                                         compression=SGDIncrement(hs.Identity()), warmup_steps=1)
    for step in range(steps):
        optimizer.zero_grad()
        grad = torch.from_numpy(_gradient(step, hvd.rank()))
        ((big * grad[:3000]).sum() + (small * grad[3000:]).sum()).backward()
        optimizer.step()
    return torch.cat([big.detach(), small.detach()]).numpy()


def _gradient(step, rank):
    return np.random.default_rng(100 * step + rank).standard_normal(3010).astype(np.float32)


def test_model_increment_is_added_to_the_parameters():
    steps, lr, num_proc = 4, 0.25, 2
    results = run_on_ranks(_train, num_proc, "gloo", args=(steps, lr), timeout=120)
    # The algorithm, its plain bucket and its warm-up step all take the SGD step -lr * mean.
    want = np.zeros(3010, np.float32)
    for step in range(steps):
        grads = [_gradient(step, r) for r in range(num_proc)]
        want = want + (sum(grads) / np.float32(num_proc)) * np.float32(-lr)
    for weights in results:
        np.testing.assert_allclose(weights, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(results[0], results[1])


def test_tensorflow_refuses_model_increments():
    import tensorflow as tf

    import horovod_squeeze.tensorflow as hstf
    import horovod_squeeze.tensorflow.keras as hsk

    with pytest.raises(NotImplementedError, match="model increment"):
        hsk.DistributedOptimizer(tf.keras.optimizers.SGD(0.1),
                                 compression=SGDIncrement(hs.Identity()))
    with pytest.raises(NotImplementedError, match="model increment"):
        hstf.DistributedGradientTape(tf.GradientTape(), compression=SGDIncrement(hs.Identity()))
