"""Every compressor in every framework: byte-identical payloads, exact round trips against the NumPy
reference, declared contracts measured on random vectors, and clear errors for bad input."""

import numpy as np
import pytest

import horovod_squeeze as hs
from horovod_squeeze import reference
from horovod_squeeze.compressors import FP16_MAX

from codec_backends import NATIVE

# One table drives the shared tests: every compressor, in the configurations worth covering.
SPECS = [
    hs.Identity(),
    hs.FP16(),
    hs.TopK(0.01),
    hs.TopK(0.1),
    hs.TopK(0.01, method="sampled"),
    hs.RandK(0.05),
    hs.RandK(0.05, seed=7, unbiased=True),
    hs.ScaledSign(),
    hs.ScaledSign(scale="rms"),
    hs.ScaledSign(block_size=64, zeros="alternate"),
    hs.QSGD(1),
    hs.QSGD(4),
    hs.QSGD(127, seed=3),
    hs.Ternary(),
    hs.Ternary(block_size=None, p="2"),
    hs.Natural(),
    hs.ToContractive(hs.QSGD(2)),
    hs.ToContractive(hs.Natural()),
]
SIZES = [0, 1, 7, 8, 9, 1000, 65537, 200_003]


def spec_id(spec):
    return repr(spec)


def _vector(kind, size, seed):
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.standard_normal(size).astype(np.float32)
    if kind == "uniform":
        return rng.uniform(-3, 5, size).astype(np.float32)
    if kind == "heavy":  # heavy-tailed, magnitudes over many decades
        return (rng.standard_t(1.5, size) * 10.0 ** rng.integers(-6, 3, size)).astype(np.float32)
    if kind == "sparse":
        v = np.zeros(size, np.float32)
        nonzero = rng.random(size) < 0.02
        v[nonzero] = rng.standard_normal(int(nonzero.sum()))
        return v
    if kind == "ties":  # few distinct values, plus exact zeros and negative zeros
        return rng.choice(np.array([-2, -1, -0.0, 0, 1, 2], np.float32), size)
    raise ValueError(kind)


DISTRIBUTIONS = ["normal", "uniform", "heavy", "sparse", "ties"]


@pytest.fixture(params=sorted(NATIVE), scope="module")
def native(request):
    return NATIVE[request.param]()


# --- byte-identical payloads, exact round trips ----------------------------------------------------

@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_payloads_are_byte_identical_to_reference(native, spec):
    for size in SIZES:
        for kind in ("normal", "ties", "sparse"):
            x = _vector(kind, size, seed=size)
            expected = reference.compress(spec, x, nonce=size)
            payload = native.numpy(native.compress(spec, native.tensor(x), nonce=size))
            assert payload.dtype == np.uint8
            assert payload.nbytes == spec.payload_nbytes(size) == expected.nbytes
            np.testing.assert_array_equal(payload, expected, err_msg=f"{spec} size={size} {kind}")


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_decompress_matches_reference_bitwise(native, spec):
    for size in SIZES:
        x = np.clip(_vector("heavy", size, seed=size + 1), -FP16_MAX, FP16_MAX)
        payload = reference.compress(spec, x, nonce=1)
        expected = reference.decompress(spec, payload, size)
        got = native.numpy(native.decompress(spec, native.tensor(payload), size))
        assert got.dtype == np.float32 and got.shape == (size,)
        np.testing.assert_array_equal(got.view(np.int32), expected.view(np.int32),
                                      err_msg=f"{spec} size={size}")


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_payload_made_by_one_framework_decodes_in_the_other(spec):
    torch_codecs, tf_codecs = NATIVE["torch"](), NATIVE["tensorflow"]()
    x = _vector("normal", 4099, seed=5)
    from_torch = torch_codecs.numpy(torch_codecs.compress(spec, torch_codecs.tensor(x), nonce=9))
    from_tf = tf_codecs.numpy(tf_codecs.compress(spec, tf_codecs.tensor(x), nonce=9))
    in_tf = tf_codecs.numpy(tf_codecs.decompress(spec, tf_codecs.tensor(from_torch), x.size))
    in_torch = torch_codecs.numpy(torch_codecs.decompress(spec, torch_codecs.tensor(from_tf), x.size))
    np.testing.assert_array_equal(in_tf, in_torch)
    np.testing.assert_array_equal(in_tf, reference.decompress(spec, from_torch, x.size))


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_tensorflow_graph_mode_matches_eager(spec):
    import tensorflow as tf

    from horovod_squeeze.tensorflow import codecs

    x = tf.constant(_vector("normal", 70_001, seed=2))

    @tf.function
    def round_trip(v):
        payload = codecs.compress(spec, v, nonce=4)
        return payload, codecs.decompress(spec, payload, 70_001)

    payload, decoded = round_trip(x)
    np.testing.assert_array_equal(payload.numpy(), reference.compress(spec, x.numpy(), nonce=4))
    np.testing.assert_array_equal(decoded.numpy(), codecs.decompress(spec, payload, 70_001).numpy())


