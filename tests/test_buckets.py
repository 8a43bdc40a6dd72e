"""`positions.log_bucket_positions` against DeBERTa's own code.

The reference is Hugging Face's `make_log_bucket_position` (DeBERTa-v2/v3),
run in torch, over a sweep of `(bucket_size, max_position)` pairs, DeBERTa-
v3's `(256, 512)` among them, and every offset in [-8192, 8192]: eagerly and
under the backend's compiler.

DeBERTa's own answer depends on the machine where its float32 formula lands
within one ulp of a bucket edge: torch's vectorized `log` is one ulp off the
correctly rounded value on some CPUs (on an AVX-512 EPYC, `log(2943 / 32)`
gives 4.521449, not 4.5214486), and there the bucket moves by one. Our layer
computes every float32 step correctly rounded, so its buckets are the same on
every machine and backend. The test asks for exact equality with the local
Hugging Face wherever the formula, with either `log` moved one ulp either way,
gives one bucket, and accepts the two neighbouring buckets where it does not
(`one_ulp_buckets`; `ambiguous_offsets` lists them, as the DeBERTa guide does).
"""

import keras
import numpy as np
import pytest
import torch
from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position

from helpers import BACKEND, to_numpy
from keras_relattn.positions import log_bucket_positions

# Compares with the real edspdf or DeBERTa: a skip here fails the run (conftest).
pytestmark = pytest.mark.reference

OFFSETS = np.arange(-8192, 8193)


def pairs():
    """87 pairs: small and large tables, `max_position` just past `mid`
    (the buckets' steepest case), equal to the table, and far beyond it."""
    found = []
    for bucket_size in (4, 5, 8, 10, 16, 32, 50, 64, 100, 128, 200, 256, 512):
        mid = bucket_size // 2
        for max_position in sorted({mid + 2, 2 * mid, bucket_size, 2 * bucket_size,
                                    4 * bucket_size + 1, 512, 1024, 8192}):
            if max_position > mid + 1:
                found.append((bucket_size, max_position))
    return found


PAIRS = pairs()


def deberta(offsets, bucket_size, max_position):
    return make_log_bucket_position(
        torch.as_tensor(offsets), bucket_size, max_position
    ).numpy().astype(np.int64)


