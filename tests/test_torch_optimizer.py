"""horovod_squeeze.torch.DistributedOptimizer on 2 and 4 ranks against the NumPy simulation, and
the constant-gradient drift that error compensation exists to remove."""

import numpy as np
import pytest

import horovod_squeeze as hs
from horovod_squeeze.buckets import Bucket
from horovod_squeeze.exchange import PassBytes, fp32_allreduce_bytes, make_exchange
from horovod_squeeze.reference.simulate import init_state, simulate_step
from horovod_squeeze.testing import run_on_ranks
from benchmarks import constant_gradient_drift
from simulation_cases import (
    CONFIGS, SHAPES, STEPS, assert_close, check_against_simulation, gradient,
)


def _make_model(dtype=None):
    import torch

    torch.manual_seed(0)
    return torch.nn.ParameterDict({name.replace(".", "_"): torch.nn.Parameter(
        torch.zeros(shape, dtype=dtype)) for name, shape in SHAPES.items()})


def _run_steps(configs):
    """Rank body: for each config, STEPS steps whose gradients are exactly gradient(...), on a
    model in the config's precision (the wrapper picks its own from the parameters)."""
    import horovod.torch as hvd
    import torch

    import horovod_squeeze.torch as hst

    hvd.init()
    results = []
    for config in configs:
        model = _make_model(getattr(torch, config.get("precision", "float32")))
        named = [(name, model[name.replace(".", "_")]) for name in SHAPES]
        options = {k: v for k, v in config.items() if k not in ("learning_rate", "precision")}
        sgd = torch.optim.SGD(model.parameters(), lr=config.get("learning_rate", 1.0))
        optimizer = hst.DistributedOptimizer(sgd, named_parameters=named, **options)
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
                "state": {i: {n: t.numpy().copy() for n, t in s.items()}
                          for i, s in engine.state.items()},
                "bytes": engine.last_stats.bytes,
                "fp32_bytes": engine.last_stats.fp32_allreduce_bytes,
            })
            with optimizer.skip_synchronize():
                optimizer.step()
        buckets = [(b.index, list(b.names), b.exchange.name, b.numel) for b in engine.buckets]
        results.append({"steps": steps, "buckets": buckets,
                        "weights": {n: p.detach().numpy().copy() for n, p in named}})
    return results


DS_SIGN = hs.DoubleSqueeze(hs.ScaledSign())


def _bit_identical(buckets, num_proc):
    """Whether Horovod's results must equal the simulation bit for bit: everything but an
    allreduce of more than two ranks (which sums in ring order, not rank order, so it matches
    only to rounding) moves bytes unchanged."""
    return num_proc == 2 or all(kind not in ("uncompressed", "allreduce")
                                for _, _, kind, _ in buckets)


@pytest.mark.parametrize("num_proc", [2, 4])
def test_double_squeeze_matches_simulation(controller, num_proc):
    # Small buckets, so several buckets and an uncompressed one (the bias) are exercised.
    config = {"compression": DS_SIGN, "bucket_cap_mb": 0.005, "min_compress_numel": 100}
    results = run_on_ranks(_run_steps, num_proc, controller, args=([config],), timeout=180)
    per_rank = [r[0] for r in results]
    assert len(per_rank[0]["buckets"]) >= 3
    check_against_simulation(config, per_rank, num_proc,
                             exact=_bit_identical(per_rank[0]["buckets"], num_proc))


@pytest.mark.parametrize("num_proc", [2, 4])
def test_algorithms_and_exchanges_match_simulation(num_proc):
    configs = [{**c, "min_compress_numel": 0} for c in CONFIGS]
    results = run_on_ranks(_run_steps, num_proc, "gloo", args=(configs,), timeout=240)
    for i, config in enumerate(configs):
        per_rank = [r[i] for r in results]
        check_against_simulation(config, per_rank, num_proc,
                                 exact=_bit_identical(per_rank[0]["buckets"], num_proc))


# Algorithms that take the model step: p.grad holds the increment after synchronize().
MODEL_UPDATES = [
    {"compression": hs.DORE(hs.Ternary(block_size=64)), "learning_rate": 0.25},
    {"compression": hs.DORE(hs.QSGD(4), alpha=0.05), "exchange": "allgather",
     "learning_rate": 0.5},
    {"compression": hs.DoubleQuantization(b=4, b_x=8), "learning_rate": 0.25},
    {"compression": hs.DORE(hs.Ternary(block_size=64)), "exchange": "allgather",
     "learning_rate": 0.25, "precision": "float64"},
]


@pytest.mark.parametrize("num_proc", [2, 4])
def test_model_update_algorithms_match_simulation(controller, num_proc):
    configs = [{**c, "bucket_cap_mb": 0.005, "min_compress_numel": 100} for c in MODEL_UPDATES]
    results = run_on_ranks(_run_steps, num_proc, controller, args=(configs,), timeout=240)
    for i, config in enumerate(configs):
        per_rank = [r[i] for r in results]
        assert len(per_rank[0]["buckets"]) >= 3
        check_against_simulation(config, per_rank, num_proc,
                                 exact=_bit_identical(per_rank[0]["buckets"], num_proc))
        # Every rank adds the same increments: the models are bit-identical after every step.
        for rank in per_rank[1:]:
            for got, want in zip(rank["steps"], per_rank[0]["steps"]):
                for name in SHAPES:
                    np.testing.assert_array_equal(got["applied"][name], want["applied"][name])
            for name in SHAPES:
                np.testing.assert_array_equal(rank["weights"][name], per_rank[0]["weights"][name])


