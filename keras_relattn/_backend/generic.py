"""The backend interface in plain `keras.ops`: the fallback of every backend
without a faster way, and the reference each fast path is tested against
(`tests/test_backend.py`)."""

import math

from keras import ops

from keras_relattn._records import flatten, rebuild

try:  # the backend's own softmax, without `keras.ops.softmax`'s shape check
    from keras.src.backend import nn as _backend_nn

    _softmax = _backend_nn.softmax
except (ImportError, AttributeError):  # pragma: no cover - other Keras layouts
    _softmax = ops.softmax

# The integer dtype of table indices (int32: JAX without x64 has no int64).
INDEX_DTYPE = "int32"
# How table scores are laid out for the flat gather: "heads_minor", `(rows * P,
# heads)`, each gathered item one contiguous run of `heads` scores; or
# "head_major", `(heads, rows * P)`, a per-head batched matmul and a gather of
# one score per head (see `_position_terms`).
SCORE_LAYOUT = "heads_minor"
# The layout the position logits are gathered into: "bhqk" (the softmax's)
# or "bqkh" (the returned logits').
LOGITS_LAYOUT = "bhqk"
# Whether scores `(batch, heads, rows, P)` are best gathered along each row
# (`take_along_rows`) rather than by flat numbers.
GATHERS_ALONG_ROWS = False
# The banded path (`sequence_positions`): queries per block (the band's
# gathers cost `rows + n_positions` keys a query, the terms outside it a pass
# over every key a block).
BAND_ROWS = 64


def default_block_elements():
    """The largest `(batch, heads, rows, keys)` block the pooled path holds at
    a time: 2**23 (32 MiB of float32), a bound on memory."""
    return 2**23


def sizes_are_frozen():
    """Whether sizes read now are recorded as constants by a tracer (torch's
    `jit.trace`): a decision taken on them would be frozen."""
    return False


def softmax(x, axis=-1):
    """The backend's fused softmax. Not `keras.ops.softmax`: it warns when the
    axis has length 1 (one key), a legitimate case here, and a Python test of
    that length would be frozen by tracers."""
    return _softmax(x, axis=axis)


def masked_softmax_in_place(logits, attend, masked_logit):
    """float32 `logits` with the pairs where `attend` is False *replaced* by
    `masked_logit`, softmaxed over the last axis: in place where the backend
    can (see `works_in_place`); here, a new tensor."""
    if attend is not None:
        logits = ops.where(attend, logits, masked_logit)
    return softmax(logits, axis=-1)


def take_columns(table, columns, heads_last=True):
    """`table[:, columns]` for a 2-D `(heads, n)` table and integer column
    numbers known in range: `(*columns.shape, heads)` with `heads_last`, else
    `(columns.shape[0], heads, *columns.shape[1:])`."""
    taken = ops.take(table, columns, axis=1)
    return _heads_to(taken, columns, heads_last)


def _heads_to(taken, columns, heads_last):
    """`(heads, *columns.shape)` moved to where `take_columns` puts the heads."""
    rank = len(columns.shape)
    if not heads_last:
        return ops.transpose(taken, (1, 0) + tuple(range(2, rank + 1)))
    return ops.transpose(taken, tuple(range(1, rank + 1)) + (0,))


def take_along_rows(scores, index, axis, out=None):
    """Scores gathered along `axis` of each row.

    Args:
        scores: `(batch, heads, rows, P)` (axis 3) or `(batch, heads, P,
            keys)` (axis 2).
        index: `(batch or 1, queries, keys)` integers in `[0, P)`.
        out: a buffer of the result's shape, written in place where the
            backend can (ignored here).

    Returns:
        `(batch, heads, queries, keys)`: `scores[b, h, q, index[b, q, k]]`
        (axis 3) or `scores[b, h, index[b, q, k], k]` (axis 2).
    """
    batch, heads = ops.shape(scores)[0], ops.shape(scores)[1]
    shape = (batch, heads, ops.shape(index)[1], ops.shape(index)[2])
    index = ops.broadcast_to(ops.expand_dims(index, 1), shape)
    return ops.take_along_axis(scores, index, axis=axis)


def exact_gelu(x):
    """The exact GELU, `x / 2 * (1 + erf(x / sqrt(2)))`, in a form every
    export can carry (Keras' TensorFlow GELU uses `Erfc`, which ONNX lacks;
    the `erf` form is torch's own formula)."""
    return 0.5 * x * (1.0 + ops.erf(x * (1.0 / math.sqrt(2.0))))


def layer_norm(x, gamma, beta, epsilon, size):
    """Layer normalization over the last axis of static `size`, or None where
    Keras' own `LayerNormalization` serves (here)."""
    return None


def works_in_place(tensors):
    """Whether a block of inference may update its logits in place (no
    gradient recorded through `tensors`, float32, not compiling): never
    here."""
    return False


def add_in_place(total, term):
    """`total + term`, into `total` where the backend works in place."""
    return total + term


def add_matmul_in_place(total, a, b):
    """`total + a @ b` (batched, `(batch, heads, rows, d) @ (batch, heads, d,
    keys)`), into `total` where the backend works in place."""
    return total + ops.matmul(a, b)


def multiply_in_place(total, factor):
    """`total * factor`, into `total` where the backend works in place."""
    return total * factor


def checkpoint(fn, rows, tensors, constants):
    """`fn(rows, tensors, constants)`, whose intermediates the backward pass
    recomputes instead of keeping (where the backend can; here: kept).

    `tensors` (a record, `_records`) are what the gradient flows to,
    `constants` (a record) are read only. `fn` must compute the same numbers when called again (no
    stateful random draw inside) and read every tensor from its arguments.
    """
    return fn(rows, tensors, constants)


