"""The position terms: score against the table once, then gather.

c2p(i, j) = sum_x q_i[x] . pos_k[idx(i, j, x), x] and p2c(i, j) = sum_x
pos_q[idx(i, j, x), x] . k_j[x]. Scoring every query (key) against the whole
table costs `n_positions` dot products per query (key) instead of one per
(query, key) pair; the pair terms are then *gathered* from those scores, one
flat score number per (query, key, coordinate), shared by all heads.

Two layouts of the scores, chosen per backend by measurement (the benchmark's
W1-W3 workloads, see README "Performance"):

- "head_major", `(heads, rows * n_positions)`: a plain per-head batched
  matmul, and a gather that reads one score per head (XLA: JAX, TensorFlow).
- "rows", `(rows * n_positions, heads)`: each gathered item is one contiguous
  row of `heads` scores (torch eager, and the generic path). With few heads,
  those scores come from one block-diagonal matmul whose output already has
  that layout.

On XLA CPU, head-major was 15-20% faster overall than rows (the block-diagonal
matmul does `heads` times the needed work, and a per-head matmul transposed
into rows makes XLA fuse the transpose into the gather as strided reads); on
torch eager, rows with `F.embedding` was faster (no fusion there, and
`embedding` is torch's fastest row gather).
"""

import keras
from keras import ops

# Up to this many heads, "rows" scores come from one plain matmul with a
# block-diagonal weight (see `_row_scores`); beyond it, the H-fold extra work
# of that matmul outweighs what it saves.
BLOCK_DIAGONAL_MAX_HEADS = 4

LAYOUTS = ("head_major", "rows")


def default_layout():
    backend = keras.backend.backend()
    return "head_major" if backend in ("jax", "tensorflow") else "rows"


def take_rows(table, rows):
    """`table[rows]` for a 2-D table and int32 row numbers known in range.

    `keras.ops.take` must handle negative and out-of-range indices; these
    rows are in range by construction, so the backends' unchecked gathers
    apply (tested against `ops.take` in tests/test_kernels.py).
    """
    backend = keras.backend.backend()
    if backend == "jax":
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


def take_columns(table, columns):
    """`table[:, columns]` moved to the last axis: `(*columns.shape, heads)`.

    For a 2-D `(heads, n)` table and int32 column numbers known in range.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        from jax import lax

        # One gather whose output already has heads last: XLA then writes
        # the logits once, in order.
        dims = lax.GatherDimensionNumbers(
            offset_dims=(columns.ndim,),
            collapsed_slice_dims=(1,),
            start_index_map=(1,),
        )
        return lax.gather(
            table, columns[..., None], dims, (table.shape[0], 1),
            mode="promise_in_bounds",
        )
    if backend == "tensorflow":
        import tensorflow as tf

        taken = tf.gather(table, columns, axis=1)
    else:
        taken = ops.take(table, columns, axis=1)
    return ops.transpose(taken, tuple(range(1, columns.ndim + 1)) + (0,))


def _row_scores(x, table, block_diagonal):
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
        # output is already in the gather's row layout.
        eye = ops.eye(heads, dtype=table.dtype)
        weight = ops.reshape(
            ops.einsum("phd,hg->hdpg", table, eye), (heads * chunk, -1)
        )
        scores = ops.matmul(ops.reshape(x, (n_rows, heads * chunk)), weight)
    else:
        scores = ops.einsum("rhd,phd->rph", x, table)
    return ops.reshape(scores, (-1, heads))


def _head_major_scores(x, table):
    """As `_row_scores`, laid out `(heads, rows * n_positions)`."""
    scores = ops.einsum("rhd,phd->hrp", x, table)
    return ops.reshape(scores, (x.shape[1], -1))


def position_logits(q, k, pos_q, pos_k, index, layout=None, block_diagonal=None):
    """c2p + p2c as `(batch, queries, keys, heads)`.

    Args:
        q: `(batch, queries, heads, head_size)`, scaled.
        k: `(batch, keys, heads, head_size)`.
        pos_q, pos_k: `(n_positions, coordinates, heads, chunk)` or None
            (term not computed); `pos_q` scaled.
        index: `(batch or 1, queries, keys, coordinates)` int32, in
            `[0, n_positions)`.
        layout: `"head_major"` or `"rows"` (see the module docstring); by
            default, the one measured fastest on the backend.
        block_diagonal: for `"rows"`, force or forbid the block-diagonal
            matmul (tests); by default chosen from the number of heads.
    """
    table = pos_k if pos_k is not None else pos_q
    n_positions, coords, heads, chunk = (
        ops.shape(table)[0], table.shape[1], table.shape[2], table.shape[3]
    )
    layout = default_layout() if layout is None else layout
    if layout not in LAYOUTS:
        raise ValueError(f"`layout` must be one of {LAYOUTS}, got {layout!r}")
    if block_diagonal is None:
        block_diagonal = heads <= BLOCK_DIAGONAL_MAX_HEADS
    batch, n_queries = ops.shape(q)[0], ops.shape(q)[1]
    n_keys = ops.shape(k)[1]
    q = ops.reshape(q, (batch * n_queries, heads, coords, chunk))
    k = ops.reshape(k, (batch * n_keys, heads, coords, chunk))
    # Base score number of each (batch, query) and (batch, key), broadcast to
    # the pairs (the index may have a batch of 1).
    b = ops.arange(batch, dtype="int32")[:, None, None]
    pairs = (batch, ops.shape(index)[1], ops.shape(index)[2])
    c2p_base = (b * n_queries + ops.arange(n_queries, dtype="int32")[None, :, None]) * n_positions
    p2c_base = (b * n_keys + ops.arange(n_keys, dtype="int32")[None, None, :]) * n_positions
    c2p_base = ops.broadcast_to(c2p_base, pairs)
    p2c_base = ops.broadcast_to(p2c_base, pairs)

    def term(x, pos, base, idx):
        if layout == "head_major":
            return take_columns(_head_major_scores(x, pos), base + idx)
        return take_rows(_row_scores(x, pos, block_diagonal), base + idx)

    total = None
    for x in range(coords):
        idx = index[..., x]
        for rows, pos, base in ((q, pos_k, c2p_base), (k, pos_q, p2c_base)):
            if pos is not None:
                t = term(rows[:, :, x], pos[:, x], base, idx)
                total = t if total is None else total + t
    return total
