"""Every compressor in every framework: byte-identical payloads, exact round trips against the NumPy
reference (whole tensors, and buckets of segments with padding), declared contracts measured on
random vectors, and clear errors for bad input."""

import numpy as np
import pytest

import horovod_squeeze as hs
from horovod_squeeze import reference
from horovod_squeeze.compressors import FP16_MAX

from codec_backends import NATIVE, numpy_backend

NUMPY = numpy_backend()

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
    hs.QSGD(3, p="inf"),
    hs.QSGD.bits(8, seed=5),
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


# --- segments: per-tensor scales, padding that never travels ------------------------------------

# (numel, segments): tensors of a bucket, parts of tensors in a shard, padding past the segments.
SEGMENTED = [
    (1000, (1000,)),                     # one whole segment: the same as segments=None
    (1000, (300, 1, 699)),               # a one-entry tensor between two large ones
    (1003, (5, 990)),                    # 8 entries of padding
    (16, ()),                            # a shard of padding only
    (300, (5,) * 60),                    # many small tensors
    (70_008, (64, 1, 30_000, 39_935)),   # large, with padding
]


def _segmented_vector(numel, segments, seed):
    """Segments of very different magnitudes (so a shared scale would be wrong), then padding
    filled with values that must not matter."""
    rng = np.random.default_rng(seed)
    x = np.full(numel, 1e6, np.float32)
    start = 0
    for i, length in enumerate(segments):
        magnitude = np.float32(10.0 ** (i % 5 - 2))
        x[start:start + length] = _vector("normal", length, seed + i) * magnitude
        start += length
    x[start:] = rng.standard_normal(numel - start).astype(np.float32) * 1e6
    return x


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_segmented_payloads_are_byte_identical_to_reference(native, spec):
    for numel, segments in SEGMENTED:
        x = _segmented_vector(numel, segments, seed=numel)
        what = f"{spec} numel={numel} segments={segments[:4]}..."
        expected = reference.compress(spec, x, nonce=numel, segments=segments)
        payload = native.numpy(native.compress(spec, native.tensor(x), nonce=numel,
                                               segments=segments))
        assert payload.nbytes == spec.payload_nbytes(numel, segments) == expected.nbytes, what
        np.testing.assert_array_equal(payload, expected, err_msg=what)
        want = reference.decompress(spec, expected, numel, segments=segments)
        got = native.numpy(native.decompress(spec, native.tensor(expected), numel,
                                             segments=segments))
        assert got.shape == (numel,)
        np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32), err_msg=what)
        real = sum(segments)
        assert not np.any(want[real:].view(np.int32)), f"{what}: padding decodes to +0.0"


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_one_whole_segment_is_the_unsegmented_payload(spec):
    x = _vector("normal", 1000, seed=3)
    np.testing.assert_array_equal(reference.compress(spec, x, nonce=2, segments=(1000,)),
                                  reference.compress(spec, x, nonce=2))


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_padding_never_enters_the_payload(spec):
    """What the padding holds (even NaN) changes nothing, and it travels in no section."""
    x = _segmented_vector(1003, (5, 990), seed=1)
    clean = x.copy()
    clean[995:] = 0
    dirty = x.copy()
    dirty[995:] = np.nan
    payload = reference.compress(spec, clean, nonce=4, segments=(5, 990))
    np.testing.assert_array_equal(reference.compress(spec, dirty, nonce=4, segments=(5, 990)),
                                  payload)
    np.testing.assert_array_equal(
        payload, reference.compress(spec, clean[:995], nonce=4, segments=(5, 990)))


def test_topk_never_selects_padding(native):
    x = np.zeros(24, np.float32)
    x[:17] = np.arange(1, 18, dtype=np.float32)
    x[17:] = 1000  # padding: the largest values, never chosen
    spec = hs.TopK(0.25)
    decoded = native.numpy(native.decompress(
        spec, native.compress(spec, native.tensor(x), segments=(10, 7)), 24, segments=(10, 7)))
    np.testing.assert_array_equal(np.nonzero(decoded)[0], [12, 13, 14, 15, 16])  # k = ceil(17/4)