def deberta_log_ratio(bucket_size, max_position):
    """`log((max_position - 1) / mid)` as DeBERTa computes it: the ratio in
    Python, then a float32 tensor, then its log, correctly rounded."""
    ratio = np.float32((max_position - 1) / (bucket_size // 2))
    return np.float32(np.log(np.float64(ratio)))


def correctly_rounded_buckets(offsets, bucket_size, max_position):
    """What our layer promises: DeBERTa's float32 formula (offsets clamped
    to +-2**30 first) with each float32 step (the int to float32
    conversion, division, `log`, quotient, product) correctly rounded, as
    NumPy computes it in float64 and rounds once."""
    offsets = np.clip(np.asarray(offsets, np.int64), -(2**30), 2**30)
    mid = bucket_size // 2
    sizes = np.abs(offsets)
    far = np.maximum(sizes, mid + 1).astype(np.float32).astype(np.float64)
    ratio = (far / mid).astype(np.float32)
    log = np.log(ratio.astype(np.float64)).astype(np.float32)
    scaled = (log.astype(np.float64)
              / np.float64(deberta_log_ratio(bucket_size, max_position))).astype(np.float32)
    product = (scaled.astype(np.float64) * (mid - 1)).astype(np.float32)
    bucket = np.ceil(product).astype(np.int64) + mid
    return np.where(sizes > mid, np.sign(offsets) * bucket, offsets)


def one_ulp_buckets(sizes, bucket_size, max_position):
    """The lowest and highest bucket past `mid` that DeBERTa's float32
    formula gives for int64 `sizes > mid` when each of its two `log`s (of
    `size / mid` and of `(max_position - 1) / mid`) is correctly rounded or
    one ulp off either way; every other step (division, product, ceil) is
    IEEE, correctly rounded on every machine."""
    mid = bucket_size // 2
    ratio = (sizes.astype(np.float64) / mid).astype(np.float32)
    log = np.log(ratio.astype(np.float64)).astype(np.float32)
    log_ratio = deberta_log_ratio(bucket_size, max_position)
    found = []
    for numerator in (np.nextafter(log, np.float32(-np.inf)), log,
                      np.nextafter(log, np.float32(np.inf))):
        for denominator in (np.nextafter(log_ratio, np.float32(-np.inf)), log_ratio,
                            np.nextafter(log_ratio, np.float32(np.inf))):
            scaled = (numerator.astype(np.float64) / np.float64(denominator)).astype(np.float32)
            product = (scaled.astype(np.float64) * (mid - 1)).astype(np.float32)
            found.append(np.ceil(product).astype(np.int64) + mid)
    return np.min(found, 0), np.max(found, 0)


def accepted(offsets, bucket_size, max_position):
    """`(low, high)` per offset: the buckets a correct DeBERTa may give
    (equal, except within one ulp of a bucket edge), signed."""
    mid = bucket_size // 2
    sizes = np.abs(offsets).astype(np.int64)
    low, high = one_ulp_buckets(np.maximum(sizes, mid + 1), bucket_size, max_position)
    far = sizes > mid
    sign = np.sign(offsets)
    low, high = np.where(far, sign * low, offsets), np.where(far, sign * high, offsets)
    return np.minimum(low, high), np.maximum(low, high)


def ambiguous_offsets(bucket_size, max_position, up_to=8192):
    """The positive offsets up to `up_to` whose DeBERTa bucket depends on the
    machine's float32 `log` (the negative ones mirror them)."""
    sizes = np.arange(bucket_size // 2 + 1, up_to + 1)
    low, high = one_ulp_buckets(sizes, bucket_size, max_position)
    return sizes[low != high].tolist()


def compiled(function):
    if BACKEND == "jax":
        import jax

        return jax.jit(function)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(function, jit_compile=True)
    return function  # torch eager: the same kernels as the sweep's eager run


# `log_bucket_positions` finds the edges of the first 2**16 buckets past `mid`
# (all of them unless `max_position` is barely past `mid`; test_internals.py
# checks its edges against this number); past them it keeps the float formula.
EDGES_FOUND = 2**16


def exact_region(bucket_size, max_position):
    """Offsets whose bucket the edges determine: all of them, except past
    the 65536th bucket edge for `max_position` barely past `mid`."""
    mid = bucket_size // 2
    if correctly_rounded_buckets(2**30, bucket_size, max_position) - mid <= EDGES_FOUND:
        return np.ones(OFFSETS.shape, bool)  # every bucket's edges found
    past_mid = np.abs(correctly_rounded_buckets(OFFSETS, bucket_size, max_position)) - mid
    return past_mid < EDGES_FOUND


def test_deberta_v3_is_in_the_sweep_and_its_edge_case_is_right():
    assert (256, 512) in PAIRS
    offsets = np.array([-511, 511, -512, 512, 127, 129, 7464, -7465])
    got = to_numpy(log_bucket_positions(offsets, 256, 512))
    low, high = accepted(offsets, 256, 512)
    want = deberta(offsets, 256, 512)
    assert np.all((low <= want) & (want <= high))
    np.testing.assert_array_equal(got[:6], [-255, 255, -256, 256, 127, 129])
    np.testing.assert_array_equal(got, correctly_rounded_buckets(offsets, 256, 512))
    assert got[0] == -255  # table row 1 of 512 (row 0 before the fix)
    # 511 = max_position - 1 scales to exactly mid - 1, and 7464 lies within
    # one ulp of an edge: the only machine-dependent offsets of v3 up to 8192.
    assert ambiguous_offsets(256, 512) == [511, 7464]


def test_a_one_ulp_log_moves_the_reported_buckets():
    """The cases reported from an AVX-512 EPYC, where torch's `log` is one ulp
    off: Hugging Face gave 4588, 10246 and 39479 there, ours (the correctly
    rounded formula) 4587, 10245 and 39480. Each is accepted both ways, and
    ours is the correctly rounded one."""
    for (bucket_size, max_position), offset, theirs in [
            ((64, 34), 2943, 4588), ((128, 66), 784, 10246), ((256, 130), 1427, 39479)]:
        assert offset in ambiguous_offsets(bucket_size, max_position)
        low, high = accepted(np.array([offset, -offset]), bucket_size, max_position)
        assert np.all((low <= [theirs, -theirs]) & ([theirs, -theirs] <= high))
        ours = to_numpy(log_bucket_positions(np.array([offset]), bucket_size, max_position))
        assert ours[0] != theirs and abs(int(ours[0]) - theirs) == 1
        exact = correctly_rounded_buckets(np.array([offset]), bucket_size, max_position)
        assert ours[0] == exact[0]


@pytest.mark.parametrize("run", ["eager", "compiled"])
def test_log_buckets_equal_deberta_over_the_sweep(run):
    """Ours: the correctly rounded formula everywhere, eager and compiled (the
    same on every machine). Hugging Face's, computed here: equal to ours
    wherever a one-ulp `log` cannot move the bucket, a neighbour otherwise."""
    function = log_bucket_positions if run == "eager" else None
    offsets = keras.ops.convert_to_tensor(OFFSETS.astype("int32"))
    wrong, undecided = {}, 0
    for bucket_size, max_position in PAIRS:
        if run == "compiled":
            function = compiled(
                lambda r, b=bucket_size, m=max_position: log_bucket_positions(r, b, m))
            got = to_numpy(function(offsets))
        else:
            got = to_numpy(function(offsets, bucket_size, max_position))
        assert got.dtype == np.int32
        region = exact_region(bucket_size, max_position)
        exact = correctly_rounded_buckets(OFFSETS, bucket_size, max_position)
        theirs = deberta(OFFSETS, bucket_size, max_position)
        low, high = accepted(OFFSETS, bucket_size, max_position)
        decided = region & (low == high)
        undecided += int(np.sum(region & (low != high)))
        bad = (got != exact) & region
        bad |= decided & (got != theirs)
        bad |= region & ((theirs < low) | (theirs > high))
        if np.any(bad):
            wrong[(bucket_size, max_position)] = OFFSETS[bad][:5]
    assert not wrong, wrong
    assert 0 < undecided < 0.001 * len(OFFSETS) * len(PAIRS)


def test_sign_symmetry_monotonicity_and_range():
    got = to_numpy(log_bucket_positions(OFFSETS, 256, 512))
    np.testing.assert_array_equal(got, -got[::-1])
    assert np.all(np.diff(got) >= 0)
    np.testing.assert_array_equal(got[np.abs(OFFSETS) <= 128], OFFSETS[np.abs(OFFSETS) <= 128])


def test_offsets_beyond_int32_clamp_before_bucketing():
    far = np.array([2**40, -(2**40), 2**31 - 1, -(2**31)], "int64")
    got = to_numpy(log_bucket_positions(far, 256, 512))
    want = deberta(np.array([2**30, -(2**30), 2**30, -(2**30)]), 256, 512)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bucket_size, max_position, error", [
    (2, 512, ValueError), (8, 5, ValueError), ("a", 512, TypeError),
])
def test_bad_bucket_arguments_name_themselves(bucket_size, max_position, error):
    with pytest.raises(error, match="bucket_size"):
        log_bucket_positions(np.arange(3), bucket_size, max_position)


def test_float_offsets_are_refused():
    with pytest.raises(TypeError, match="`relative_positions` must have an integer dtype"):
        log_bucket_positions(np.zeros(3, "float32"), 8, 512)


def test_the_deberta_guide_lists_the_machine_dependent_offsets():
    """The guide's table: each row's offsets are the first ones
    `ambiguous_offsets` finds (all of them where it ends without "...")."""
    import os
    import re

    guide = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "docs", "guides", "deberta.md")
    with open(guide) as f:
        rows = re.findall(r"^\| \((\d+), (\d+)\)[^|]* \| ([\d, .]+) \| (\d+) \|$", f.read(), re.M)
    assert len(rows) >= 8 and ("256", "512") in [r[:2] for r in rows]
    for bucket_size, max_position, listed, count in rows:
        found = ambiguous_offsets(int(bucket_size), int(max_position))
        shown = [int(n) for n in re.findall(r"\d+", listed)]
        assert int(count) == len(found)
        assert shown == found[:len(shown)]
        assert listed.rstrip().endswith("...") == (len(shown) < len(found))
