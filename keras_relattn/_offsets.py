"""Relative positions one block of queries at a time, and the table index.

The offsets of a block (`(batch or 1, rows, keys, coordinates)` integers)
come from one of three forms, each a small static description whose tensors
live apart, in a record (`_records`: so that a block can be recomputed, or
compiled once, from its inputs):

- `PairOffsets`: the `relative_positions` the caller gave, every pair's;
- `TokenOffsets`: `key - query` from each token's coordinates;
- `BoxOffsets`: edspdf's box offsets from the boxes of a page, with a leading
  (CLS) token that has no position terms.

A `FormedOffsets` (a form and its tensors) is what the layer reads wherever
it reads a `relative_positions` tensor.
"""

import dataclasses

from keras import ops

from typing import Any

from keras_relattn import _backend, _checks
from keras_relattn._records import Record
from keras_relattn._rows import take_rows

# Any offset beyond +-2**30 lies beyond any table: clamping there keeps the
# result and fits int32.
OFFSET_BOUND = 2**30


def table_index(offsets, n_positions):
    """`clip(n_positions // 2 + offsets, 0, n_positions - 1)`, right for every
    integer dtype, in the backend's index dtype.

    Widen, then clamp: narrow offsets (8 and 16 bits) are cast to int32
    first, so that bounds beyond their range cannot wrap; 64-bit and
    unsigned 32-bit offsets are clamped in their own dtype first, so that
    none wraps when cast. The offset is clamped *before* the half table is
    added, so that the sum cannot pass the int32 range either.
    """
    dtype = _checks.dtype_of(offsets)
    if dtype in ("int64", "uint32", "uint64"):
        bound = ops.cast(OFFSET_BOUND, dtype)
        if dtype == "int64":
            offsets = ops.clip(offsets, -bound, bound)
        else:
            offsets = ops.minimum(offsets, bound)
    offsets = ops.cast(offsets, _backend.get().INDEX_DTYPE)
    half = n_positions // 2
    return ops.clip(offsets, -half, n_positions - 1 - half) + half


@dataclasses.dataclass(frozen=True)
class PairTensors(Record):
    offsets: Any  # (batch or 1, queries, keys, coordinates) integers


@dataclasses.dataclass(frozen=True)
class PairOffsets:
    """The offsets as given (`PairTensors`)."""

    def rows(self, tensors, rows, keys=slice(None)):
        """`(batch or 1, rows, keys, coordinates)` offsets of the queries
        `rows` to the keys `keys` (a span of them, or all)."""
        return take_rows(take_rows(tensors.offsets, 1, rows), 2, keys)

    def position_factor(self, tensors, rows):
        """A 0/1 factor on the position terms of these rows, broadcastable
        to `(batch, rows, keys)`, or None (every pair has them)."""
        return None


@dataclasses.dataclass(frozen=True)
class TokenTensors(Record):
    query_positions: Any  # (batch or 1, queries, coordinates) int32
    key_positions: Any  # (batch or 1, keys, coordinates) int32


@dataclasses.dataclass(frozen=True)
class TokenOffsets:
    """`key - query` from each token's coordinates (`TokenTensors`), int32:
    the low 32 bits of any integer dtype, subtracted in
    wrapping int32 arithmetic, exact whenever the offset fits int32;
    `table_index` then clamps it to the table."""

    def rows(self, tensors, rows, keys=slice(None)):
        # `expand_dims`, not `x[:, None]`: LiteRT's converter makes that
        # index a `FlexStridedSlice`, which its builtin interpreter lacks.
        query = take_rows(tensors.query_positions, 1, rows)
        key = take_rows(tensors.key_positions, 1, keys)
        return ops.expand_dims(key, 1) - ops.expand_dims(query, 2)

    def position_factor(self, tensors, rows):
        return None


BOX_COLUMNS = ("xmin", "ymin", "ymax", "height")


@dataclasses.dataclass(frozen=True)
class BoxTensors(Record):
    """The boxes of each page, the leading token's box first."""

    xmin: Any  # (pages, tokens) float32
    ymin: Any  # (pages, tokens)
    ymax: Any  # (pages, tokens)
    height: Any  # (pages, tokens)
    has_terms: Any  # (1, tokens): 0 for the leading token, 1 elsewhere