@pytest.mark.parametrize("block_size", [None, 1, 3, 64])
@pytest.mark.parametrize("scale", ["l1", "rms"])
def test_scaled_sign_of_a_bucket_is_its_tensors_one_by_one(native, scale, block_size):
    """Per-segment scales: compressing a bucket decodes to what compressing each tensor alone
    does (zeros="positive" has no position-dependent rule)."""
    spec = hs.ScaledSign(scale=scale, block_size=block_size)
    segments = (1, 7, 130, 2, 64)
    x = _segmented_vector(210, segments, seed=8)
    decoded = native.numpy(native.decompress(
        spec, native.compress(spec, native.tensor(x), segments=segments), 210, segments=segments))
    alone, start = [], 0
    for length in segments:
        part = x[start:start + length]
        alone.append(reference.decompress(spec, reference.compress(spec, part), length))
        start += length
    np.testing.assert_array_equal(decoded[:204], np.concatenate(alone))
    np.testing.assert_array_equal(decoded[204:], np.zeros(6, np.float32))


def test_scaled_sign_scales_per_tensor_not_per_shard():
    # A tiny tensor beside a large one keeps its own scale: 0.001, not the shared l1 mean.
    x = np.array([0.001, -0.001, 5, -5, 5, -5], np.float32)
    spec = hs.ScaledSign()
    np.testing.assert_array_equal(
        reference.decompress(spec, reference.compress(spec, x, segments=(2, 4)), 6,
                             segments=(2, 4)), x)
    shared = reference.decompress(spec, reference.compress(spec, x), 6)
    assert shared[0] > 3  # one scale for the whole vector: the tiny tensor steps by 3.33


def test_one_parameter_shard_is_not_scaled_by_its_padding():
    # The regression behind segments: one real entry in an 8-entry shard decodes to itself.
    x = np.array([1, 0, 0, 0, 0, 0, 0, 0], np.float32)
    for spec in (hs.ScaledSign(), hs.ScaledSign(scale="rms"), hs.Ternary(p="2")):
        payload = reference.compress(spec, x, segments=(1,))
        np.testing.assert_array_equal(reference.decompress(spec, payload, 8, segments=(1,)), x)


def test_qsgd_sends_one_quantum_per_segment():
    x = _segmented_vector(100, (10, 90), seed=2)
    spec = hs.QSGD(4)
    payload = reference.compress(spec, x, segments=(10, 90))
    quanta = payload[:8].view(np.float32)
    expected = [np.float32(np.linalg.norm(x[:10].astype(np.float64)) / 4),
                np.float32(np.linalg.norm(x[10:].astype(np.float64)) / 4)]
    np.testing.assert_array_equal(quanta, expected)


def test_ternary_blocks_do_not_straddle_tensors():
    spec = hs.Ternary(block_size=4)
    x = np.arange(1, 11, dtype=np.float32)  # segments (6, 4): blocks [1..4], [5, 6], [7..10]
    payload = reference.compress(spec, x, segments=(6, 4))
    np.testing.assert_array_equal(payload[:12].view(np.float32), [4, 6, 10])


def test_ternary_codes_travel_as_five_base3_digits_per_byte(native):
    # Block norm 1 and entries of magnitude 1 are kept with certainty, so the codes are known:
    # +1 -> 1, -1 -> 2, 0 -> 0, least-significant digit first.
    x = np.array([1, -1, 0, 1, -1, -1, 0], np.float32)  # codes 1 2 0 1 2 | 2 0
    expected = [1 + 2 * 3 + 0 * 9 + 1 * 27 + 2 * 81, 2 + 0 * 3]
    spec = hs.Ternary(block_size=None)
    for payload in (reference.compress(spec, x),
                    native.numpy(native.compress(spec, native.tensor(x)))):
        assert payload[:4].view(np.float32)[0] == 1.0
        np.testing.assert_array_equal(payload[4:], expected)
        np.testing.assert_array_equal(reference.decompress(spec, payload, x.size), x)


def test_to_contractive_scales_each_segment_by_its_own_omega(native):
    inner = hs.QSGD(2)
    spec = hs.ToContractive(inner)
    segments = (3, 400)
    x = _segmented_vector(403, segments, seed=6)
    payload = native.compress(spec, native.tensor(x), nonce=5, segments=segments)
    decoded = native.numpy(native.decompress(spec, payload, 403, segments=segments))
    raw = reference.decompress(inner, native.numpy(payload), 403, segments=segments)
    factors = [1 / (inner.contract(length).omega + 1) for length in segments]
    assert spec.segment_scales(403, segments) == pytest.approx(factors)
    assert factors[0] > factors[1]  # the small tensor is shrunk less
    np.testing.assert_array_equal(decoded[:3], raw[:3] * np.float32(factors[0]))
    np.testing.assert_array_equal(decoded[3:], raw[3:] * np.float32(factors[1]))
    # Without a per-segment quantizer, one factor for the whole vector.
    randk = hs.ToContractive(hs.RandK(0.1, unbiased=True))
    assert randk.segment_scales(403, segments) == pytest.approx(
        (randk.contract(403, segments).delta,) * 2)