# --- payload sizes -------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, size, nbytes", [
    (hs.Identity(), 1000, 4000),
    (hs.FP16(), 1000, 2000),
    (hs.ScaledSign(), 1000, 4 + 125),
    (hs.ScaledSign(), 1001, 4 + 126),
    (hs.ScaledSign(block_size=256), 1000, 4 * 4 + 125),
    (hs.TopK(0.01), 1000, 10 * (2 + 4)),          # uint16 indices up to 65536 entries
    (hs.TopK(0.01), 100_000, 1000 * (4 + 4)),     # int32 indices beyond
    (hs.RandK(0.01), 100_000, 4 + 1000 * 4),      # key header, values only
    (hs.QSGD(4), 1000, 4 + 1000 * 4 // 8),        # sign + 3 level bits
    (hs.QSGD(1), 1000, 4 + 1000 * 2 // 8),
    (hs.Ternary(block_size=256), 1000, 4 * 4 + 250),
    (hs.Natural(), 1000, 1125),
])
def test_payload_sizes(spec, size, nbytes):
    assert spec.payload_nbytes(size) == nbytes


def test_scaled_sign_is_32x_smaller_than_float32():
    numel = 10 ** 7
    assert hs.Identity().payload_nbytes(numel) / hs.ScaledSign().payload_nbytes(numel) > 31.99


# --- semantics ---------------------------------------------------------------------------------------

def test_topk_breaks_ties_towards_lower_index(native):
    x = np.array([1, -3, 3, 2, -3, 3], np.float32)
    payload = native.compress(hs.TopK(0.5), native.tensor(x))
    decoded = native.numpy(native.decompress(hs.TopK(0.5), payload, x.size))
    np.testing.assert_array_equal(decoded, [0, -3, 3, 0, -3, 0])


def test_sampled_topk_equals_exact_topk(native):
    for kind in DISTRIBUTIONS:
        x = native.tensor(_vector(kind, 300_000, seed=11))
        exact = native.numpy(native.compress(hs.TopK(0.01), x))
        sampled = native.numpy(native.compress(hs.TopK(0.01, method="sampled"), x))
        np.testing.assert_array_equal(sampled, exact, err_msg=kind)


def test_randk_same_seed_and_nonce_pick_the_same_entries():
    spec = hs.RandK(0.1, seed=3)
    a = reference.decompress(spec, reference.compress(spec, np.ones(500, np.float32), nonce=8), 500)
    b = reference.decompress(spec, reference.compress(spec, np.ones(500, np.float32) * 2, nonce=8), 500)
    c = reference.decompress(spec, reference.compress(spec, np.ones(500, np.float32), nonce=9), 500)
    np.testing.assert_array_equal(a != 0, b != 0)
    assert (a != 0).sum() == 50 and not np.array_equal(a != 0, c != 0)


def test_randk_is_linear_for_a_shared_nonce():
    """The sum of the decoded values equals the decode of the summed values: allreduce-safe."""
    spec = hs.RandK(0.1, seed=1)
    xs = [_vector("normal", 1000, seed=s) for s in range(4)]
    payloads = [reference.compress(spec, x, nonce=5) for x in xs]
    summed_values = sum(p[4:].view(np.float32) for p in payloads)
    summed_payload = np.concatenate([payloads[0][:4], summed_values.astype(np.float32).view(np.uint8)])
    np.testing.assert_allclose(reference.decompress(spec, summed_payload, 1000),
                               sum(reference.decompress(spec, p, 1000) for p in payloads), rtol=1e-6)


@pytest.mark.parametrize("zeros, expected", [("positive", [2, 2, 2, 2]), ("alternate", [2, -2, 2, 2])])
def test_scaled_sign_zero_policy(zeros, expected):
    x = np.array([0, 0, 4, 4], np.float32)  # l1 scale = 8 / 4 = 2
    spec = hs.ScaledSign(zeros=zeros)
    np.testing.assert_array_equal(reference.decompress(spec, reference.compress(spec, x), 4), expected)


