"""Checks of the tensors a call receives (shapes, dtypes, masks), symbolic
ones included, that raise clear errors before any backend op. (`_arguments`
checks constructor and function arguments.)"""

import keras
import numpy as np
from keras import ops

try:  # Keras keeps the mask accessor private; fall back to the attribute.
    from keras.src.backend.common.masking import get_keras_mask as _get_mask
except ImportError:  # pragma: no cover - depends on the Keras version
    def _get_mask(x):
        return getattr(x, "_keras_mask", None)


def shape_of(x):
    """Static shape as a tuple of ints, None for every dimension not known as
    an int (unknown, or symbolic as under `jax.export` or `torch.export`)."""
    shape = getattr(x, "shape", None)
    if shape is None:
        shape = ops.shape(ops.convert_to_tensor(x))
    return tuple(_static_dim(d) for d in shape)


def is_guarded_size(d):
    """Whether a size not known as an int is a torch symbolic size: those are
    never 1 (torch.compile specializes sizes 0 and 1) and any test of them
    is guarded (the graph is traced again when it changes)."""
    return type(d).__name__ == "SymInt"


def _static_dim(d):
    # torch's SymInt and jax's symbolic dimensions are not `int`s.
    return int(d) if isinstance(d, (int, np.integer)) else None


def dtype_of(x):
    return keras.backend.standardize_dtype(getattr(x, "dtype", type(x)))


def check_shape(name, got, expected, description, broadcast=()):
    """`expected` holds ints or None (unknown); raise on the first conflict.

    A size of 1 is accepted on each axis listed in `broadcast` (it
    broadcasts, as in edspdf).
    """
    got = tuple(got)
    ok = len(got) == len(expected)
    if ok:
        for axis, (g, e) in enumerate(zip(got, expected)):
            if g is None or e is None or g == e:
                continue
            if axis in broadcast and g == 1:
                continue
            ok = False
            break
    if not ok:
        raise ValueError(
            f"`{name}` has shape {got}, expected {description} = "
            f"{_show(expected)}."
        )


def check_mask(name, mask, batch, n_queries, n_keys, n_heads):
    shape = shape_of(mask)
    # Sizes of 1 broadcast (as in edspdf): on the batch, on the queries of a
    # 3-D or 4-D mask, and on the heads of a 4-D mask.
    forms = {
        2: ((batch, n_keys), "(batch, n_keys)", (0,)),
        3: ((batch, n_queries, n_keys), "(batch, n_queries, n_keys)", (0, 1, 2)),
        4: (
            (batch, n_queries, n_keys, n_heads),
            "(batch, n_queries, n_keys, n_heads) (pooling heads only)",
            (0, 1, 2, 3),
        ),
    }
    if len(shape) not in forms:
        raise ValueError(
            f"`{name}` has shape {shape}, expected one of "
            + ", ".join(f"{d} = {_show(e)}" for e, d, _ in forms.values())
            + "."
        )
    expected, description, broadcast = forms[len(shape)]
    check_shape(name, shape, expected, description, broadcast=broadcast)
    dtype = dtype_of(mask)
    if not (dtype == "bool" or "int" in dtype or "float" in dtype):
        raise TypeError(f"`{name}` must be bool or 0/1 numbers, got {dtype}.")


def check_integer(name, x):
    dtype = dtype_of(x)
    if "int" not in dtype:
        raise TypeError(
            f"`{name}` must have an integer dtype (int32 or int64), got "
            f"{dtype}."
        )


def as_bool(mask):
    if dtype_of(mask) == "bool":
        return mask
    return ops.not_equal(mask, 0)


def keras_mask_of(x):
    try:
        return _get_mask(x)
    except Exception:  # pragma: no cover - tensors that refuse attributes
        return None


def _show(shape):
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def feature_shapes(layer, q_shape, k_shape, v_shape):
    """The feature sizes of a `RelativeAttention` call's queries, keys and
    values (static shapes; unknown sizes pass)."""
    check_shape(
        "content_queries", q_shape, (None, None, layer.query_size),
        "(batch, n_queries, query_size)",
    )
    if k_shape is not None:
        check_shape(
            "content_keys", k_shape, (q_shape[0], None, layer.key_size),
            "(batch, n_keys, key_size)",
        )
    elif layer.query_size != layer.key_size:
        raise ValueError(
            "`content_keys` is required when `query_size` "
            f"({layer.query_size}) differs from `key_size` ({layer.key_size})."
        )
    if v_shape is not None:
        if not layer.do_pooling:
            raise ValueError(
                "`content_values` was given but the layer was built with "
                "`do_pooling=False`, so it has no value projection. Pass "
                "no values to get the logits, or use `do_pooling=True`."
            )
        n_keys = (k_shape if k_shape is not None else q_shape)[1]
        check_shape(
            "content_values", v_shape, (q_shape[0], n_keys, layer.value_size),
            "(batch, n_keys, value_size)",
        )


