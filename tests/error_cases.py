"""Every invalid construction and call of `RelativeAttention`, with the error
it must raise: the cases of tests/test_errors.py and the README's "Errors" table
(`python tests/test_errors.py` prints that table from the real messages)."""

from typing import Callable, NamedTuple

import numpy as np

from keras_relattn import (
    BoxTransformer, PositionTable, RelativeAttention, RelativeTransformerLayer,
)


def table(n=9, features=4):
    return np.zeros((n, features), "float32")


def layer_2d(**kwargs):
    return RelativeAttention(8, 2, position_embedding=table(), n_coordinates=2, **kwargs)


def x(*shape, dtype="float32"):
    return np.ones(shape, dtype)


def call(layer=None, **kwargs):
    layer = layer or layer_2d()
    inputs = dict(content_queries=x(2, 3, 8), content_values=x(2, 3, 8),
                  relative_positions=x(2, 3, 3, 2, dtype="int32"))
    inputs.update(kwargs)
    inputs = {k: v for k, v in inputs.items() if v is not None}
    return lambda: layer(**inputs)


def box_call(drop=None, lines=None, as_list=False):
    """A `BoxTransformer` call on 2 pages of 3 lines, its boxes spoilt."""
    keys = ("xmin", "ymin", "xmax", "ymax", "width", "height")
    boxes = {k: x(2, (lines or {}).get(k, 3)) for k in keys if k != drop}
    layer = BoxTransformer(8, n_relative_positions=16)
    return lambda: layer(x(2, 3, 8), list(boxes.values()) if as_list else boxes)


class ErrorCase(NamedTuple):
    situation: str  # the README table's first column
    run: Callable[[], object]  # raises
    error: type  # ValueError or TypeError
    words: str  # what the message must contain