def test_scaled_sign_blocks_have_their_own_scale():
    x = np.array([1, -1, 1, 10, -10, 10, 0.5], np.float32)
    decoded = reference.decompress(hs.ScaledSign(block_size=3), reference.compress(hs.ScaledSign(block_size=3), x), 7)
    np.testing.assert_array_equal(decoded, [1, -1, 1, 10, -10, 10, 0.5])


def test_natural_rounds_to_neighbouring_powers_of_two():
    x = np.array([3.0, -0.75, 1.0, 0.0, 1e-40], np.float32)
    for nonce in range(20):
        decoded = reference.decompress(hs.Natural(), reference.compress(hs.Natural(), x, nonce=nonce), 5)
        assert decoded[0] in (2.0, 4.0) and decoded[1] in (-0.5, -1.0)
        assert decoded[2] == 1.0 and decoded[3] == 0.0 and decoded[4] in (0.0, 2.0 ** -126)


def test_qsgd_levels_are_exact_multiples_of_norm_over_levels():
    x = _vector("normal", 1000, seed=0)
    decoded = reference.decompress(hs.QSGD(4), reference.compress(hs.QSGD(4), x), 1000)
    quantum = np.float32(np.linalg.norm(x.astype(np.float64)) / 4)
    levels = np.abs(decoded) / quantum
    np.testing.assert_array_equal(levels, np.round(levels))
    assert set(np.unique(levels)) <= {0, 1, 2, 3, 4}


# --- declared contracts, measured ----------------------------------------------------------------

CONTRACT_SIZES = [1, 2, 10, 1000, 100_000]


def _error_ratio(spec, x, nonce):
    decoded = reference.decompress(spec, reference.compress(spec, x, nonce=nonce), x.size)
    v = x.astype(np.float64)
    return np.sum((decoded - v) ** 2) / np.sum(v ** 2)


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_declared_contract_holds(spec):
    trials = 30 if spec.stochastic else 1
    for size in CONTRACT_SIZES:
        for kind in DISTRIBUTIONS:
            x = _vector(kind, size, seed=size * 7 + len(kind))
            if isinstance(spec, hs.FP16):  # the contract covers float16's normal range
                x = np.where(np.abs(x) < 2.0 ** -14, np.float32(1.0), x)
                x = np.clip(x, -FP16_MAX, FP16_MAX)
            if not np.any(x):
                continue
            contract = spec.contract(size)
            mean_error = np.mean([_error_ratio(spec, x, nonce) for nonce in range(trials)])
            # Stochastic contracts bound an expectation: allow the sampling error of 30 trials.
            slack = 1.5 if spec.stochastic else 1.0 + 1e-6
            assert mean_error <= contract.error_bound * slack + 1e-12, (
                f"{spec} size={size} {kind}: measured {mean_error:.4g} > "
                f"declared {contract.error_bound:.4g}")


@pytest.mark.parametrize("spec", [s for s in SPECS if s.contract(10).kind == "unbiased"], ids=spec_id)
def test_unbiased_compressors_are_unbiased(spec):
    x = _vector("heavy", 64, seed=3)
    trials = 4000
    mean = np.mean([reference.decompress(spec, reference.compress(spec, x, nonce=n), x.size)
                    for n in range(trials)], axis=0)
    omega = spec.contract(x.size).omega
    # E||mean - x||^2 <= omega ||x||^2 / trials; five times that is a wide, deterministic margin.
    assert np.sum((mean - x) ** 2) <= 5 * omega * np.sum(x.astype(np.float64) ** 2) / trials


def test_contractive_scaling_turns_unbiased_into_contractive():
    for inner in (hs.QSGD(2), hs.Ternary(), hs.Natural(), hs.RandK(0.1, unbiased=True)):
        contract = hs.ToContractive(inner).contract(1000)
        assert contract.kind == "contractive"
        assert contract.delta == pytest.approx(1 / (inner.contract(1000).omega + 1))


def test_rms_scaled_sign_is_declared_not_contractive():
    contract = hs.ScaledSign(scale="rms").contract(1000)
    assert contract.kind == "biased" and contract.delta is None and contract.error_bound > 1
    # A sparse vector shows why: the RMS scale spreads one large entry over every position.
    x = np.zeros(1000, np.float32)
    x[0] = 1
    assert _error_ratio(hs.ScaledSign(scale="rms"), x, 0) > 1


# --- specs ---------------------------------------------------------------------------------------

def test_specs_are_hashable_and_immutable():
    assert len({hs.TopK(0.01), hs.TopK(0.01), hs.TopK(0.02)}) == 2
    with pytest.raises(Exception):
        hs.TopK(0.01).ratio = 0.5


