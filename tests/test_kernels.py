"""Backend-specific fast paths against the generic keras.ops path."""

import numpy as np
from keras import ops

from conftest import to_numpy
from keras_relattn import _kernels


def test_take_rows_equals_ops_take(rng):
    table = rng.normal(size=(50, 4)).astype("float32")
    rows = rng.integers(0, 50, size=(3, 5, 7)).astype("int32")
    fast = to_numpy(_kernels.take_rows(ops.convert_to_tensor(table), ops.convert_to_tensor(rows)))
    generic = to_numpy(ops.take(table, rows, axis=0))
    np.testing.assert_array_equal(fast, generic)
    np.testing.assert_array_equal(fast, table[rows])


import pytest  # noqa: E402


@pytest.mark.parametrize("block_diagonal", [True, False])
def test_position_logits_equal_a_direct_gather(block_diagonal, rng):
    """The score-then-gather kernel against gathering table rows per pair."""
    b, nq, nk, h, x, chunk, p = 2, 3, 4, 3, 2, 2, 7
    q = rng.normal(size=(b, nq, h, x * chunk)).astype("float32")
    k = rng.normal(size=(b, nk, h, x * chunk)).astype("float32")
    pos_q = rng.normal(size=(p, x, h, chunk)).astype("float32")
    pos_k = rng.normal(size=(p, x, h, chunk)).astype("float32")
    index = rng.integers(0, p, size=(1, nq, nk, x)).astype("int32")
    got = to_numpy(_kernels.position_logits(
        *(ops.convert_to_tensor(a) for a in (q, k, pos_q, pos_k, index)),
        block_diagonal=block_diagonal))
    qx, kx = q.reshape(b, nq, h, x, chunk), k.reshape(b, nk, h, x, chunk)
    want = np.zeros((b, nq, nk, h), "float64")
    for c in range(x):
        rows_k = pos_k[index[0, :, :, c], c]  # (q, k, h, chunk)
        rows_q = pos_q[index[0, :, :, c], c]
        want += np.einsum("bqhd,qkhd->bqkh", qx[:, :, :, c], rows_k)
        want += np.einsum("qkhd,bkhd->bqkh", rows_q, kx[:, :, :, c])
    np.testing.assert_allclose(got, want, atol=1e-5)