CASES = [ErrorCase(*row) for row in [
    ("`size` not divisible by `n_heads` (with pooling)",
     lambda: RelativeAttention(10, 3, head_size=4), ValueError, "`size` (10)"),
    ("`key_size` not divisible by `n_heads` (no `head_size`)",
     lambda: RelativeAttention(12, 3, key_size=10), ValueError, "`key_size` (10)"),
    ("`head_size` not divisible by `n_coordinates`",
     lambda: RelativeAttention(8, 2, head_size=3, n_coordinates=2,
                               position_embedding=table()),
     ValueError, "`head_size` (3)"),
    ("table feature size not divisible by `n_coordinates`",
     lambda: RelativeAttention(8, 2, n_coordinates=2, position_embedding=table(9, 5)),
     ValueError, "feature size (5"),
    ("`n_heads < 1`", lambda: RelativeAttention(8, 0), ValueError, "`n_heads` must be >= 1"),
    ("`n_heads` not an int", lambda: RelativeAttention(8, 2.5), TypeError, "`n_heads`"),
    ("unknown `mode` name", lambda: RelativeAttention(8, 2, mode=("c2c", "p2p")),
     ValueError, "unknown term"),
    ("empty `mode`", lambda: RelativeAttention(8, 2, mode=()), ValueError, "`mode`"),
    ("`mode` of position terms only, without a table",
     lambda: RelativeAttention(8, 2, mode=("c2p",)), ValueError, "no term that can be computed"),
    ("`n_coordinates < 1`", lambda: RelativeAttention(8, 2, n_coordinates=0),
     ValueError, "`n_coordinates` must be >= 1"),
    ("negative `n_additional_heads`",
     lambda: RelativeAttention(8, 2, n_additional_heads=-1), ValueError,
     "`n_additional_heads` must be >= 0"),
    ("`same_key_query_proj` with different query and key sizes",
     lambda: RelativeAttention(8, 2, query_size=6, same_key_query_proj=True),
     ValueError, "query_size=6, key_size=8"),
    ("`dropout_p` outside [0, 1)", lambda: RelativeAttention(8, 2, dropout_p=1.0),
     ValueError, "`dropout_p`"),
    ("`position_embedding` not 2-D", lambda: RelativeAttention(8, 2, position_embedding=np.zeros(4)),
     ValueError, "(n_positions, position_size)"),
    ("`relative_positions` last axis is not `n_coordinates`",
     call(relative_positions=x(2, 3, 3, 1, dtype="int32")), ValueError,
     "`relative_positions` has shape (2, 3, 3, 1), expected"),
    ("`relative_positions` lengths differ from the queries/keys",
     call(relative_positions=x(2, 3, 4, 2, dtype="int32")), ValueError,
     "(batch or 1, n_queries, n_keys, n_coordinates) = (2, 3, 3, 2)"),
    ("`relative_positions` batch neither 1 nor the batch",
     call(relative_positions=x(3, 3, 3, 2, dtype="int32")), ValueError,
     "`relative_positions` has shape (3, 3, 3, 2)"),
    ("`relative_positions` of a float dtype", call(relative_positions=x(2, 3, 3, 2)),
     TypeError, "integer dtype"),
    ("`relative_positions` given to a layer without a table",
     call(RelativeAttention(8, 2)), ValueError, "has no position table"),
    ("position-only `mode` called without `relative_positions`",
     call(layer_2d(mode=("c2p",)), relative_positions=None), ValueError,
     "needs `relative_positions`"),
    ("`mask` of rank 1 or 5", call(mask=x(2, dtype="bool")), ValueError,
     "`mask` has shape (2,), expected one of"),
    ("`mask` whose keys axis is wrong", call(mask=x(2, 4, dtype="bool")), ValueError,
     "(batch, n_keys) = (2, 3)"),
    ("4-D `mask` with a wrong head count", call(mask=x(2, 3, 3, 3, dtype="bool")),
     ValueError, "(batch, n_queries, n_keys, n_heads) (pooling heads only) = (2, 3, 3, 2)"),
    ("`no_position_mask` of the wrong shape",
     call(no_position_mask=x(2, 3, dtype="bool")), ValueError,
     "`no_position_mask` has shape (2, 3)"),
    ("`base_attn` with a wrong head count", call(base_attn=x(2, 3, 3, 5)),
     ValueError, "n_heads + n_additional_heads) = (2, 3, 3, 2)"),
    ("`content_values` length differs from the keys'",
     call(content_values=x(2, 4, 8)), ValueError, "`content_values` has shape (2, 4, 8)"),
    ("`content_queries` of the wrong feature size", call(content_queries=x(2, 3, 7)),
     ValueError, "(batch, n_queries, query_size) = (?, ?, 8)"),
    ("`content_queries` not 3-D", call(content_queries=x(3, 8)), ValueError,
     "`content_queries` has shape (3, 8)"),
    ("`content_keys` of the wrong feature size",
     call(content_keys=x(2, 3, 6)), ValueError, "(batch, n_keys, key_size) = (2, ?, 8)"),
    ("`content_values` with `do_pooling=False`", call(layer_2d(do_pooling=False)),
     ValueError, "`do_pooling=False`"),
    ("`size=None` (logits only) without `key_size`",
     lambda: RelativeAttention(None, 2, query_size=8, do_pooling=False), ValueError,
     "`key_size` is required"),
    ("`return_logits=False` without values",
     call(content_values=None, return_logits=False), ValueError, "`return_logits=False`"),
    ("3-D `mask` whose queries axis neither 1 nor the queries'",
     call(mask=x(2, 2, 3, dtype="bool")), ValueError, "`mask` has shape (2, 2, 3)"),
    ("`sequence_positions=True` with `n_coordinates` other than 1",
     lambda: RelativeAttention(8, 2, sequence_positions=True, n_coordinates=2,
                               position_embedding=table()),
     ValueError, "n_coordinates=2"),
    ("`sequence_positions=True` without a table",
     lambda: RelativeAttention(8, 2, sequence_positions=True), ValueError, "no position table"),
    ("`relative_positions` given to a `sequence_positions=True` layer",
     call(RelativeAttention(8, 2, sequence_positions=True, position_embedding=table()),
          relative_positions=x(2, 3, 3, 1, dtype="int32")),
     ValueError, "`relative_positions`"),
    ("`tied_position_projections=True` without a table",
     lambda: RelativeAttention(8, 2, tied_position_projections=True), ValueError, "no table"),
    ("`position_buckets` not a `(bucket_size, max_position)` pair",
     lambda: RelativeAttention(8, 2, position_buckets=8), TypeError, "`position_buckets`"),
    ("`position_buckets` with `bucket_size < 4`",
     lambda: RelativeAttention(8, 2, position_buckets=(2, 8)), ValueError, "bucket_size"),
    ("`position_dropout_p` outside [0, 1)",
     lambda: RelativeAttention(8, 2, position_dropout_p=1.5), ValueError,
     "`position_dropout_p`"),
    ("`PositionTable` size not an int", lambda: PositionTable(9, 4.5), TypeError, "`size`"),
    ("`RelativeTransformerLayer` `input_size` not divisible by `num_heads`",
     lambda: RelativeTransformerLayer(10, num_heads=3), ValueError, "`input_size` (10)"),
    ("`RelativeTransformerLayer` `num_heads < 1`",
     lambda: RelativeTransformerLayer(8, num_heads=0), ValueError, "`num_heads` must be >= 1"),
    ("`BoxTransformer` `n_layers < 1`", lambda: BoxTransformer(8, n_layers=0), ValueError,
     "`n_layers` must be >= 1"),
    ("`BoxTransformer` boxes without a key", box_call(drop="height"), ValueError,
     "`boxes` lacks ['height']"),
    ("`BoxTransformer` boxes of other lines than `embeds`", box_call(lines={"ymin": 4}),
     ValueError, "`boxes['ymin']` has shape (2, 4)"),
    ("`BoxTransformer` boxes not a dict", box_call(as_list=True), TypeError,
     "`boxes` must be a dict"),
]]
