"""Decentralized training without MPI: topologies, the gossip algorithms against their NumPy
references (ranks as threads), consensus, and a rank whose model is not finite."""
import math

import numpy as np
import pytest
import torch

import horovod_squeeze as hs
from horovod_squeeze import topology as T
from horovod_squeeze.reference.gossip import init_state, simulate_gossip

from benchmarks.gossip_convergence import consensus
from gossip_threads import gossip_on_threads

BUILT_IN = [T.ring(2), T.ring(3), T.ring(8), T.torus(8), T.torus(9), T.torus(12, rows=3),
            T.exponential(5), T.exponential(8), T.fully_connected(4)]


# --- topologies ---------------------------------------------------------------------------------

@pytest.mark.parametrize("topology", BUILT_IN, ids=repr)
def test_built_in_graphs_are_symmetric_doubly_stochastic_and_connected(topology):
    w = topology.weights
    np.testing.assert_allclose(w, w.T, atol=0)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
    assert np.all(w >= 0) and 0 < topology.spectral_gap <= 1
    for i in range(topology.size):
        assert topology.neighbors(i) == tuple(j for j in range(topology.size)
                                              if j != i and w[i, j] > 0)


@pytest.mark.parametrize("n", [3, 5, 8, 16])
def test_ring_spectral_gap_is_the_closed_form(n):
    # Weights 1/3: eigenvalues 1/3 + 2/3 cos(2 pi k / n).
    eigenvalues = [1 / 3 + 2 / 3 * math.cos(2 * math.pi * k / n) for k in range(n)]
    expected = 1 - max(abs(e) for e in eigenvalues[1:])
    assert T.ring(n).spectral_gap == pytest.approx(expected, abs=1e-12)


def test_neighbours_of_the_built_in_graphs():
    assert T.ring(8).neighbors(0) == (1, 7)
    assert T.exponential(8).neighbors(0) == (1, 2, 4, 6, 7)      # +-1, +-2, +-4
    assert T.torus(8).neighbors(0) == (1, 3, 4)                  # 2 x 4: a row of 4, a column of 2
    assert T.torus(9).neighbors(4) == (1, 3, 5, 7)
    assert T.fully_connected(3).neighbors(1) == (0, 2)
    assert T.ring(8).weight(0, 1) == pytest.approx(1 / 3)


@pytest.mark.parametrize("weights, message", [
    ([[0.5, 0.5], [0.4, 0.6]], r"not symmetric: W\[0, 1\] = 0.5 but W\[1, 0\] = 0.4"),
    ([[0.5, 0.6], [0.6, 0.4]], "row 0 of the mixing matrix sums to 1.1"),
    ([[1.5, -0.5], [-0.5, 1.5]], "row 0 of the mixing matrix has negative weights"),
    ([[1, 0], [0, 1]], "disconnected"),
    ([[0, 1], [1, 0]], "eigenvalue -1"),
    ([[0.5, float("nan")], [0.5, 0.5]], "row 0 of the mixing matrix is not finite"),
    ([[1, 2, 3]], "must be square"),
])
def test_bad_mixing_matrices_name_the_rule(weights, message):
    with pytest.raises(ValueError, match=message):
        T.from_matrix(weights)


def test_a_user_matrix_is_accepted_and_read_only():
    w = np.array([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5]])
    topology = T.from_matrix(w, name="mine")
    assert topology.neighbors(2) == (0, 1) and topology.spectral_gap == pytest.approx(0.75)
    with pytest.raises(ValueError):
        topology.weights[0, 0] = 1.0