@pytest.mark.parametrize("spec", [hs.ScaledSign(block_size=64), hs.QSGD(4), hs.Ternary(),
                                  hs.ToContractive(hs.QSGD(2)), hs.TopK(0.1)], ids=spec_id)
def test_tensorflow_graph_mode_with_segments_matches_reference(spec):
    import tensorflow as tf

    from horovod_squeeze.tensorflow import codecs

    numel, segments = 70_008, (64, 1, 30_000, 39_935)
    x = _segmented_vector(numel, segments, seed=4)

    @tf.function
    def round_trip(v):
        payload = codecs.compress(spec, v, nonce=4, segments=segments)
        return payload, codecs.decompress(spec, payload, numel, segments=segments)

    payload, decoded = round_trip(tf.constant(x))
    expected = reference.compress(spec, x, nonce=4, segments=segments)
    np.testing.assert_array_equal(payload.numpy(), expected)
    np.testing.assert_array_equal(decoded.numpy(),
                                  reference.decompress(spec, expected, numel, segments=segments))


@pytest.mark.parametrize("segments, message", [
    ((600, 500), r"segments \(600, 500\) sum to 1100, more than the 1000 entries"),
    ((10, 0, 5), "segments must be positive integers"),
    ((10, -3), "segments must be positive integers"),
    ((2.5, 7), "segments must be positive integers"),
])
def test_bad_segments_are_rejected_by_name(native, segments, message):
    x = np.ones(1000, np.float32)
    for backend in (native, NUMPY):
        with pytest.raises(ValueError, match="conv1.weight: " + message):
            backend.compress(hs.ScaledSign(), backend.tensor(x), name="conv1.weight",
                             segments=segments)
    payload = reference.compress(hs.ScaledSign(), x)
    with pytest.raises(ValueError, match="conv1.weight: " + message):
        native.decompress(hs.ScaledSign(), native.tensor(payload), 1000, name="conv1.weight",
                          segments=segments)
    with pytest.raises(ValueError, match=message):
        hs.ScaledSign().payload_nbytes(1000, segments)


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
    (hs.Ternary(block_size=256), 1000, 4 * 4 + 200),      # five base-3 codes per byte
    (hs.Ternary(block_size=256), 1001, 4 * 4 + 201),
    (hs.Natural(), 1000, 1125),
])
def test_payload_sizes(spec, size, nbytes):
    assert spec.payload_nbytes(size) == nbytes