def recomputed_blocks(fn, blocks, tensors, constants, key):
    """`fn(rows, tensors, constants)` for each block of queries (`slice`s, in
    order), concatenated on axis 1, each recomputed in the backward pass
    inside one loop; or None where the backend has no such loop (the caller
    then runs a Python loop of `checkpoint`s).

    `key`, hashable, determines `fn` (its computation, apart from the
    tensors): backends that compile the loop cache it by `key`.
    """
    return None


def attend_band(far_queries, far_constants, keys, values, band_queries, window_table,
                window_scores, window, key_mask):
    """The banded attention of every query at once on a fused kernel (see
    torch's), or None where the backend has none (here): the caller then
    runs the banded blocks.

    Query `i` reads the table's edge rows for the keys `j <= i + below` (far
    left: logits `far_queries[0]_i . k_j + far_constants[0]_i`) and `j >= i
    + above` (far right, likewise), and its window between: logits
    `(band_queries_i + window_table[t]) . k_j + window_scores[i, t]` for `j =
    i + below + 1 + t`.

    Args:
        far_queries: `(left, right)` `(batch, n, heads, d)`.
        far_constants: `(left, right)` `(batch, heads, n)`.
        keys: `(batch, n, heads, d)`; values `(batch, n, heads, dv)`.
        band_queries: `(batch, n, heads, d)`.
        window_table: `(w, heads, d)` or None; window_scores: broadcastable
            to `(batch, heads, n, w)` or None (`w = above - below - 1`).
        window: `(below, above)` Python ints.
        key_mask: `(batch, n)` bool (True: attend) or None.

    Returns:
        `(batch, n, heads, dv)`, or None.
    """
    return None


def traced(fn, tensors, constants, key):
    """`fn(tensors, constants)` (the blocks of one pooled call) as one traced
    function, cached by `key` (hashable, determining `fn`), where the backend
    runs op by op (eager TensorFlow: each op a dispatch); or None where it
    does not (here, and compiled or already traced callers): the caller then
    runs `fn` itself."""
    return None


def _traced_by_key(cache, trace, fn, tensors, constants, key):
    """`fn(tensors, constants)` through `trace(run)` (`tf.function`,
    `jax.jit`: a function of the records' leaves), made once per `key` and
    kept in `cache`, at most 64, the oldest dropped first. The records'
    structure is that of the first call with `key`, which determines it."""
    if key not in cache:
        if len(cache) >= 64:
            cache.pop(next(iter(cache)))
        tensors_skeleton, constants_skeleton = flatten(tensors)[1], flatten(constants)[1]

        def run(tensor_leaves, constant_leaves):
            return fn(rebuild(tensors_skeleton, tensor_leaves),
                      rebuild(constants_skeleton, constant_leaves))

        cache[key] = trace(run)
    return cache[key](flatten(tensors)[0], flatten(constants)[0])


def place_keys(outside, inside, start):
    """`outside` `(..., keys)` with `inside` `(..., width)` written over the
    keys from `start` on (`start + width <= keys`): a traced `start` (a
    loop's block) with `slice_update`, a Python int by concatenation."""
    if isinstance(start, int):
        width = inside.shape[-1]
        return ops.concatenate([outside[..., :start], inside, outside[..., start + width:]], -1)
    return ops.slice_update(outside, (0,) * (len(outside.shape) - 1) + (start,), inside)


def band_min_keys():
    """The keys from which the banded path is taken in the current context
    (eager, traced, compiled): below, the per-token path is faster
    (`benchmarks/band_crossover.py`). Here: always the band."""
    return 1


def fuses_band():
    """Whether the banded path's far keys run on a fused kernel
    (`attend_in_parts`), which holds no `(rows, keys)` tensor, forward or
    backward: its blocks need no bound on their size, nor recomputing."""
    return False


def attends_in_parts():
    """Whether the banded path's blocks of known rows are built in parts of
    keys (the far keys a plain dot product: `_blocks.band_in_parts`, on
    `attend_in_parts` where the backend has a fused kernel) rather than
    their position logits gathered over the band and filled in from the
    edge rows elsewhere (XLA fuses that whole)."""
    return True


def attend_in_parts(queries, constants, keys, values, band_queries, band_positions, band_keys,
                    key_mask):
    """The attention of a banded block on a fused kernel (see torch's), or
    None where the backend has none (here): the caller then joins the
    parts' logits and runs the one attention step.

    The keys split in three parts: before the band and after it, where the
    logits are `queries[p] . k_j + constants[p]_i` (a plain dot product plus
    a per-query constant), and the band, whose logits are `band_queries .
    k_j + band_positions`; masked keys as the attention step masks them.

    Args:
        queries: `(left, right)` `(batch, rows, heads, d)` scaled queries.
        constants: `(left, right)` `(batch, heads, rows)`.
        keys: `(batch, keys, heads, d)`; values `(batch, keys, heads, dv)`.
        band_queries: `(batch, rows, heads, d)`, for the keys `band_keys =
            (start, stop)` (Python ints), with `band_positions` `(batch, heads,
            rows, band keys)`.
        key_mask: `(batch, keys)` bool (True: attend) or None.

    Returns:
        `(batch, rows, heads, dv)` in the values' dtype, or None.
    """
    return None


__all__ = [name for name in dir()
           if not name.startswith("_") and name not in ("math", "ops", "flatten", "rebuild")]