@dataclasses.dataclass(frozen=True)
class BoxOffsets:
    """edspdf's box offsets (`box_pair_offsets`) from `BoxTensors`; the
    leading token's row and column lose their position terms. `scale` is
    the scale of the x offsets."""

    scale: int

    def rows(self, tensors, rows, keys=slice(None)):
        boxes = [getattr(tensors, name) for name in BOX_COLUMNS]
        return box_pair_offsets(  # `expand_dims`: see `TokenOffsets.rows`
            [ops.expand_dims(take_rows(c, 1, rows), 2) for c in boxes],
            [ops.expand_dims(c, 1) for c in boxes],
            self.scale,
        )

    def position_factor(self, tensors, rows):
        has_terms = tensors.has_terms
        query = take_rows(has_terms, 1, rows)
        return ops.expand_dims(query, 2) * ops.expand_dims(has_terms, 1)


@dataclasses.dataclass
class FormedOffsets:
    """Offsets formed block by block: a form (above) and its tensors' record."""

    form: object
    tensors: Record


def token_offsets(query_positions, key_positions):
    """`FormedOffsets` of per-token coordinates (see `TokenOffsets`)."""
    return FormedOffsets(TokenOffsets(), TokenTensors(
        query_positions=ops.cast(query_positions, "int32"),
        key_positions=ops.cast(key_positions, "int32"),
    ))


def sequence_offsets(queries, keys):
    """`FormedOffsets` of token indices (`sequence_positions=True`): each
    token of `queries` and `keys` `(batch, tokens, features)` numbered 0, 1,
    ... in its sequence."""
    return token_offsets(*(ops.arange(ops.shape(x)[1], dtype="int32")[None, :, None]
                           for x in (queries, keys)))


def default_key_positions(queries, keys, query_positions, key_positions):
    """`key_positions`, which default to `query_positions` when the keys are
    the queries (no keys given, or the same tensor)."""
    if key_positions is None and (keys is None or keys is queries):
        return query_positions
    return key_positions


def box_offsets(boxes, n_relative_positions, dtype):
    """`FormedOffsets` of edspdf's `BoxTransformerModule`: the offsets of the
    boxes of each page, with a leading token (the CLS) without position
    terms, as its `(pages, lines + 1, lines + 1, 2)` offsets and
    `(pages, lines + 1, lines + 1)` no-position mask would give, formed one
    block of queries at a time.

    Args:
        boxes: dict of `(pages, lines)` float tensors; `xmin`, `ymin`, `ymax`
            and `height` are read.
        n_relative_positions (int): the scale of the x offsets.
        dtype: dtype of the position factor (the logits').
    """
    # The leading token's box: finite offsets (height 1), which its position
    # factor of 0 then removes from the terms.
    leading = dict(xmin=0.0, ymin=0.0, ymax=0.0, height=1.0)
    tensors = {
        name: ops.pad(ops.convert_to_tensor(boxes[name], "float32"), [[0, 0], [1, 0]],
                      constant_values=leading[name])
        for name in BOX_COLUMNS
    }
    n_tokens = ops.shape(tensors["xmin"])[1]
    has_terms = ops.cast(ops.arange(n_tokens) > 0, dtype)[None]  # (1, tokens)
    return FormedOffsets(BoxOffsets(int(n_relative_positions)),
                         BoxTensors(**tensors, has_terms=has_terms))


def box_pair_offsets(query, key, n_relative_positions):
    """edspdf's box offsets (`positions.box_relative_positions`) of every
    pair of a query box and a key box: `query` and `key` are `(x0, y0, y1,
    height)` float32 tensors that broadcast against each other, `(pages,
    queries, 1)` and `(pages, 1, keys)`. The one formula of the whole-page
    helper and of `BoxOffsets`."""
    q_x0, q_y0, q_y1, q_height = query
    k_x0, k_y0, k_y1, k_height = key
    dx = ops.cast((k_x0 - q_x0) * n_relative_positions, "int32")
    dy = k_y0 - q_y0
    # The query's height when the key is below it (dy >= 0), else the key's.
    ref_height = ops.where(dy >= 0, q_height, k_height)
    dy0 = k_y1 - q_y0  # query top -> key bottom
    dy1 = k_y0 - q_y1  # query bottom -> key top
    offset = 0.5
    below = ops.logical_and(ops.sign(dy0 + offset) > 0, ops.sign(dy1 + offset) > 0)
    above = ops.logical_and(ops.sign(dy0 - offset) < 0, ops.sign(dy1 - offset) < 0)
    dy = ops.where(
        below,
        ops.ceil(ops.minimum(dy0, dy1) / ref_height + offset),
        ops.where(above, ops.floor(ops.maximum(dy0, dy1) / ref_height - offset), 0.0),
    )
    dy = ops.cast(ops.ceil(ops.abs(dy)) * ops.sign(dy), "int32")
    return ops.stack([dx, dy], axis=-1)
