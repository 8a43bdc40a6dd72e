"""Every invalid construction and call gets a clear error from the layer.

The table below is the README's "Errors" table: `python tests/test_errors.py`
prints it in Markdown from the real messages (on the current backend).
"""

import os
import re
import sys

import keras
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from keras_relattn import RelativeAttention  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


# (situation, thunk, exception, words the message must contain)
ROWS = [
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
]


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_raises_a_clear_error(row):
    _, thunk, exception, words = row
    with pytest.raises(exception) as info:
        thunk()
    assert words in str(info.value)


def test_readme_has_the_error_table():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    for situation, _, exception, _ in ROWS:
        assert f"| {situation} | `{exception.__name__}` |" in readme


def test_symbolic_inputs_fail_when_the_model_is_built():
    """Errors come at model construction, before any data flows."""
    q = keras.Input((None, 7))
    with pytest.raises(ValueError, match="query_size"):
        RelativeAttention(8, 2)(q, q, q)
    q = keras.Input((None, 8))
    rp = keras.Input((None, None, 3), dtype="int32")
    with pytest.raises(ValueError, match="n_coordinates"):
        layer_2d()(q, q, q, relative_positions=rp)


def markdown():
    lines = ["| situation | error | message (excerpt) |", "|---|---|---|"]
    for situation, thunk, exception, _ in ROWS:
        try:
            thunk()
        except exception as e:  # noqa: PERF203
            message = re.sub(r"\s+", " ", str(e)).split("Arguments received")[0]
            message = message.replace("Exception encountered when calling "
                                      "RelativeAttention.call(). ", "")
            message = re.sub(r"\x1b\[[0-9;]*m", "", message).strip().replace("|", "\\|")
        lines.append(f"| {situation} | `{exception.__name__}` | {message} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