def test_telemetry_bytes_equal_the_wire_format():
    num_proc = 2
    configs = [{"compression": DS_SIGN, "min_compress_numel": 100},
               {"compression": hs.ErrorFeedback(hs.TopK(0.05)), "exchange": "allgather",
                "min_compress_numel": 0}]
    results = run_on_ranks(_run_steps, num_proc, "gloo", args=(configs,), timeout=120)
    for config, result in zip(configs, results[0]):
        expected = PassBytes(0, 0, 0, 0)
        for index, names, kind, numel in result["buckets"]:
            if kind == "uncompressed":
                ring = fp32_allreduce_bytes(numel, num_proc)
                expected += PassBytes(ring, ring, 0, 0)
            else:
                bucket = Bucket(index, names, [SHAPES[n] for n in names], make_exchange(kind))
                expected += make_exchange(kind).pass_bytes(config["compression"], bucket,
                                                           num_proc)
        assert {kind for *_, kind, _ in result["buckets"]} - {"uncompressed"} == {
            config.get("exchange", "sharded")}
        total = sum(numel for *_, numel in result["buckets"])
        for step in result["steps"]:
            assert step["bytes"] == expected
            assert step["fp32_bytes"] == fp32_allreduce_bytes(total, num_proc)
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
    states = {n: init_state(algorithm, "allreduce", int(np.prod(s)), num_proc)
              for n, s in SHAPES.items()}
    for step in range(STEPS):
        for name, shape in SHAPES.items():
            grads = [gradient(name, r, step).reshape(-1) for r in range(num_proc)]
            want, states[name] = simulate_step(algorithm, "allreduce", grads, states[name],
                                               step=step, bucket=stream_id(name))
            for rank in range(num_proc):
                got = results[rank][step][name].reshape(-1)
                if isinstance(algorithm.worker, hs.FP16):  # Horovod averages in float16
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
    """Rank body: train a few steps, save every rank's state from rank 0, return it."""
    import horovod.torch as hvd
    import torch

    named, optimizer = _squeezed_model()
    for step in range(steps):
        optimizer.zero_grad()
        sum((p * torch.from_numpy(gradient(n, hvd.rank(), step))).sum() for n, p in named).backward()
        optimizer.step()
    state = optimizer.state_dict(all_ranks=True)  # a collective: every rank calls it
    if hvd.rank() == 0:
        torch.save(state, path)
    return state["squeeze"]


def _load_and_report(path):
    import torch

    _, optimizer = _squeezed_model()
    optimizer.load_state_dict(torch.load(path, weights_only=False))
    return optimizer.state_dict(all_ranks=True)["squeeze"]  # applied, then gathered


def test_state_reshards_to_another_world_size(tmp_path):
    path = str(tmp_path / "state.pt")
    saved = run_on_ranks(_save_then_report, 4, "gloo", args=(path, 3), timeout=180)[0]
    loaded = run_on_ranks(_load_and_report, 2, "gloo", args=(path,), timeout=120)[0]
    assert saved["world_size"] == 4 and loaded["world_size"] == 2 and loaded["step"] == 3
    assert set(saved["state"]) == {"worker_residual", "server_residual"}
    for name in SHAPES:
        old_workers = saved["state"]["worker_residual"]["tensors"][name].numpy()
        new_workers = loaded["state"]["worker_residual"]["tensors"][name].numpy()
        assert old_workers.shape[0] == 4 and new_workers.shape[0] == 2
        assert np.any(old_workers != 0)
        np.testing.assert_allclose(new_workers.sum(axis=0), old_workers.sum(axis=0),
                                   rtol=1e-5, atol=1e-6)  # sum preserved
        np.testing.assert_array_equal(loaded["state"]["server_residual"]["tensors"][name].numpy(),
                                      saved["state"]["server_residual"]["tensors"][name].numpy())


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
    state = init_state(DS_SIGN, "sharded", 340, num_proc)
    for step in range(steps):
        used = [sum(np.random.default_rng(1000 * step + 10 * micro + r).standard_normal(300)
                    .astype(np.float32) for micro in range(2)) for r in range(num_proc)]
        # Buckets hold gradients in reverse registration order: the zero gradient of "unused" first.
        flats = [np.concatenate([np.zeros(40, np.float32), u]) for u in used]
        if step < warmup:
            want = np.mean(flats, axis=0)
        else:
            want, state = simulate_step(DS_SIGN, "sharded", flats, state, step=step,
                                        sizes=[40, 300])
        for rank in range(num_proc):
            got_used, got_unused = results[rank][step]
            assert_close(np.concatenate([got_unused, got_used]), want, f"rank {rank} step {step}")


# --- the constant-gradient drift ------------------------------------------------------------------

@pytest.mark.parametrize("num_proc", [2, 4])
def test_error_compensation_removes_the_constant_gradient_drift(num_proc):
    results = constant_gradient_drift.measure(num_proc)
    drifts = {config: drift for config, (drift, _) in results[0].items()}
    for config, drift in drifts.items():
        print(f"drift {num_proc} ranks {config[0]:>13} {config[1]:>9}: {drift:.4f}")
    for rank in range(1, num_proc):  # weights bit-identical across ranks
        assert results[rank] == results[0], f"rank {rank} ended with other weights"
    compensated = [drifts[a, e] for a in ("DoubleSqueeze", "ErrorFeedback")
                   for e in constant_gradient_drift.EXCHANGES]
    assert max(compensated) < 0.10, drifts
    for exchange in constant_gradient_drift.EXCHANGES:
        assert drifts["NoFeedback", exchange] >= 5 * max(compensated), drifts
