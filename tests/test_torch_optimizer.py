"""horovod_squeeze.torch.DistributedOptimizer on 2 and 4 ranks against the NumPy simulation."""
import warnings

import numpy as np
import pytest

import horovod_squeeze as hs
from horovod_squeeze.exchange import fp32_allreduce_bytes, pass_bytes
from horovod_squeeze.reference.simulate import init_state, simulate_step
from horovod_squeeze.testing import run_on_ranks
from simulation_cases import (
    CONFIGS, SHAPES, STEPS, assert_close, check_against_simulation, gradient,
)

def _make_model():
    import torch

    torch.manual_seed(0)
    return torch.nn.ParameterDict({name.replace(".", "_"): torch.nn.Parameter(torch.zeros(shape))
                                   for name, shape in SHAPES.items()})


def _run_steps(configs):
    """Rank body: for each config, STEPS steps whose gradients are exactly gradient(...)."""
    import horovod.torch as hvd
    import torch

    import horovod_squeeze.torch as hst

    hvd.init()
    results = []
    for config in configs:
        model = _make_model()
        named = [(name, model[name.replace(".", "_")]) for name in SHAPES]
        optimizer = hst.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0),
                                             named_parameters=named, **config)
        engine = optimizer._squeeze
        steps = []
        for step in range(STEPS):
            optimizer.zero_grad()
            # d/dp sum(p * G) = G: the hooks see exactly the gradients the simulation uses.
            loss = sum((p * torch.from_numpy(gradient(n, hvd.rank(), step))).sum() for n, p in named)
            loss.backward()
            optimizer.synchronize()
            steps.append({
                "applied": {n: p.grad.numpy().copy() for n, p in named},
                "worker": {b.index: engine.worker_residuals[b.index].numpy().copy()
                           for b in engine.buckets},
                "server": {b.index: engine.server_residuals[b.index].numpy().copy()
                           for b in engine.buckets},
                "bytes": engine.last_stats.bytes,
                "fp32_bytes": engine.last_stats.fp32_allreduce_bytes,
            })
            with optimizer.skip_synchronize():
                optimizer.step()
        buckets = [(b.index, b.names, b.exchange, b.numel) for b in engine.buckets]
        results.append({"steps": steps, "buckets": buckets,
                        "weights": {n: p.detach().numpy().copy() for n, p in named}})
    return results


DS_SIGN = hs.DoubleSqueeze(hs.ScaledSign())


@pytest.mark.parametrize("num_proc", [2, 4])
def test_double_squeeze_matches_simulation(controller, num_proc):
    # Small buckets, so several buckets and an uncompressed one (the bias) are exercised.
    config = {"compression": DS_SIGN, "bucket_cap_mb": 0.005, "min_compress_numel": 100}
    results = run_on_ranks(_run_steps, num_proc, controller, args=([config],), timeout=180)
    per_rank = [r[0] for r in results]
    assert len(per_rank[0]["buckets"]) >= 3
    check_against_simulation(config, per_rank, num_proc)




@pytest.mark.parametrize("num_proc", [2, 4])
def test_algorithms_and_exchanges_match_simulation(num_proc):
    configs = [{**c, "min_compress_numel": 0} for c in CONFIGS]
    results = run_on_ranks(_run_steps, num_proc, "gloo", args=(configs,), timeout=240)
    for i, config in enumerate(configs):
        check_against_simulation(config, [r[i] for r in results], num_proc)


def test_telemetry_bytes_equal_the_wire_format():
    num_proc = 2
    configs = [{"compression": DS_SIGN, "min_compress_numel": 100},
               {"compression": hs.ErrorFeedback(hs.TopK(0.05)), "exchange": "allgather",
                "min_compress_numel": 0}]
    results = run_on_ranks(_run_steps, num_proc, "gloo", args=(configs,), timeout=120)
    for config, result in zip(configs, results[0]):
        expected = None
        for _, _, kind, numel in result["buckets"]:
            if kind == "uncompressed":
                ring = fp32_allreduce_bytes(numel, num_proc)
                part = hs.exchange.PassBytes(ring, ring, 0, 0)
            else:
                part = pass_bytes(config["compression"].compressor, kind, numel, num_proc)
            expected = part if expected is None else expected + part
        total = sum(numel for *_, numel in result["buckets"])
        for step in result["steps"]:
            assert step["bytes"] == expected
            assert step["fp32_bytes"] == fp32_allreduce_bytes(total, num_proc)
    # An allreduce moves only the summed values: RandK's 4-byte stream key stays home.
    assert pass_bytes(hs.RandK(0.01), "allreduce", 100_000, 4).pass1_sent == 2 * 3 * 4000 // 4
    # 1-bit DoubleSqueeze sends far fewer bytes than an fp32 allreduce even on this tiny model.
    first = results[0][0]["steps"][0]
    assert first["fp32_bytes"] / first["bytes"].sent > 8


