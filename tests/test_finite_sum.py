"""The finite-sum suite: gradients against finite differences, constants against their
definitions, optima to 1e-12, heterogeneous splits, LIBSVM files, bad input; and ECLK's NumPy
reference converging linearly to the exact optimum with a top-k uplink (its shift is what makes
it exact: without one it stalls at a plateau)."""
import numpy as np
import pytest
import scipy.sparse

import horovod_squeeze as hs
from horovod_squeeze import finite_sum as fs
from horovod_squeeze.reference import codecs, eclk


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(fs, "_CACHE", tmp_path / "cache")


def _problems(tmp_path):
    path = fs.write_synthetic_svmlight(tmp_path / "synthetic.svm", rows=400, features=40,
                                       density=0.2, seed=3)
    return [fs.breast_cancer(), fs.breast_cancer("least_squares"), fs.digits_binary(ranks=3),
            fs.svmlight(path, ranks=2), fs.svmlight(path, "least_squares", split="feature:0")]


def test_gradients_match_finite_differences(tmp_path):
    rng = np.random.default_rng(0)
    for problem in _problems(tmp_path):
        x = rng.standard_normal(problem.dim) * 0.3
        direction = rng.standard_normal(problem.dim)
        for rank in range(problem.ranks):
            h = 1e-6
            numeric = (problem.local_value(rank, x + h * direction)
                       - problem.local_value(rank, x - h * direction)) / (2 * h)
            assert problem.local_gradient(rank, x) @ direction == pytest.approx(numeric, rel=1e-6,
                                                                                abs=1e-9)
        # A stochastic gradient of all of a rank's rows is its full local gradient.
        np.testing.assert_allclose(problem.local_gradient(0, x, np.arange(problem.rows(0))),
                                   problem.local_gradient(0, x), rtol=1e-12)


def test_optimum_is_exact_and_cached(tmp_path):
    for problem in _problems(tmp_path):
        x, value = problem.optimum()
        assert np.linalg.norm(problem.gradient(x)) <= 1e-12
        assert value == problem.value(x)
        # Heterogeneous shards: the ranks' own gradients do not vanish at the common optimum.
        assert max(np.linalg.norm(problem.local_gradient(r, x)) for r in range(problem.ranks)) > 1e-3
        again, _ = problem.optimum()
        assert np.array_equal(again, x)
    assert len(list((fs._CACHE / "optima").glob("*.npz"))) == 5


def test_constants_bound_the_curvature(tmp_path):
    rng = np.random.default_rng(1)
    for problem in _problems(tmp_path):
        L, mu = problem.smoothness(), problem.strong_convexity()
        assert 0 < mu <= L <= problem.sample_smoothness() * 1.000001
        for _ in range(5):   # gradient differences of f_r stay within [mu, L] times the distance
            x, y = rng.standard_normal((2, problem.dim))
            for rank in range(problem.ranks):
                change = np.linalg.norm(problem.local_gradient(rank, x)
                                        - problem.local_gradient(rank, y))
                assert change <= L * np.linalg.norm(x - y) * (1 + 1e-9)
            change = (problem.gradient(x) - problem.gradient(y)) @ (x - y)
            assert change >= mu * np.sum((x - y) ** 2) * (1 - 1e-9)


def test_label_split_gives_each_rank_few_labels():
    problem = fs.breast_cancer(ranks=4)
    labels = [set(problem.targets[shard]) for shard in problem.shards]
    assert labels[0] == {-1.0} and labels[-1] == {1.0}
    assert sorted(np.concatenate(problem.shards)) == list(range(569))
    assert max(map(len, problem.shards)) - min(map(len, problem.shards)) <= 1


def test_a_users_libsvm_file_reads_like_the_generated_one(tmp_path):
    path = tmp_path / "mine.svm"
    path.write_text("+1 1:0.5 3:-1\n-1 2:2\n+1 1:1 2:1 3:1\n-1 3:0.25\n")
    problem = fs.svmlight(path, ranks=2, l2=0.1)
    assert scipy.sparse.issparse(problem.features) and problem.features.shape == (4, 3)
    assert set(problem.targets) == {-1.0, 1.0}
    x, _ = problem.optimum()
    assert np.linalg.norm(problem.gradient(x)) <= 1e-12


@pytest.mark.parametrize("make, message", [
    (lambda: fs.breast_cancer("hinge"), "loss must be one of"),
    (lambda: fs.breast_cancer(l2=0.0), "needs l2 > 0"),
    (lambda: fs.breast_cancer(l2=float("nan")), "l2 must be a non-negative number"),
    (lambda: fs.breast_cancer(ranks=0), "ranks must be within 1..569"),
    (lambda: fs.breast_cancer(split="feature:99"), "the data has 30 features"),
    (lambda: fs.breast_cancer(split="sorted"), "split must be one of"),
    (lambda: fs.FiniteSum(np.ones((3, 2)), np.ones(4), "least_squares", 0.1,
                          (np.arange(3),)), "one value per row"),
    (lambda: fs.FiniteSum(np.ones((3, 2)), np.array([0.0, 1.0, 1.0]), "logistic", 0.1,
                          (np.arange(3),)), "-1 or \\+1"),
])
def test_bad_problems_name_the_rule(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_three_labels_are_not_a_logistic_problem(tmp_path):
    path = tmp_path / "three.svm"
    path.write_text("1 1:1\n2 1:2\n3 1:3\n")
    with pytest.raises(ValueError, match="two labels, found 3"):
        fs.svmlight(path, ranks=1)


# --- ECLK's reference: the derivation holds ----------------------------------------------------

def _eclk(problem, compressor, shift, steps):
    spec = compressor

    def top_k(_rank, v):
        return codecs.decompress(spec, codecs.compress(spec, v), v.size).astype(np.float64)

    x_star, f_star = problem.optimum()
    L, mu = problem.sample_smoothness(), problem.strong_convexity()
    m = min(problem.rows(t) for t in range(problem.ranks))
    theta1 = min(np.sqrt(2 * mu / L * m / 3), 0.5)
    state = eclk.init_state(problem, np.zeros(problem.dim))
    gaps = []
    for k in range(steps):
        _, state = eclk.step(problem, state, k, compress=top_k, shift=top_k if shift else None,
                             alpha=1.0, theta1=theta1, theta2=0.5, eta=0.5 / (1.5 * theta1),
                             L=L, mu=mu, p=1.0 / m, batch=1, seed=0)
        gaps.append(problem.value(state["y"]) - f_star)
    return np.array(gaps)


def test_eclk_with_a_shift_converges_linearly_to_the_optimum_and_without_one_stalls():
    problem = fs.breast_cancer(l2=1e-4)
    exact = _eclk(problem, hs.TopK(0.034), shift=True, steps=9000)       # one entry of 30
    stalled = _eclk(problem, hs.TopK(0.034), shift=False, steps=9000)
    assert exact[-1] <= 1e-9
    # Linear (the gap is noisy step to step): the worst gap of each 2,000 steps is at least 10x
    # below the worst of the 2,000 before.
    worst = [exact[k:k + 2000].max() for k in range(1000, 9000, 2000)]
    assert all(later <= earlier / 10 for earlier, later in zip(worst, worst[1:])), worst
    assert stalled[-1] >= 1e-8 and stalled[-1] >= 100 * exact[-1]
