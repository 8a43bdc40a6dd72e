"""The position terms: score against the table once, then gather.

c2p(i, j) = sum_x q_i[x] . pos_k[idx(i, j, x), x] and p2c(i, j) = sum_x
pos_q[idx(i, j, x), x] . k_j[x]. Scoring every query (key) against the whole
table costs `n_positions` dot products per query (key) instead of one per
(query, key) pair; the pair terms are then *gathered* from those scores.

Layout: scores are laid out `(batch, length, n_positions, heads)`, so each
gathered item is a contiguous row of `heads` values, and the index work
(one flat row number per (query, key, coordinate)) is shared by all heads.
"""

import keras
from keras import ops


def take_rows(table, rows):
    """`table[rows]` for a 2-D table and int32 row numbers known in range.

    `keras.ops.take` must handle negative and out-of-range indices; these
    rows are in range by construction, so the backends' unchecked gathers
    apply (tested against `ops.take` in tests/test_kernels.py).
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        # The barrier asks XLA to gather from the finished score table rather
        # than fuse the table's producer into the gather (measured W1 5.1 ->
        # 2.9 ms before the block-diagonal scores; kept, not re-measured since).
        table = jax.lax.optimization_barrier(table)
        return table.at[rows].get(mode="promise_in_bounds")
    if backend == "torch":
        import torch

        # `embedding` is torch's fastest row gather on CPU (measured 3x
        # faster than index_select or advanced indexing for 4-float rows).
        return torch.nn.functional.embedding(rows.contiguous(), table.contiguous())
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.gather(table, rows, axis=0)
    return ops.take(table, rows, axis=0)


# Up to this many heads, the scores against the table come from one plain
# matmul with a block-diagonal weight (see `_table_scores`); beyond it, the
# H-fold extra work of that matmul outweighs what it saves.
BLOCK_DIAGONAL_MAX_HEADS = 4


def _table_scores(x, table, block_diagonal):
    """Scores of every row of `x` against every table position, per head.

    Args:
        x: `(rows, heads, chunk)`.
        table: `(n_positions, heads, chunk)`.

    Returns:
        `(rows * n_positions, heads)`: row `r * n_positions + p` holds the
        `heads` scores of `x[r]` against position `p`, contiguous.
    """
    n_rows, heads, chunk = ops.shape(x)[0], x.shape[1], x.shape[2]
    if block_diagonal:
        # One (rows, heads*chunk) @ (heads*chunk, positions*heads) matmul whose
        # output is already in the gather's row layout: a batched per-head
        # einsum would produce (heads, rows, positions) and need a transpose
        # that XLA fuses into the gather as strided reads (measured 2x slower).
        eye = ops.eye(heads, dtype=table.dtype)
        weight = ops.reshape(
            ops.einsum("phd,hg->hdpg", table, eye), (heads * chunk, -1)
        )
        scores = ops.matmul(ops.reshape(x, (n_rows, heads * chunk)), weight)
    else:
        scores = ops.einsum("rhd,phd->rph", x, table)
    return ops.reshape(scores, (-1, heads))


def position_logits(q, k, pos_q, pos_k, index, block_diagonal=None):
    """c2p + p2c as `(batch, queries, keys, heads)`.

    Args:
        q: `(batch, queries, heads, head_size)`, scaled.
        k: `(batch, keys, heads, head_size)`.
        pos_q, pos_k: `(n_positions, coordinates, heads, chunk)` or None
            (term not computed); `pos_q` scaled.
        index: `(batch or 1, queries, keys, coordinates)` int32, in
            `[0, n_positions)`.
        block_diagonal: force the table-scores formulation (tests); by
            default chosen from the number of heads.
    """
    table = pos_k if pos_k is not None else pos_q
    n_positions, coords, heads, chunk = (
        ops.shape(table)[0], table.shape[1], table.shape[2], table.shape[3]
    )
    if block_diagonal is None:
        block_diagonal = heads <= BLOCK_DIAGONAL_MAX_HEADS
    batch, n_queries = ops.shape(q)[0], ops.shape(q)[1]
    n_keys = ops.shape(k)[1]
    q = ops.reshape(q, (batch * n_queries, heads, coords, chunk))
    k = ops.reshape(k, (batch * n_keys, heads, coords, chunk))
    # Base row of each (batch, query) and (batch, key) in the flat score tables.
    b = ops.arange(batch, dtype="int32")[:, None, None]
    c2p_base = (b * n_queries + ops.arange(n_queries, dtype="int32")[None, :, None]) * n_positions
    p2c_base = (b * n_keys + ops.arange(n_keys, dtype="int32")[None, None, :]) * n_positions
    total = None
    for x in range(coords):
        idx = index[..., x]
        if pos_k is not None:
            # every query against the table, then the pair terms gathered
            scores = _table_scores(q[:, :, x], pos_k[:, x], block_diagonal)
            term = take_rows(scores, c2p_base + idx)
            total = term if total is None else total + term
        if pos_q is not None:
            # the table against every key
            scores = _table_scores(k[:, :, x], pos_q[:, x], block_diagonal)
            term = take_rows(scores, p2c_base + idx)
            total = term if total is None else total + term
    return total
