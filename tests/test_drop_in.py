"""What Horovod's PyTorch optimizer accepts, accepted by this one (or refused by name): sparse
gradients through Horovod's sparse path or densified, grouping options, on 2 ranks."""
import numpy as np
import pytest

import horovod_squeeze as hs
from horovod_squeeze.testing import RankFailed, run_on_ranks


def _embedding_steps(steps, sparse_as_dense, compression=None, worker_momentum=False):
    """Rank body: an embedding with sparse gradients and a linear head. Returns, per step, the
    embedding's weights before and after and what each rank's local gradient was."""
    import horovod.torch as hvd
    import torch

    import horovod_squeeze.torch as hst

    hvd.init()
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(50, 8, sparse=True)
    head = torch.nn.Linear(8, 2)
    model = torch.nn.ModuleDict({"embedding": embedding, "head": head})
    optimizer = hst.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.5), named_parameters=model.named_parameters(),
        compression=compression or hs.DoubleSqueeze(hs.ScaledSign()), min_compress_numel=0,
        sparse_as_dense=sparse_as_dense, groups=2, worker_momentum=worker_momentum)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    records = []
    for step in range(steps):
        ids = torch.tensor([[hvd.rank() * 3 + step, 7, 7 + hvd.rank()]])
        optimizer.zero_grad()
        loss = head(embedding(ids)).pow(2).sum()
        loss.backward()
        local = embedding.weight.grad.to_dense().clone()
        before = embedding.weight.detach().clone()
        optimizer.step()
        records.append((before.numpy(), embedding.weight.detach().numpy().copy(),
                        local.numpy()))
    return records


@pytest.mark.parametrize("sparse_as_dense", [False, True], ids=["sparse path", "as dense"])
def test_sparse_embedding_gradients_are_averaged(sparse_as_dense):
    results = run_on_ranks(_embedding_steps, 2, "gloo", args=(3, sparse_as_dense), timeout=120)
    for step in range(3):
        (before, after, grad0), (_, after1, grad1) = results[0][step], results[1][step]
        np.testing.assert_array_equal(after, after1)  # every rank holds the same embedding
        step_taken = before - after
        if not sparse_as_dense:  # Horovod's sparse average, exact up to float32 rounding
            np.testing.assert_allclose(step_taken, 0.5 * (grad0 + grad1) / 2, rtol=1e-5,
                                       atol=1e-7)
        else:  # densified and compressed with the rest: a descent direction of the average
            mean = (grad0 + grad1) / 2
            assert float(np.sum(step_taken * mean)) > 0


def test_sparse_gradients_need_sparse_as_dense_where_the_algorithm_steps_the_model():
    with pytest.raises(RankFailed, match="pass sparse_as_dense=True"):
        run_on_ranks(_embedding_steps, 2, "gloo",
                     args=(1, False, hs.DORE(hs.Ternary())), timeout=120)


def _bad_groups(groups, num_groups):
    import horovod.torch as hvd
    import torch

    import horovod_squeeze.torch as hst

    hvd.init()
    model = torch.nn.Linear(4, 2)
    try:
        hst.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                 named_parameters=model.named_parameters(),
                                 compression=hs.DoubleSqueeze(hs.ScaledSign()),
                                 groups=groups, num_groups=num_groups)
    except ValueError as error:
        return str(error)
    return None


def test_grouping_options_are_checked_as_horovod_checks_them():
    cases = [(0, 0, "groups should be a positive integer"), (None, -1, "num_groups must be"),
             ([[1.0]], 0, "groups must consist of torch.Tensor")]
    for groups, num_groups, message in cases:
        got = run_on_ranks(_bad_groups, 2, "gloo", args=(groups, num_groups), timeout=120)
        assert all(message in error for error in got), got


def _two_optimizers(steps):
    """Rank body: one backward pass feeds two optimizers, each over half of the model."""
    import horovod.torch as hvd
    import torch

    import horovod_squeeze.torch as hst

    hvd.init()
    torch.manual_seed(0)
    encoder, head = torch.nn.Linear(30, 40), torch.nn.Linear(40, 2)
    first = hst.DistributedOptimizer(torch.optim.SGD(encoder.parameters(), lr=0.1),
                                     named_parameters=encoder.named_parameters(prefix="encoder"),
                                     compression=hs.DoubleSqueeze(hs.ScaledSign()),
                                     min_compress_numel=0)
    second = hst.DistributedOptimizer(torch.optim.SGD(head.parameters(), lr=0.1),
                                      named_parameters=head.named_parameters(prefix="head"),
                                      compression=hs.ErrorFeedback(hs.TopK(0.2)),
                                      exchange="allgather", min_compress_numel=0)
    for module in (encoder, head):
        hvd.broadcast_parameters(module.state_dict(), root_rank=0)
    x = torch.randn(16, 30, generator=torch.Generator().manual_seed(hvd.rank()))
    for _ in range(steps):
        first.zero_grad()
        second.zero_grad()
        head(torch.relu(encoder(x))).pow(2).mean().backward()
        first.step()
        second.step()
    return [p.detach().numpy().copy() for p in (*encoder.parameters(), *head.parameters())], \
        first.squeeze_engine.step, second.squeeze_engine.step


def test_two_optimizers_share_one_backward_pass():
    results = run_on_ranks(_two_optimizers, 2, "gloo", args=(4,), timeout=120)
    for weights, first, second in results:
        assert first == second == 4
        for mine, theirs in zip(weights, results[0][0]):
            np.testing.assert_array_equal(mine, theirs)


def _keras_round_trip():
    import os

    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import horovod.tensorflow.keras as hvd
    import tensorflow as tf

    import horovod_squeeze.tensorflow.keras as hsk

    hvd.init()
    algorithm = hs.DoubleSqueeze(hs.TopK(0.1))
    original = hsk.DistributedOptimizer(tf.keras.optimizers.SGD(0.1, momentum=0.9),
                                        compression=algorithm, exchange="allgather",
                                        min_compress_numel=10, warmup_steps=3,
                                        backward_passes_per_step=2)
    rebuilt = type(original).from_config(original.get_config())
    model = tf.keras.Sequential([tf.keras.layers.Dense(4)])
    model.compile(optimizer=rebuilt, loss="mse")
    x = np.random.default_rng(hvd.rank()).standard_normal((16, 8)).astype(np.float32)
    model.fit(x, np.zeros((16, 4), np.float32), batch_size=4, epochs=1, verbose=0,
              callbacks=[hsk.callbacks.BroadcastGlobalVariablesCallback(0)])
    return (rebuilt._squeeze.algorithm == algorithm, rebuilt._squeeze.options,
            rebuilt.get_config()["momentum"], rebuilt._agg_helper is not None,
            int(rebuilt.squeeze_engine.step.numpy()), model.get_weights())


def test_keras_from_config_keeps_the_algorithm_and_every_option():
    results = run_on_ranks(_keras_round_trip, 2, "gloo", timeout=180)
    for same, options, momentum, aggregating, steps, weights in results:
        assert same and momentum == 0.9 and aggregating
        assert (options.exchange, options.min_compress_numel, options.warmup_steps) == (
            "allgather", 10, 3)
        assert steps == 2  # 4 batches, 2 backward passes per exchange
        for mine, theirs in zip(weights, results[0][5]):
            np.testing.assert_array_equal(mine, theirs)
