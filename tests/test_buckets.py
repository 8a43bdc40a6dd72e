"""`positions.log_bucket_positions` against DeBERTa's own code.

The reference is Hugging Face's `make_log_bucket_position` (DeBERTa-v2/v3),
run in torch, over a sweep of `(bucket_size, max_position)` pairs, DeBERTa-
v3's `(256, 512)` among them, and every offset in [-8192, 8192]: eagerly and
under the backend's compiler (XLA's `log` may differ from NumPy's by an ulp,
which the exact bucket edges absorb).
"""

import keras
import numpy as np
import pytest
import torch
from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position

from helpers import BACKEND, to_numpy
from keras_relattn.positions import _bucket_edges, log_bucket_positions

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


def compiled(function):
    if BACKEND == "jax":
        import jax

        return jax.jit(function)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(function, jit_compile=True)
    return function  # torch eager: the same kernels as the sweep's eager run


def exact_region(bucket_size, max_position):
    """Offsets whose bucket the edges determine: all of them, except past
    the 65536th bucket edge for `max_position` barely past `mid`."""
    edges, complete = _bucket_edges(bucket_size, max_position)
    return np.abs(OFFSETS) < (np.inf if complete else edges[-1])


def test_deberta_v3_is_in_the_sweep_and_its_edge_case_is_right():
    assert (256, 512) in PAIRS
    got = to_numpy(log_bucket_positions(np.array([-511, 511, -512, 512, 127, 129]), 256, 512))
    want = deberta(np.array([-511, 511, -512, 512, 127, 129]), 256, 512)
    np.testing.assert_array_equal(got, want)
    assert got[0] == -255  # table row 1 of 512 (row 0 before the fix)


@pytest.mark.parametrize("run", ["eager", "compiled"])
def test_log_buckets_equal_deberta_over_the_sweep(run):
    function = log_bucket_positions if run == "eager" else None
    offsets = keras.ops.convert_to_tensor(OFFSETS.astype("int32"))
    wrong = {}
    for bucket_size, max_position in PAIRS:
        if run == "compiled":
            function = compiled(
                lambda r, b=bucket_size, m=max_position: log_bucket_positions(r, b, m))
            got = to_numpy(function(offsets))
        else:
            got = to_numpy(function(offsets, bucket_size, max_position))
        want = deberta(OFFSETS, bucket_size, max_position)
        region = exact_region(bucket_size, max_position)
        assert got.dtype == np.int32
        if np.any(got[region] != want[region]):
            wrong[(bucket_size, max_position)] = OFFSETS[region][got[region] != want[region]][:5]
    assert not wrong, wrong


def test_only_degenerate_pairs_leave_offsets_to_the_float_formula():
    """The edges cover every offset up to 2**30 unless `max_position` is
    within a few percent of `mid` (then: the first 65536 buckets past it)."""
    partial = [p for p in PAIRS if not _bucket_edges(*p)[1]]
    assert partial == [(128, 66), (200, 102), (256, 130), (512, 258)]
    for bucket_size, max_position in partial:
        assert max_position == bucket_size // 2 + 2
        assert _bucket_edges(bucket_size, max_position)[0][-1] > 600


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
