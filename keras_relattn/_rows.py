"""The queries of one block: a `slice` of them, or `BlockRows` in a loop
over equal blocks, and `take_rows`, which reads a tensor's rows by either.
The lowest floor of the pooled path: the backends' loops make `BlockRows`."""

from keras import ops

from keras_relattn import _checks


class BlockRows:
    """The queries of one block in a loop over equal blocks: `size` rows from
    `start`, a traced integer. Read wherever a `slice` of rows is."""

    def __init__(self, start, size):
        self.start = start
        self.size = size


def first_row(rows):
    """The number of a block's first query (0 for every query)."""
    return 0 if rows.start is None else rows.start


def take_rows(x, axis, rows):
    """`x`'s queries axis (`axis`) sliced to `rows` (a `slice` or
    `BlockRows`), unless it has size 1 (it broadcasts).

    A size not known statically may be 1 at run time: the rows are then
    taken by number, each clamped to the axis (so a broadcast axis gives its
    one row, repeated), never a Python test of that size.
    """
    size = _checks.shape_of(x)[axis]
    if size == 1 or (not isinstance(rows, BlockRows) and rows == slice(None)):
        return x
    if size is None and not _checks.is_guarded_size(x.shape[axis]):
        count = rows.size if isinstance(rows, BlockRows) else rows.stop - rows.start
        number = ops.arange(count, dtype="int32") + ops.cast(first_row(rows), "int32")
        last = ops.cast(ops.shape(x)[axis], "int32") - 1
        return ops.take(x, ops.minimum(number, last), axis=axis)
    if isinstance(rows, BlockRows):
        start = [0] * len(x.shape)
        start[axis] = rows.start
        shape = list(x.shape)
        shape[axis] = rows.size
        return ops.slice(x, start, shape)
    return x[(slice(None),) * axis + (rows,)]