def _train_digits(steps, seed, checkpoint_at=None):
    """A few SGD steps on rank-sharded random data; optionally checkpoint, rebuild and resume."""
    import horovod.torch as hvd
    import torch

    import horovod_squeeze.torch as hst

    hvd.init()
    torch.manual_seed(seed)
    data = torch.randn(64 * hvd.size(), 20, generator=torch.Generator().manual_seed(seed))
    target = (data[:, 0] > 0).long()
    x, y = data[hvd.rank()::hvd.size()], target[hvd.rank()::hvd.size()]

    def build():
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
        optimizer = hst.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
            named_parameters=model.named_parameters(),
            compression=hs.DoubleSqueeze(hs.ScaledSign()), min_compress_numel=0)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        return model, optimizer

    model, optimizer = build()
    for step in range(steps):
        if step == checkpoint_at:
            saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
            model, optimizer = build()  # a fresh process's objects
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
        batch = slice((step * 16) % 64, (step * 16) % 64 + 16)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
    return {n: p.detach().numpy().copy() for n, p in model.named_parameters()}


def test_same_seed_gives_bitwise_identical_weights_after_50_steps():
    first = run_on_ranks(_train_digits, 2, "gloo", args=(50, 3), timeout=120)
    second = run_on_ranks(_train_digits, 2, "gloo", args=(50, 3), timeout=120)
    for name in first[0]:
        np.testing.assert_array_equal(first[0][name], second[0][name])
        np.testing.assert_array_equal(first[0][name], first[1][name])  # ranks agree


def test_checkpoint_restore_continues_identically(controller):
    uninterrupted = run_on_ranks(_train_digits, 2, controller, args=(12, 5), timeout=120)
    resumed = run_on_ranks(_train_digits, 2, controller, args=(12, 5),
                           kwargs={"checkpoint_at": 6}, timeout=120)
    for rank in range(2):
        for name in uninterrupted[rank]:
            np.testing.assert_array_equal(resumed[rank][name], uninterrupted[rank][name])


def test_linear_only_exchange_rejects_nonlinear_compressor():
    import torch

    from horovod_squeeze.torch.engine import SqueezeEngine

    with pytest.raises(ValueError, match="only correct for linear compressors"):
        SqueezeEngine(DS_SIGN, [("w", torch.Size([10]))], collectives=_FakeComm(), exchange="allreduce")


class _FakeComm:
    rank, size = 0, 2


def test_compressor_without_algorithm_is_rejected():
    import torch

    import horovod_squeeze.torch as hst

    with pytest.raises(TypeError, match="wrap it in an algorithm"):
        hst.DistributedOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1),
                                 compression=hs.ScaledSign())


def _stock_steps(algorithm):
    """Rank body: Horovod's own optimizer with StockCompression; STEPS known-gradient steps."""
    import horovod.torch as hvd
    import torch

    import horovod_squeeze.torch as hst

    hvd.init()
    model = _make_model()
    named = [(name, model[name.replace(".", "_")]) for name in SHAPES]
    optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0),
                                         named_parameters=named,
                                         compression=hst.StockCompression(algorithm, named))
    applied = []
    for step in range(STEPS):
        optimizer.zero_grad()
        sum((p * torch.from_numpy(gradient(n, hvd.rank(), step))).sum() for n, p in named).backward()
        optimizer.step()
        applied.append({n: p.grad.numpy().copy() for n, p in named})
    return applied


@pytest.mark.parametrize("algorithm", [hs.ErrorFeedback(hs.RandK(0.2, seed=4)),
                                       hs.DoubleSqueeze(hs.RandK(0.3, unbiased=True)),
                                       hs.ErrorFeedback(hs.FP16())], ids=repr)
def test_stock_horovod_path_matches_simulation(algorithm):
    from horovod_squeeze.torch.stock import stream_id

    num_proc = 2
    results = run_on_ranks(_stock_steps, num_proc, "gloo", args=(algorithm,), timeout=120)
    states = {n: init_state(int(np.prod(s)), num_proc, "allreduce") for n, s in SHAPES.items()}
    for step in range(STEPS):
        for name, shape in SHAPES.items():
            grads = [gradient(name, r, step).reshape(-1) for r in range(num_proc)]
            want, states[name] = simulate_step(algorithm, "allreduce", grads, states[name],
                                               step=step, bucket=stream_id(name))
            for rank in range(num_proc):
                got = results[rank][step][name].reshape(-1)
                if isinstance(algorithm.compressor, hs.FP16):  # Horovod averages in float16
                    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)
                else:
                    assert_close(got, want, f"rank {rank} step {step} {name}")


def test_stock_path_rejects_nonlinear_compressors():
    import horovod_squeeze.torch as hst

    with pytest.raises(ValueError, match="only correct for linear compressors"):
        hst.StockCompression(hs.ErrorFeedback(hs.ScaledSign()), [])


