"""Relative positions for `RelativeAttention`, written with `keras.ops`.

The `*_relative_positions` helpers return *key minus query* offsets, the
sign convention of edspdf's box positions, shaped `(batch or 1, n_queries,
n_keys, n_coordinates)` so that the result feeds `relative_positions`
directly. `sequence_positions` and `grid_positions` return each token's
coordinates, `(1, length, n_coordinates)`, for `query_positions` /
`key_positions`: the layer then forms the offsets block by block.
They run on every backend and inside models (on symbolic tensors too).
"""

import functools
import math

import keras
import numpy as np
from keras import ops

from keras_relattn import _arguments
from keras_relattn._offsets import OFFSET_BOUND as _OFFSET_BOUND
from keras_relattn._offsets import box_pair_offsets


def sequence_relative_positions(query_length, key_length=None):
    """Offsets of 1-D sequences: `key index - query index`.

    Args:
        query_length (int | Tensor): int or scalar tensor, number of queries.
        key_length (int | Tensor | None): int or scalar tensor, number of keys. Defaults to
            `query_length`.

    Returns:
        Tensor: int32 tensor `(1, query_length, key_length, 1)`; one tensor serves
        the whole batch (the layer broadcasts a batch of 1).

    Examples:
        >>> import keras
        >>> from keras_relattn.positions import sequence_relative_positions
        >>> p = sequence_relative_positions(3)
        >>> keras.ops.convert_to_numpy(p)[0, :, :, 0].tolist()
        [[0, 1, 2], [-1, 0, 1], [-2, -1, 0]]

    References:
        - Shaw et al., "Self-Attention with Relative Position
          Representations", NAACL 2018.
    """
    key_length = query_length if key_length is None else key_length
    queries = ops.arange(query_length, dtype="int32")
    keys = ops.arange(key_length, dtype="int32")
    offsets = keys[None, :] - queries[:, None]
    return offsets[None, :, :, None]


def grid_relative_positions(height, width):
    """Offsets between the patches of a `height x width` grid (row-major).

    Args:
        height (int): rows of the grid.
        width (int): columns of the grid.

    Returns:
        Tensor: int32 tensor `(1, height * width, height * width, 2)`: coordinate 0
        is the column (x) offset, coordinate 1 the row (y) offset, both key
        minus query. Patch `i` sits at row `i // width`, column `i % width`.

    Examples:
        >>> import keras
        >>> from keras_relattn.positions import grid_relative_positions
        >>> p = keras.ops.convert_to_numpy(grid_relative_positions(2, 3))
        >>> p.shape, p[0, 0, 5].tolist()  # from patch (0, 0) to patch (1, 2)
        ((1, 6, 6, 2), [2, 1])

    References:
        - Wu et al., "Rethinking and Improving Relative Position Encoding
          for Vision Transformer", ICCV 2021 (2-D relative positions).
    """
    index = ops.arange(height * width, dtype="int32")
    rows, cols = index // width, index % width
    dx = cols[None, :] - cols[:, None]
    dy = rows[None, :] - rows[:, None]
    return ops.stack([dx, dy], axis=-1)[None]


def sequence_positions(length):
    """Each token's coordinate in a 1-D sequence: its index.

    The per-token form of `sequence_relative_positions`: pass it as
    `query_positions` (and `key_positions`) and the layer forms the offsets
    block by block, never a `(length, length)` tensor.

    Args:
        length (int | Tensor): int or scalar tensor, number of tokens.

    Returns:
        Tensor: int32 tensor `(1, length, 1)`; one tensor serves the whole batch.

    Examples:
        >>> import keras
        >>> from keras_relattn.positions import sequence_positions
        >>> keras.ops.convert_to_numpy(sequence_positions(3))[0, :, 0].tolist()
        [0, 1, 2]

    References:
        - Su et al., "RoFormer: Enhanced Transformer with Rotary Position
          Embedding", 2021 (positions given per token, not per pair).
    """
    return ops.arange(length, dtype="int32")[None, :, None]