def call_inputs(
    layer, content_queries, content_keys, content_values, mask=None,
    relative_positions=None, no_position_mask=None, base_attn=None, position_embedding=None,
    query_positions=None, key_positions=None, return_logits=True, offsets_formed=False,
):
    """Every input of a `RelativeAttention` call (tensors or symbolic), before
    any backend op: a `ValueError` or `TypeError` naming the argument, the
    shape it got and the shape it expected. `offsets_formed`: the
    `relative_positions` were formed inside the package (`BoxTransformer`'s
    box offsets) from inputs already checked."""
    queries, keys, values = content_queries, content_keys, content_values
    if not return_logits and values is None:
        raise ValueError(
            "`return_logits=False` returns the pooled output alone, so it "
            "needs `content_values` (and `do_pooling=True`)."
        )
    q_shape = shape_of(queries)
    k_shape = None if keys is None else shape_of(keys)
    v_shape = None if values is None else shape_of(values)
    feature_shapes(layer, q_shape, k_shape, v_shape)
    # (batch, n_queries, n_keys): the sizes every other input is checked against.
    sizes = (q_shape[0], q_shape[1], (k_shape or q_shape)[1])
    _attention_inputs(layer, sizes, mask, base_attn, no_position_mask)
    _call_table(layer, position_embedding)
    _position_forms(layer, relative_positions, query_positions, key_positions,
                    position_embedding)
    if offsets_formed:
        return
    if relative_positions is not None:
        check_integer("relative_positions", relative_positions)
        check_shape(
            "relative_positions", shape_of(relative_positions),
            (*sizes, layer.n_coordinates),
            "(batch or 1, n_queries, n_keys, n_coordinates)",
            broadcast=(0, 1, 2),
        )
    elif query_positions is not None:
        _token_positions(layer, sizes, query_positions, key_positions)
    elif "c2c" not in layer.mode and not layer.sequence_positions:
        raise ValueError(
            f"`mode={layer.mode}` needs `relative_positions` (or "
            "`query_positions` and `key_positions`): without them no "
            "attention term can be computed."
        )


def _attention_inputs(layer, sizes, mask, base_attn, no_position_mask):
    """The mask, the base logits and the no-position mask, against `sizes`
    `(batch, n_queries, n_keys)`."""
    batch, n_queries, n_keys = sizes
    if mask is not None:
        check_mask("mask", mask, batch, n_queries, n_keys, layer.n_heads)
    if base_attn is not None:
        check_shape(
            "base_attn", shape_of(base_attn),
            (batch, n_queries, n_keys, layer.total_heads),
            "(batch, n_queries, n_keys, n_heads + n_additional_heads)",
            broadcast=(0, 1, 2, 3),
        )
    if no_position_mask is not None:
        check_shape(
            "no_position_mask", shape_of(no_position_mask),
            (batch, n_queries, n_keys), "(batch or 1, n_queries, n_keys)",
            broadcast=(0, 1, 2),
        )


def _call_table(layer, position_embedding):
    """A table passed at call time: the layer must have projections for it."""
    if position_embedding is None:
        return
    if layer.position_embedding_shape is None:
        raise ValueError(
            "A `position_embedding` table was passed at call time but "
            "the layer has no position projections: construct it "
            "with `position_embedding_shape=(None, position_size)`."
        )
    check_shape(
        "position_embedding", shape_of(position_embedding),
        (None, layer.position_embedding_shape[1]),
        "(n_positions, position_size)",
    )


def _position_forms(layer, relative_positions, query_positions, key_positions,
                    position_embedding):
    """The positions come in one form, and a table reads them."""
    given = "relative_positions"
    if layer.sequence_positions and (
            relative_positions is not None or query_positions is not None
            or key_positions is not None):
        raise ValueError(
            "This layer was built with `sequence_positions=True`: it forms the "
            "token-index positions itself, so pass no `relative_positions`, "
            "`query_positions` or `key_positions`.")
    if query_positions is not None or key_positions is not None:
        if relative_positions is not None:
            raise ValueError(
                "Pass the positions in one form: `relative_positions` "
                "(offsets of every key to every query), or per-token "
                "`query_positions` and `key_positions`, not both."
            )
        if query_positions is None or key_positions is None:
            raise ValueError(
                "`query_positions` and `key_positions` go together (when "
                "the keys are the queries, `key_positions` defaults to "
                "`query_positions`); got only "
                f"`{'key' if query_positions is None else 'query'}_positions`."
            )
        given = "query_positions"
    positional = [m for m in layer.mode if m != "c2c"]
    if (relative_positions is None and query_positions is None) or not positional:
        return
    if layer.position_embedding_shape is None:
        raise ValueError(
            f"`{given}` was given but the layer has no "
            "position table: pass `position_embedding` to the "
            "constructor."
        )
    if not layer.owns_table and position_embedding is None:
        raise ValueError(
            f"`{given}` was given but no table: this layer "
            "was built with `position_embedding_shape=(None, "
            f"{layer.position_embedding_shape[1]})`, so pass the table "
            "at call time as `position_embedding=`."
        )


def _token_positions(layer, sizes, query_positions, key_positions):
    """`query_positions` and `key_positions`: integer `(batch or 1, length,
    n_coordinates)`."""
    batch, n_queries, n_keys = sizes
    for name, tokens, length in (
        ("query_positions", query_positions, n_queries),
        ("key_positions", key_positions, n_keys),
    ):
        if tokens is None:
            continue
        check_integer(name, tokens)
        check_shape(
            name, shape_of(tokens), (batch, length, layer.n_coordinates),
            f"(batch or 1, {'n_queries' if name[0] == 'q' else 'n_keys'}, "
            "n_coordinates)",
            broadcast=(0,),
        )