@pytest.mark.parametrize("spec, numel, segments, nbytes", [
    (hs.Identity(), 1003, (1000,), 4000),                       # padding never travels
    (hs.FP16(), 1003, (600, 400), 2000),
    (hs.ScaledSign(), 1000, (300, 700), 2 * 4 + 125),           # a scale per tensor
    (hs.ScaledSign(), 1003, (1000,), 4 + 125),
    (hs.ScaledSign(block_size=256), 1000, (300, 700), 5 * 4 + 125),  # blocks 256+44, 256*2+188
    (hs.TopK(0.01), 1003, (1000,), 10 * (2 + 4)),               # k and indices of real entries
    (hs.RandK(0.01), 100_008, (99_000, 1000), 4 + 1000 * 4),
    (hs.QSGD(4), 1000, (10, 990), 2 * 4 + 1000 * 4 // 8),       # a quantum per tensor
    (hs.QSGD(4), 16, (), 0),                                    # all padding: nothing
    (hs.RandK(0.01), 16, (), 4),                                # but the stream key
    (hs.Ternary(block_size=256), 1000, (300, 700), 5 * 4 + 200),
    (hs.Natural(), 1003, (1000,), 1125),
    (hs.ToContractive(hs.QSGD(4)), 1000, (10, 990), 2 * 4 + 500),
])
def test_segmented_payload_sizes(spec, numel, segments, nbytes):
    assert spec.payload_nbytes(numel, segments) == spec.layout(numel, segments).nbytes == nbytes


def test_segmented_contracts_come_from_the_largest_block():
    segments = (10, 990)
    approx = pytest.approx
    assert hs.ScaledSign().contract(1003, segments).delta == approx(1 / 990)
    assert hs.ScaledSign(block_size=64).contract(1003, segments).delta == approx(1 / 64)
    assert hs.QSGD(4).contract(1003, segments).omega == approx(min(990 / 16, np.sqrt(990) / 4))
    assert hs.Ternary(block_size=None).contract(1003, segments).omega == \
        approx((np.sqrt(990) - 1) / 2)
    assert hs.Ternary(block_size=None, p="2").contract(1003, segments).omega == \
        approx(np.sqrt(990) - 1)
    assert hs.QSGD(4, p="inf").contract(1003, segments).omega == \
        approx(min(990 / 64, np.sqrt(990) / 4))
    assert hs.QSGD(127, p="inf").contract(1003, segments).omega == approx(990 / (4 * 127 ** 2))
    assert hs.TopK(0.01).contract(1003, segments).delta == approx(10 / 1000)  # real entries
    assert hs.ToContractive(hs.QSGD(4)).contract(1003, segments).delta == \
        approx(1 / (min(990 / 16, np.sqrt(990) / 4) + 1))
    assert hs.ScaledSign().contract(16, ()).delta == 1.0  # nothing to lose


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


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_declared_contract_holds_with_segments(spec):
    numel, segments = 1007, (1, 9, 90, 400, 500)
    trials = 30 if spec.stochastic else 1
    for kind in DISTRIBUTIONS:
        x = _vector(kind, numel, seed=len(kind))
        x[1000:] = 0  # padding: zero, as the exchanges pad
        if isinstance(spec, hs.FP16):
            x = np.clip(np.where(np.abs(x) < 2.0 ** -14, np.float32(1.0), x), -FP16_MAX, FP16_MAX)
            x[1000:] = 0
        if not np.any(x):
            continue
        errors = []
        for nonce in range(trials):
            payload = reference.compress(spec, x, nonce=nonce, segments=segments)
            decoded = reference.decompress(spec, payload, numel, segments=segments)
            errors.append(np.sum((decoded - x.astype(np.float64)) ** 2)
                          / np.sum(x.astype(np.float64) ** 2))
        bound = spec.contract(numel, segments).error_bound
        slack = 1.5 if spec.stochastic else 1.0 + 1e-6
        assert np.mean(errors) <= bound * slack + 1e-12, f"{spec} {kind}"


@pytest.mark.parametrize("segments", [None, (5, 20, 39)], ids=["whole", "segments"])
@pytest.mark.parametrize("spec", [s for s in SPECS if s.contract(10).kind == "unbiased"], ids=spec_id)
def test_unbiased_compressors_are_unbiased(spec, segments):
    x = _vector("heavy", 64, seed=3)
    trials = 4000
    mean = np.mean([reference.decompress(spec, reference.compress(spec, x, nonce=n,
                                                                  segments=segments), x.size,
                                         segments=segments)
                    for n in range(trials)], axis=0)
    omega = spec.contract(x.size, segments).omega
    # E||mean - x||^2 <= omega ||x||^2 / trials; five times that is a wide, deterministic margin.
    assert np.sum((mean - x) ** 2) <= 5 * omega * np.sum(x.astype(np.float64) ** 2) / trials


@pytest.mark.parametrize("p", ["inf", "2"])
def test_ternary_omega_is_reached(p):
    # The worst vector of a block of n: one entry 1, the others 1 / (sqrt(n) + 1) for p = inf
    # (sqrt(n) - 1 / ... for p = 2 the worst is all entries equal: omega = sqrt(n) - 1).
    n, trials = 64, 4000
    spec = hs.Ternary(block_size=n, p=p, seed=1)
    if p == "inf":
        x = np.full(n, 1 / (np.sqrt(n) + 1), np.float32)
        x[0] = 1
    else:
        x = np.ones(n, np.float32)
    errors = [np.sum((reference.decompress(spec, reference.compress(spec, x, nonce=t), n)
                      - x.astype(np.float64)) ** 2) for t in range(trials)]
    ratio = np.mean(errors) / np.sum(x.astype(np.float64) ** 2)
    assert ratio == pytest.approx(spec.contract(n).omega, rel=0.05)


def test_qsgd_bits_is_the_b_bit_quantizer_of_double_quantization():
    spec = hs.QSGD.bits(4)
    assert spec == hs.QSGD(7, p="inf") and spec.layout(1000)["codes"].width == 4
    x = np.array([0.5, -1.0, 0.25, 0.0], np.float32)
    # delta = ||x||_inf / 7: every entry lands on a multiple of delta, next to its value.
    for nonce in range(20):
        q = reference.decompress(spec, reference.compress(spec, x, nonce=nonce), 4)
        levels = q * 7
        np.testing.assert_allclose(levels, np.round(levels), atol=1e-5)
        assert np.all(np.abs(q - x) <= 1 / 7 + 1e-6) and q[1] == -1.0 and q[3] == 0.0
    with pytest.raises(ValueError, match="b must be an integer in"):
        hs.QSGD.bits(1)


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