@pytest.mark.parametrize("make, message", [
    (lambda: hs.TopK(0), "ratio must be in \\(0, 1\\]"),
    (lambda: hs.TopK(1.5), "ratio must be in \\(0, 1\\]"),
    (lambda: hs.RandK(-0.1), "ratio must be in \\(0, 1\\]"),
    (lambda: hs.TopK(0.1, method="fast"), "method must be one of"),
    (lambda: hs.QSGD(0), "levels must be an integer in \\[1, 255\\]"),
    (lambda: hs.QSGD(2.5), "levels must be an integer"),
    (lambda: hs.ScaledSign(scale="l2"), "scale must be one of"),
    (lambda: hs.ScaledSign(block_size=0), "block_size must be a positive integer"),
    (lambda: hs.Ternary(p="1"), "p must be one of"),
    (lambda: hs.ToContractive(hs.TopK(0.1)), "is not unbiased"),
])
def test_impossible_parameters_are_rejected(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# --- bad input --------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_non_float_tensors_are_rejected_by_name(native, spec):
    for values in (np.arange(10, dtype=np.int32), np.ones(10, dtype=bool)):
        with pytest.raises(TypeError, match="layer1.weight: compressors take floating-point"):
            native.compress(spec, native.tensor(values), name="layer1.weight")


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected_by_name(native, spec, bad):
    if isinstance(spec, hs.Identity):
        pytest.skip("Identity sends the values as they are")
    x = _vector("normal", 1000, seed=0)
    x[17] = bad
    for backend_compress, tensor in ((reference.compress, np.asarray),
                                     (native.compress, native.tensor)):
        with pytest.raises(ValueError, match="fc.bias: .*(NaN|Inf)"):
            backend_compress(spec, tensor(x), name="fc.bias")


def test_fp16_overflow_is_rejected(native):
    x = np.array([1.0, 70000.0], np.float32)
    with pytest.raises(ValueError, match="above 65504"):
        native.compress(hs.FP16(), native.tensor(x))
    with pytest.raises(ValueError, match="above 65504"):
        reference.compress(hs.FP16(), x)


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_wrong_payload_is_rejected(native, spec):
    payload = reference.compress(spec, _vector("normal", 100, seed=0))
    with pytest.raises(ValueError, match=f"{type(spec).__name__} payload for 108 entries"):
        native.decompress(spec, native.tensor(payload), 108)
    with pytest.raises(ValueError, match="must be a 1-D uint8"):
        native.decompress(spec, native.tensor(payload.astype(np.int32)), 100)


def test_unknown_spec_is_rejected(native):
    with pytest.raises(TypeError, match="expected a compressor spec"):
        native.compress("topk", native.tensor(np.ones(3, np.float32)))


def test_zero_dim_and_other_float_dtypes(native):
    spec = hs.ScaledSign()
    scalar = reference.compress(spec, np.float32(-2.5))
    np.testing.assert_array_equal(native.numpy(native.compress(spec, native.tensor(np.array(-2.5, np.float32)))), scalar)
    x64 = _vector("normal", 100, seed=1).astype(np.float64)
    np.testing.assert_array_equal(native.numpy(native.compress(hs.QSGD(4), native.tensor(x64))),
                                  reference.compress(hs.QSGD(4), x64.astype(np.float32)))


def test_bfloat16_is_compressed_as_float32():
    import tensorflow as tf
    import torch

    from horovod_squeeze.tensorflow import codecs as tf_codecs
    from horovod_squeeze.torch import codecs as torch_codecs

    x = torch.randn(1000).to(torch.bfloat16)
    expected = reference.compress(hs.TopK(0.1), x.float().numpy())
    np.testing.assert_array_equal(torch_codecs.compress(hs.TopK(0.1), x).numpy(), expected)
    tf_x = tf.cast(tf.constant(x.float().numpy()), tf.bfloat16)
    np.testing.assert_array_equal(tf_codecs.compress(hs.TopK(0.1), tf_x).numpy(), expected)


def test_non_contiguous_torch_tensor_is_flattened_in_logical_order():
    import torch

    from horovod_squeeze.torch import codecs

    matrix = torch.randn(30, 40)
    transposed = matrix.t()
    assert not transposed.is_contiguous()
    expected = reference.compress(hs.TopK(0.05), transposed.contiguous().numpy())
    np.testing.assert_array_equal(codecs.compress(hs.TopK(0.05), transposed).numpy(), expected)