@pytest.mark.parametrize("make, message", [
    (lambda: T.ring(0), "size must be a positive number"),
    (lambda: T.torus(8, rows=3), "rows must divide"),
    (lambda: T.ring(4).neighbors(4), r"rank must be in \[0, 4\)"),
    (lambda: hs.DeepSqueeze(consensus_step=1.5), r"consensus_step must be in \(0, 1\]"),
    (lambda: hs.ChocoSGD(consensus_step=float("nan")), "consensus_step"),
    (lambda: hs.DeepSqueeze("sign"), "compressor must be a compressor spec"),
    (lambda: hs.DPSGD(hs.ScaledSign()), "DPSGD sends the model uncompressed"),
])
def test_impossible_parameters_are_refused(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


@pytest.mark.parametrize("arguments, message", [
    ((hs.DoubleSqueeze(hs.ScaledSign()), "ring", 4, "float32"), "needs a decentralized algorithm"),
    ((hs.DPSGD(), "star", 4, "float32"), "unknown topology 'star'"),
    ((hs.DPSGD(), np.eye(4), 4, "float32"), "topology must be a name or"),
    ((hs.DPSGD(), "ring", 4, "float16"), "precision must be 'float32' or 'float64'"),
    ((hs.DPSGD(), "ring", 4, "float32", -1), "consensus_every must be an integer >= 0"),
    ((hs.DPSGD(), "ring", 4, "float32", 2.5), "consensus_every must be an integer >= 0"),
])
def test_the_bindings_bad_arguments_are_named(arguments, message):
    from horovod_squeeze.decentralized import check_setup

    with pytest.raises((ValueError, TypeError), match=message):
        check_setup(*arguments)


def test_a_topology_name_becomes_the_graph_over_every_rank():
    from horovod_squeeze.decentralized import check_setup

    assert check_setup(hs.DPSGD(), "torus", 9, "float32", 5).name == "torus(3x3)"


# --- the algorithms against their references ----------------------------------------------------

ALGORITHMS = [
    hs.DPSGD(),
    hs.DeepSqueeze(hs.ScaledSign(), consensus_step=0.3),
    hs.DeepSqueeze(hs.Ternary(block_size=64), consensus_step=0.5),
    hs.DeepSqueeze(hs.TopK(0.1)),
    hs.ChocoSGD(hs.TopK(0.2), consensus_step=0.3),
    hs.ChocoSGD(hs.ScaledSign(), consensus_step=0.1),
]
SIZES = (300, 7, 50)  # a model's parameters, laid end to end: each its own segment


def _run_both(algorithm, topology, steps, precision="float32", seed=0):
    """The references' and the threads' models after ``steps`` steps of noisy local SGD."""
    rng = np.random.default_rng(seed)
    n, numel = topology.size, sum(SIZES)
    expected = [rng.standard_normal(numel).astype(precision) for _ in range(n)]
    got = [torch.from_numpy(x.copy()) for x in expected]
    reference_state = init_state(algorithm, numel, n, precision)
    states = [{name: torch.zeros(numel, dtype=getattr(torch, precision))
               for name in algorithm.state_names()} for _ in range(n)]
    for step in range(steps):
        gradients = [rng.standard_normal(numel).astype(precision) for _ in range(n)]
        lr = 0.05
        expected, reference_state = simulate_gossip(
            algorithm, topology.weights, [x - g * lr for x, g in zip(expected, gradients)],
            reference_state, step=step, sizes=SIZES, precision=precision)
        results = gossip_on_threads(
            algorithm, topology, [x - torch.from_numpy(g) * lr for x, g in zip(got, gradients)],
            states, step=step, sizes=SIZES, precision=precision)
        got, states = [r.model for r in results], [r.state for r in results]
    return expected, [x.numpy() for x in got], states, reference_state


@pytest.mark.parametrize("topology", [T.ring(4), T.exponential(5), T.ring(8), T.torus(8)],
                         ids=repr)
@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=repr)
def test_every_rank_matches_the_reference_every_step(algorithm, topology):
    expected, got, states, reference_state = _run_both(algorithm, topology, steps=12)
    for rank, (e, g) in enumerate(zip(expected, got)):
        if isinstance(algorithm, hs.ChocoSGD):
            # The binding keeps the paper's memory-efficient sum s_i, the reference every public
            # copy: the same math, rounded differently.
            assert np.linalg.norm(g - e) <= 1e-6 * np.linalg.norm(e), f"rank {rank}"
        else:  # summed in the same order: bit for bit
            np.testing.assert_array_equal(g, e, err_msg=f"rank {rank}")
    for name, per_rank in reference_state.items():
        for rank, value in enumerate(per_rank):
            np.testing.assert_allclose(states[rank][name].numpy(), value, rtol=0, atol=1e-5)


def test_float64_models_gossip_in_float64():
    algorithm = hs.DeepSqueeze(hs.ScaledSign(), consensus_step=0.3)
    expected, got, *_ = _run_both(algorithm, T.ring(3), steps=5, precision="float64")
    assert got[0].dtype == np.float64
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(g, e)


