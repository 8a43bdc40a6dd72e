"""Backend-specific fast paths against the generic keras.ops path."""

import numpy as np
import pytest
from keras import ops

from helpers import to_numpy
from keras_relattn import _kernels, config


def test_take_columns_equals_ops_take(rng):
    table = rng.normal(size=(3, 50)).astype("float32")
    columns = rng.integers(0, 50, size=(2, 5, 7)).astype("int32")
    fast = to_numpy(_kernels.take_columns(
        ops.convert_to_tensor(table), ops.convert_to_tensor(columns)))
    generic = np.moveaxis(to_numpy(ops.take(table, columns, axis=1)), 0, -1)
    np.testing.assert_array_equal(fast, generic)
    np.testing.assert_array_equal(fast, np.moveaxis(table[:, columns], 0, -1))
    heads_second = to_numpy(_kernels.take_columns(
        ops.convert_to_tensor(table), ops.convert_to_tensor(columns), heads_last=False))
    np.testing.assert_array_equal(heads_second, np.moveaxis(table[:, columns], 0, 1))


@pytest.mark.parametrize(
    "layout,block_diagonal",
    [("head_major", None), ("rows", True), ("rows", False)],
)
@pytest.mark.parametrize("output", ["bqkh", "bhqk"])
@pytest.mark.parametrize("index_batch", [1, 2])
@pytest.mark.parametrize("flat_limit", [None, 16], ids=["flat", "past the flat limit"])
def test_position_logits_equal_a_direct_gather(layout, block_diagonal, output, index_batch,
                                               flat_limit, rng):
    """The score-then-gather kernel against gathering table rows per pair,
    whole and by blocks of queries, with each gather strategy."""
    with config.block_settings(flat_index_limit=flat_limit):
        check_position_logits(layout, block_diagonal, output, index_batch, flat_limit, rng)


def check_position_logits(layout, block_diagonal, output, index_batch, flat_limit, rng):
    b, nq, nk, h, x, chunk, p = 2, 3, 4, 3, 2, 2, 7
    q = rng.normal(size=(b, nq, h, x * chunk)).astype("float32")
    k = rng.normal(size=(b, nk, h, x * chunk)).astype("float32")
    pos_q = rng.normal(size=(p, x, h, chunk)).astype("float32")
    pos_k = rng.normal(size=(p, x, h, chunk)).astype("float32")
    index = rng.integers(0, p, size=(index_batch, nq, nk, x)).astype("int32")
    offsets = index - p // 2  # the table rows `index`
    terms = _kernels.PositionTerms(
        *(ops.convert_to_tensor(a) for a in (q, k, pos_q, pos_k, offsets)),
        layout=layout, output=output, block_diagonal=block_diagonal)
    if flat_limit is not None:  # no flat int32 numbers past the limit
        assert terms.gather != "flat" or terms.index_dtype == "int64"
    got = to_numpy(terms.logits())
    axis = 1 if output == "bqkh" else 2
    by_blocks = np.concatenate(
        [to_numpy(terms.logits(slice(0, 2))), to_numpy(terms.logits(slice(2, 3)))], axis=axis
    )
    np.testing.assert_allclose(by_blocks, got, atol=1e-6)
    qx, kx = q.reshape(b, nq, h, x, chunk), k.reshape(b, nk, h, x, chunk)
    want = np.zeros((b, nq, nk, h), "float64")
    for c in range(x):
        rows_k = pos_k[index[..., c], c]  # (b or 1, q, k, h, chunk)
        rows_q = pos_q[index[..., c], c]
        want = want + np.einsum("bqhd,bqkhd->bqkh", qx[:, :, :, c], rows_k)
        want = want + np.einsum("bqkhd,bkhd->bqkh", rows_q, kx[:, :, :, c])
    if output == "bhqk":
        want = want.transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, want, atol=1e-5)