def _squeezed_model():
    """Rank body helper: the test model under DoubleSqueeze(ScaledSign), every tensor compressed."""
    import horovod.torch as hvd
    import torch

    import horovod_squeeze.torch as hst

    hvd.init()
    model = _make_model()
    named = [(name, model[name.replace(".", "_")]) for name in SHAPES]
    optimizer = hst.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0),
                                         named_parameters=named, compression=DS_SIGN,
                                         min_compress_numel=0)
    return named, optimizer


def _save_then_report(path, steps):
    """Rank body: train a few steps, save state_dict from rank 0, return the gathered residuals."""
    import horovod.torch as hvd
    import torch

    named, optimizer = _squeezed_model()
    for step in range(steps):
        optimizer.zero_grad()
        sum((p * torch.from_numpy(gradient(n, hvd.rank(), step))).sum() for n, p in named).backward()
        optimizer.step()
    state = optimizer.state_dict()  # a collective: every rank calls it
    if hvd.rank() == 0:
        torch.save(state, path)
    return state["squeeze"]


def _load_and_report(path):
    import torch

    _, optimizer = _squeezed_model()
    optimizer.load_state_dict(torch.load(path, weights_only=False))
    return optimizer.state_dict()["squeeze"]


def test_state_reshards_to_another_world_size(tmp_path):
    path = str(tmp_path / "state.pt")
    saved = run_on_ranks(_save_then_report, 4, "gloo", args=(path, 3), timeout=180)[0]
    loaded = run_on_ranks(_load_and_report, 2, "gloo", args=(path,), timeout=120)[0]
    assert saved["world_size"] == 4 and loaded["world_size"] == 2 and loaded["step"] == 3
    for name in SHAPES:
        old_workers = saved["worker_residuals"][name].numpy()
        new_workers = loaded["worker_residuals"][name].numpy()
        assert old_workers.shape[0] == 4 and new_workers.shape[0] == 2
        assert np.any(old_workers != 0)
        np.testing.assert_allclose(new_workers.sum(axis=0), old_workers.sum(axis=0),
                                   rtol=1e-5, atol=1e-6)  # sum preserved
        np.testing.assert_array_equal(loaded["server_residuals"][name].numpy(),
                                      saved["server_residuals"][name].numpy())


def _accumulate_with_warmup(steps, warmup_steps):
    """Rank body: 2 backward passes per step, one parameter without gradient, warm-up steps."""
    import horovod.torch as hvd
    import torch

    import horovod_squeeze.torch as hst

    hvd.init()
    used = torch.nn.Parameter(torch.zeros(300))
    unused = torch.nn.Parameter(torch.zeros(40))
    optimizer = hst.DistributedOptimizer(
        torch.optim.SGD([used, unused], lr=1.0), named_parameters=[("used", used), ("unused", unused)],
        compression=DS_SIGN, backward_passes_per_step=2, warmup_steps=warmup_steps,
        min_compress_numel=0)
    applied = []
    for step in range(steps):
        optimizer.zero_grad()
        for micro in range(2):
            grad = np.random.default_rng(1000 * step + 10 * micro + hvd.rank()).standard_normal(300)
            (used * torch.from_numpy(grad.astype(np.float32))).sum().backward()
        optimizer.step()
        applied.append((used.grad.numpy().copy(), unused.grad.numpy().copy()))
    return applied


def test_accumulation_unused_parameters_and_warmup_match_simulation():
    num_proc, steps, warmup = 2, 5, 2
    results = run_on_ranks(_accumulate_with_warmup, num_proc, "gloo", args=(steps, warmup),
                           timeout=120)
    state = init_state(340, num_proc, "sharded")
    for step in range(steps):
        used = [sum(np.random.default_rng(1000 * step + 10 * micro + r).standard_normal(300)
                    .astype(np.float32) for micro in range(2)) for r in range(num_proc)]
        # Buckets hold gradients in reverse registration order: the zero gradient of "unused" first.
        flats = [np.concatenate([np.zeros(40, np.float32), u]) for u in used]
        if step < warmup:
            want = np.mean(flats, axis=0)
        else:
            want, state = simulate_step(DS_SIGN, "sharded", flats, state, step=step)
        for rank in range(num_proc):
            got_used, got_unused = results[rank][step]
            assert_close(np.concatenate([got_unused, got_used]), want, f"rank {rank} step {step}")


def test_error_feedback_with_high_variance_unbiased_compressor_warns():
    import torch

    from horovod_squeeze.torch.engine import SqueezeEngine

    with pytest.warns(UserWarning, match="use ToContractive"):
        SqueezeEngine(hs.DoubleSqueeze(hs.QSGD(4)), [("w", torch.Size([10_000]))],
                      collectives=_FakeComm())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SqueezeEngine(hs.DoubleSqueeze(hs.ToContractive(hs.QSGD(4))), [("w", torch.Size([10_000]))],
                      collectives=_FakeComm())
        SqueezeEngine(hs.NoFeedback(hs.QSGD(4)), [("w", torch.Size([10_000]))],
                      collectives=_FakeComm())