def test_choco_keeps_the_weighted_sum_of_public_copies():
    # s_i must stay sum_j W_ij xhat_j, which every rank rebuilds from what it received.
    algorithm = hs.ChocoSGD(hs.TopK(0.2), consensus_step=0.3)
    topology = T.ring(4)
    _, _, states, _ = _run_both(algorithm, topology, steps=8)
    public = np.stack([s["public_model"].numpy() for s in states]).astype(np.float64)
    for rank, state in enumerate(states):
        np.testing.assert_allclose(state["neighborhood_model"].numpy(),
                                   topology.weights[rank] @ public, rtol=0, atol=1e-5)


def test_dpsgd_is_deep_squeeze_with_identity_and_step_one():
    topology = T.ring(5)
    models = [torch.randn(357, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    plain = gossip_on_threads(hs.DPSGD(), topology, models, [{}] * 5, step=0)
    squeeze = gossip_on_threads(hs.DeepSqueeze(hs.Identity(), consensus_step=1.0), topology,
                                models, [{"model_error": torch.zeros(357)}] * 5, step=0)
    for a, b in zip(plain, squeeze):
        torch.testing.assert_close(a.model, b.model, rtol=0, atol=1e-6)


# --- consensus ------------------------------------------------------------------------------------

@pytest.mark.parametrize("topology", [T.ring(8), T.torus(8), T.exponential(8)], ids=repr)
@pytest.mark.parametrize("algorithm", [
    hs.DPSGD(), hs.ChocoSGD(hs.ScaledSign(block_size=64), consensus_step=0.2)], ids=repr)
def test_zero_gradients_reach_consensus_geometrically(algorithm, topology):
    distances = consensus(algorithm, topology, 600)
    # Every 100 steps halve the distance at least, down to float32's floor.
    floor = 1e-9 * distances[0]
    assert distances[-1] < floor
    assert all(later < 0.5 * earlier or earlier < floor
               for earlier, later in zip(distances[::100], distances[100::100])), distances[::100]


@pytest.mark.parametrize("topology", [T.ring(8), T.exponential(8)], ids=repr)
def test_deep_squeeze_reaches_a_floor_that_shrinks_with_the_consensus_step(topology):
    # DeepSqueeze compresses the model itself, so its compression error does not vanish at
    # consensus: the distance falls geometrically to a floor of order (eta * error)^2.
    floors = []
    for eta in (0.2, 0.1, 0.05):
        distances = consensus(
            hs.DeepSqueeze(hs.ScaledSign(), consensus_step=eta), topology, 1000)
        assert min(distances[:600]) < 0.05 * distances[0]
        floors.append(np.mean(distances[-200:]))
    assert floors[1] < floors[0] / 3 and floors[2] < floors[1] / 3, floors


# --- a rank whose model is not finite -------------------------------------------------------------

@pytest.mark.parametrize("algorithm", [hs.DeepSqueeze(hs.ScaledSign(), consensus_step=0.3),
                                       hs.ChocoSGD(hs.TopK(0.2), consensus_step=0.3),
                                       hs.DPSGD()], ids=repr)
def test_a_non_finite_rank_raises_and_its_neighbours_mix_without_it(algorithm):
    topology = T.ring(4)
    models = [torch.randn(357, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    models[2] = models[2].clone()
    models[2][5] = float("nan")
    states = [{name: torch.zeros(357) for name in algorithm.state_names()} for _ in range(4)]
    results = gossip_on_threads(algorithm, topology, models, states, step=0, sizes=SIZES)
    assert isinstance(results[2], FloatingPointError) and "rank 2" in str(results[2])
    assert results[1].absent == (2,) and results[3].absent == (2,) and results[0].absent == ()
    for rank in (0, 1, 3):
        assert torch.isfinite(results[rank].model).all()
    if algorithm.absent_neighbor == "self":
        # Rank 1 mixes as if rank 2's message were its own: D-PSGD gives (W_11 + W_12) x_1 + W_10 x_0.
        if isinstance(algorithm, hs.DPSGD):
            expected = models[1] * (2 / 3) + models[0] * (1 / 3)
            torch.testing.assert_close(results[1].model, expected, rtol=1e-6, atol=1e-6)
    else:
        # CHOCO: rank 2 kept its public copy, and its neighbours' sums left it out alike.
        public_2 = states[2]["public_model"]
        s_1 = results[1].state["neighborhood_model"]
        publics = [results[r].state["public_model"] for r in (0, 1)]
        torch.testing.assert_close(s_1, publics[1] / 3 + publics[0] / 3 + public_2 / 3,
                                   rtol=1e-6, atol=1e-6)