def grid_positions(height, width):
    """Each patch's coordinates in a `height x width` grid (row-major).

    The per-token form of `grid_relative_positions`: coordinate 0 is the
    column (x), coordinate 1 the row (y), so that `key - query` gives the
    same offsets.

    Args:
        height (int): rows of the grid.
        width (int): columns of the grid.

    Returns:
        Tensor: int32 tensor `(1, height * width, 2)`.

    Examples:
        >>> import keras
        >>> from keras_relattn.positions import grid_positions
        >>> keras.ops.convert_to_numpy(grid_positions(2, 3))[0].tolist()
        [[0, 0], [1, 0], [2, 0], [0, 1], [1, 1], [2, 1]]

    References:
        - Wu et al., "Rethinking and Improving Relative Position Encoding
          for Vision Transformer", ICCV 2021 (2-D relative positions).
    """
    index = ops.arange(height * width, dtype="int32")
    return ops.stack([index % width, index // width], axis=-1)[None]


def box_relative_positions(x0, y0, x1, y1, width, height, n_relative_positions):
    """Relative positions of boxes on pages, as edspdf computes them.

    Equal to `edspdf.utils.torch.compute_pdf_relative_positions`: the x
    offset is the difference of the boxes' left edges times
    `n_relative_positions`, truncated to an integer; the y offset counts, in
    line heights, the vertical gap between two boxes (0 where they overlap
    vertically), signed key minus query. (`x1` and `width` are accepted
    for parity and, as in edspdf, unused.)

    Args:
        x0 (Tensor): float tensor `(pages, boxes)`, the boxes' left edges, in page
            units (edspdf uses coordinates relative to the page, in [0, 1]).
        y0 (Tensor): float tensor `(pages, boxes)`, top edges.
        x1 (Tensor): float tensor `(pages, boxes)`, right edges (unused, as in edspdf).
        y1 (Tensor): float tensor `(pages, boxes)`, bottom edges.
        width (Tensor): float tensor `(pages, boxes)`, box widths (unused, as in
            edspdf).
        height (Tensor): float tensor `(pages, boxes)`, box heights.
        n_relative_positions (int): the scale of the x offsets (the size of
            edspdf's position table).

    Returns:
        Tensor: int32 tensor `(pages, boxes, boxes, 2)` (x offset, y offset).

    Examples:
        >>> import numpy as np, keras
        >>> from keras_relattn.positions import box_relative_positions
        >>> x0 = np.array([[0.1, 0.5]]); x1 = x0 + 0.2
        >>> y0 = np.array([[0.1, 0.3]]); y1 = y0 + 0.05
        >>> p = box_relative_positions(x0, y0, x1, y1, x1 - x0, y1 - y0, 64)
        >>> keras.ops.convert_to_numpy(p)[0].tolist()
        [[[0, 0], [25, 4]], [[-25, -4], [0, 0]]]

    References:
        - edspdf, `edspdf.utils.torch.compute_pdf_relative_positions`.
    """
    x0, y0, y1, height = (
        ops.convert_to_tensor(t, dtype="float32") for t in (x0, y0, y1, height)
    )
    return box_pair_offsets(
        (x0[:, :, None], y0[:, :, None], y1[:, :, None], height[:, :, None]),
        (x0[:, None, :], y0[:, None, :], y1[:, None, :], height[:, None, :]),
        n_relative_positions,
    )


def log_bucket_positions(relative_positions, bucket_size, max_position):
    """DeBERTa's log buckets: exact near 0, logarithmic further away.

    Offsets with `|r| <= bucket_size // 2` are kept; larger ones map to
    `sign(r) * (mid + ceil(log(|r| / mid) / log((max_position - 1) / mid)
    * (mid - 1)))` with `mid = bucket_size // 2`, so offsets up to
    `max_position` fit a table of about `bucket_size` rows per side. This is
    DeBERTa-v2/v3's `make_log_bucket_position`, in its order of operations
    and in float32, bucket for bucket.

    That formula puts some offsets within a rounding error of a bucket's
    edge (`|r| = max_position - 1` gives exactly `mid - 1` before the
    `ceil`), where a backend's `log`, one ulp off, would move them to the
    next bucket. So the edges are found once, in NumPy, with correctly
    rounded float32 arithmetic, and each offset's bucket from the float
    formula is checked against its two edges, in integers: every backend,
    eager or compiled, gives the same buckets.

    Args:
        relative_positions (Tensor): integer tensor of offsets, any shape.
        bucket_size (int): number of exact positions (both signs together).
        max_position (int): the largest offset expected.

    Returns:
        Tensor: int32 tensor of the same shape. Use a table of
        `2 * bucket_size` (or more) rows, or any size: the layer clamps.

    Examples:
        >>> import keras
        >>> from keras_relattn.positions import log_bucket_positions
        >>> r = keras.ops.convert_to_tensor([0, 3, -4, 10, 100, -500])
        >>> p = log_bucket_positions(r, 8, 512)
        >>> keras.ops.convert_to_numpy(p).tolist()
        [0, 3, -4, 5, 6, -7]

    References:
        - He et al., "DeBERTa: Decoding-enhanced BERT with Disentangled
          Attention", ICLR 2021 (log buckets: DeBERTa-v2/v3 code).
    """
    bucket_size, max_position = _arguments.bucket_arguments(bucket_size, max_position)
    mid = bucket_size // 2
    edges_found, complete = _bucket_edges(bucket_size, max_position)
    n_edges = len(edges_found)
    rel = _clamped_offsets(relative_positions)
    size = ops.abs(rel)
    far = size > mid
    size_far = ops.where(far, size, mid + 1)
    # DeBERTa's float32 formula: the bucket past `mid`, right or one off.
    ratio = ops.cast(size_far, "float32") / np.float32(mid)
    scaled = ops.log(ratio) / np.float32(_log_ratio(bucket_size, max_position))
    guess = ops.cast(ops.ceil(scaled * np.float32(mid - 1)), "int32")
    # Checked against the exact edges: `edges[n - 1] <= |r| < edges[n]`.
    edges = ops.convert_to_tensor(edges_found)
    n = ops.clip(guess, 1, n_edges)
    below = ops.take(edges, n - 1)
    above = ops.take(edges, ops.minimum(n, n_edges - 1))
    n = ops.where(size_far < below, n - 1, ops.where(
        ops.logical_and(n < n_edges, size_far >= above), n + 1, n))
    if not complete:  # beyond the edges found (max_position barely past mid): the formula
        n = ops.where(guess > n_edges, guess, n)
    return ops.where(far, ops.sign(rel) * (mid + n), rel)


# At most this many bucket edges are found exactly (256 KiB of int32): every
# offset up to 2**30 for any `max_position >= 1.5 * mid` or so.
_MAX_EDGES = 2**16


def _clamped_offsets(offsets):
    """Integer offsets as int32, clamped to +-2**30 while still in their own
    dtype (JAX without x64 would wrap a converted int64)."""
    if isinstance(offsets, (list, tuple, np.ndarray, np.integer, int)):
        offsets = np.asarray(offsets)
        if offsets.dtype.kind not in "iu":
            raise TypeError(
                f"`relative_positions` must have an integer dtype, got {offsets.dtype}."
            )
        offsets = np.clip(offsets, -_OFFSET_BOUND, _OFFSET_BOUND).astype("int32")
    offsets = ops.convert_to_tensor(offsets)
    dtype = keras.backend.standardize_dtype(offsets.dtype)
    if "int" not in dtype:
        raise TypeError(f"`relative_positions` must have an integer dtype, got {dtype}.")
    if dtype != "int32":
        bound = ops.cast(_OFFSET_BOUND, dtype)
        offsets = ops.minimum(offsets, bound)
        if not dtype.startswith("u"):
            offsets = ops.maximum(offsets, -bound)
    return ops.clip(ops.cast(offsets, "int32"), -_OFFSET_BOUND, _OFFSET_BOUND)


def _log_ratio(bucket_size, max_position):
    """`log((max_position - 1) / mid)` as DeBERTa computes it: the ratio in
    Python, then a float32 tensor, then its (correctly rounded) log."""
    ratio = np.float32((max_position - 1) / (bucket_size // 2))
    return np.float32(np.log(np.float64(ratio)))


def _exact_buckets(size, bucket_size, max_position):
    """DeBERTa's bucket past `mid`, `ceil(log(size / mid) / log_ratio *
    (mid - 1))`, for int64 `size > mid`, each float32 operation correctly
    rounded (computed in float64, which holds every float32 product and
    quotient exactly enough to round it once)."""
    mid = bucket_size // 2
    ratio = np.float32(size.astype(np.float32).astype(np.float64) / mid)
    log = np.log(ratio.astype(np.float64)).astype(np.float32)
    scaled = np.float32(log.astype(np.float64) / np.float64(_log_ratio(bucket_size, max_position)))
    return np.ceil(np.float32(scaled.astype(np.float64) * (mid - 1))).astype(np.int64)


def _buckets_in_numpy(offsets, bucket_size, max_position):
    """`log_bucket_positions` in NumPy (int64 offsets, clamped to +-2**30),
    with the exact float32 arithmetic its edges are found with."""
    offsets = np.clip(np.asarray(offsets, np.int64), -_OFFSET_BOUND, _OFFSET_BOUND)
    mid = bucket_size // 2
    size = np.abs(offsets)
    far = _exact_buckets(np.maximum(size, mid + 1), bucket_size, max_position) + mid
    return np.where(size > mid, np.sign(offsets) * far, offsets)


@functools.lru_cache(maxsize=64)
def _bucket_edges(bucket_size, max_position):
    """`(edges, complete)`: `edges[n - 1]` is the smallest offset whose
    bucket is `mid + n` (n >= 1), int32, for every bucket up to the one of
    offset 2**30 (`complete`), or the first `_MAX_EDGES` of them. Buckets
    grow with the offset, so each edge is found by a binary search, all at
    once."""
    mid = bucket_size // 2
    last = int(_exact_buckets(np.array([_OFFSET_BOUND]), bucket_size, max_position)[0])
    targets = np.arange(1, min(last, _MAX_EDGES) + 1, dtype=np.int64)
    low = np.full(targets.shape, mid + 1, np.int64)
    high = np.full(targets.shape, _OFFSET_BOUND + 1, np.int64)
    while np.any(low < high):
        middle = (low + high) // 2
        reached = _exact_buckets(middle, bucket_size, max_position) >= targets
        high = np.where(reached, middle, high)
        low = np.where(reached, low, middle + 1)
    return low.astype(np.int32), last <= _MAX_EDGES


def sinusoidal_table(n_positions, size, temperature=10000.0):
    """The fixed sinusoidal table of edspdf's `SinusoidalEmbedding`.

    Row `p`, channel `2i` is `sin(p / temperature ** (2i / size))` and
    channel `2i + 1` the matching cosine.

    Args:
        n_positions (int): rows of the table.
        size (int): channels (even or odd, as edspdf).
        temperature (float): controls the range of frequencies.

    Returns:
        numpy.ndarray: float32 numpy array `(n_positions, size)`, ready for
        `RelativeAttention(position_embedding=...)`.

    Examples:
        >>> from keras_relattn import sinusoidal_table
        >>> t = sinusoidal_table(4, 6)
        >>> t.shape, float(t[0, 1])
        ((4, 6), 1.0)

    References:
        - edspdf, `edspdf.layers.sinusoidal_embedding.SinusoidalEmbedding`.
        - Vaswani et al., "Attention Is All You Need", NeurIPS 2017.
    """
    position = np.arange(n_positions, dtype=np.float32)[:, None]
    div_term = np.exp(
        np.arange(0, size, 2, dtype=np.float32) * (-math.log(temperature) / size)
    ).astype(np.float32)
    angles = (position * div_term).astype(np.float32)
    table = np.zeros((n_positions, size), dtype=np.float32)
    table[:, 0::2] = np.sin(angles)
    table[:, 1::2] = np.cos(angles[:, : size // 2])
    return table
