"""Argument and shape checks that raise clear errors before any backend op."""

import keras
import numpy as np
from keras import ops

try:  # Keras keeps the mask accessor private; fall back to the attribute.
    from keras.src.backend.common.masking import get_keras_mask as _get_mask
except ImportError:  # pragma: no cover - depends on the Keras version
    def _get_mask(x):
        return getattr(x, "_keras_mask", None)


def positive_int(name, value, default=None):
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        if hasattr(value, "__index__") and not isinstance(value, bool):
            value = int(value)
        else:
            raise TypeError(
                f"`{name}` must be a positive int. Received: {name}={value!r}"
            )
    if value < 1:
        raise ValueError(f"`{name}` must be >= 1. Received: {name}={value}")
    return value


def non_negative_int(name, value):
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(
            f"`{name}` must be an int >= 0. Received: {name}={value!r}"
        )
    value = int(value)
    if value < 0:
        raise ValueError(f"`{name}` must be >= 0. Received: {name}={value}")
    return value


MODES = ("c2c", "c2p", "p2c")


def dropout_rate(name, value):
    """A dropout rate in [0, 1), as a float."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be a number. Received: {name}={value!r}") from None
    if not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be in [0, 1). Received: {name}={value}")
    return value


def normalize_mode(value):
    """The attention terms, in the caller's order (it is part of the config),
    without repeats: edspdf only tests membership."""
    if isinstance(value, str):
        value = (value,)
    try:
        value = tuple(value)
    except TypeError:
        raise TypeError(
            f"`mode` must be a sequence of names among {MODES}. "
            f"Received: mode={value!r}"
        ) from None
    if not value:
        raise ValueError(f"`mode` must name at least one of {MODES}. Received: mode=()")
    unknown = [m for m in value if m not in MODES]
    if unknown:
        raise ValueError(
            f"`mode` contains unknown term(s) {unknown}; the known terms are "
            f"{MODES}. Received: mode={value!r}"
        )
    return tuple(dict.fromkeys(value))


def table_shape(position_embedding, position_embedding_shape):
    """`(n_positions, position_size)` of the table an attention layer is
    given (`n_positions` None: passed at call time), or None."""
    if position_embedding is not None and position_embedding_shape is not None:
        raise ValueError(
            "Pass either `position_embedding` (an array) or "
            "`position_embedding_shape`, not both."
        )
    if position_embedding is not None:
        shape = tuple(int(d) for d in position_embedding.shape)
        name = "position_embedding"
    elif position_embedding_shape is not None:
        shape = tuple(None if d is None else int(d) for d in position_embedding_shape)
        name = "position_embedding_shape"
    else:
        return None
    if len(shape) != 2 or shape[1] is None or min(d or 1 for d in shape) < 1:
        raise ValueError(
            f"`{name}` must describe a table of shape "
            f"(n_positions, position_size) with both sizes >= 1 "
            "(n_positions may be None for a table passed at call time). "
            f"Received shape {shape}"
        )
    return shape


def attention_arguments(
    size, n_heads, query_size, key_size, value_size, head_size, dropout_p,
    same_key_query_proj, n_coordinates, do_pooling, mode, n_additional_heads,
    position_embedding, position_embedding_shape,
):
    """`RelativeAttention`'s constructor arguments, checked and completed with
    edspdf's defaults, as a dict of attribute values."""
    if size is None and not do_pooling:
        # A logits-only layer needs no output size (as in edspdf), but then
        # nothing gives the query and key sizes a default.
        for name, value in (("query_size", query_size), ("key_size", key_size)):
            if value is None:
                raise ValueError(
                    f"`{name}` is required when `size` is None (a logits-only "
                    "layer, `do_pooling=False`)."
                )
    else:
        size = positive_int("size", size)
    n_heads = positive_int("n_heads", n_heads)
    query_size = positive_int("query_size", query_size, size)
    key_size = positive_int("key_size", key_size, size)
    value_size = positive_int("value_size", value_size, key_size)
    n_coordinates = positive_int("n_coordinates", n_coordinates)
    n_additional_heads = non_negative_int("n_additional_heads", n_additional_heads)
    if head_size is None:
        if key_size % n_heads:
            raise ValueError(
                f"`key_size` ({key_size}) must be divisible by `n_heads` "
                f"({n_heads}) when `head_size` is not given."
            )
        head_size = key_size // n_heads
    head_size = positive_int("head_size", head_size)
    if do_pooling and size % n_heads:
        raise ValueError(
            f"`size` ({size}) must be divisible by `n_heads` ({n_heads}) when "
            "`do_pooling=True`: each head pools `size // n_heads` value features."
        )
    dropout_p = dropout_rate("dropout_p", dropout_p)
    if same_key_query_proj and query_size != key_size:
        raise ValueError(
            "`same_key_query_proj=True` needs `query_size == key_size`. "
            f"Received: query_size={query_size}, key_size={key_size}"
        )
    terms = normalize_mode(mode)
    table = table_shape(position_embedding, position_embedding_shape)
    if table is None and "c2c" not in terms:
        raise ValueError(
            f"`mode={terms}` has no term that can be computed: the position "
            "terms need a position table (`position_embedding`) and 'c2c' is "
            "not in `mode`."
        )
    if table is not None:
        if table[1] % n_coordinates:
            raise ValueError(
                f"The position table's feature size ({table[1]}, table shape "
                f"{table}) must be divisible by `n_coordinates` ({n_coordinates})."
            )
        if head_size % n_coordinates:
            raise ValueError(
                f"`head_size` ({head_size}) must be divisible by `n_coordinates` "
                f"({n_coordinates}): each head is split in one chunk per coordinate."
            )
    return dict(
        size=size, n_heads=n_heads, query_size=query_size, key_size=key_size,
        value_size=value_size, head_size=head_size, dropout_p=dropout_p,
        n_coordinates=n_coordinates, mode=terms,
        n_additional_heads=n_additional_heads, position_embedding_shape=table,
    )


def sequence_positions(value, table_shape, n_coordinates):
    """`sequence_positions`, checked against the table and coordinates."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(
            f"`sequence_positions` must be a bool. Received: sequence_positions={value!r}")
    if value and table_shape is None:
        raise ValueError(
            "`sequence_positions=True` forms token-index positions for the position "
            "terms, but the layer has no position table: pass `position_embedding` "
            "(or `position_embedding_shape`).")
    if value and n_coordinates != 1:
        raise ValueError(
            "`sequence_positions=True` numbers the tokens of a sequence: one "
            f"coordinate. Received: n_coordinates={n_coordinates}")
    return bool(value)


def tied_position_projections(value, table_shape, n_coordinates, query_size, key_size,
                              shared):
    """`tied_position_projections`, checked against the table and sizes."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(
            "`tied_position_projections` must be a bool. Received: "
            f"tied_position_projections={value!r}")
    if not value:
        return False
    if table_shape is None:
        raise ValueError("`tied_position_projections=True` projects the position table with "
                         "the content projections, but the layer has no table.")
    if n_coordinates != 1 or shared:
        raise ValueError(
            "`tied_position_projections=True` (DeBERTa's share_att_key) needs "
            "`n_coordinates=1` and no `same_key_query_proj` / `same_positional_key_query_proj`. "
            f"Received: n_coordinates={n_coordinates}")
    if not table_shape[1] == query_size == key_size:
        raise ValueError(
            "`tied_position_projections=True` feeds the table to the query and key "
            f"projections: its feature size ({table_shape[1]}) must equal `query_size` "
            f"({query_size}) and `key_size` ({key_size}).")
    return True


def position_buckets(value):
    """`position_buckets`: None, or `(bucket_size, max_position)` DeBERTa's
    log buckets accept."""
    if value is None:
        return None
    try:
        bucket_size, max_position = value
    except (TypeError, ValueError):
        raise TypeError(
            "`position_buckets` must be None or (bucket_size, max_position). Received: "
            f"position_buckets={value!r}") from None
    return bucket_arguments(bucket_size, max_position, owner="`position_buckets`")


def bucket_arguments(bucket_size, max_position, owner="`log_bucket_positions`"):
    """DeBERTa's log-bucket arguments, as ints; `owner` names, in the
    messages, the argument or function that received them."""
    try:
        bucket_size, max_position = int(bucket_size), int(max_position)
    except (TypeError, ValueError):
        raise TypeError(
            f"{owner}: `bucket_size` and `max_position` must be ints. Received: "
            f"bucket_size={bucket_size!r}, max_position={max_position!r}"
        ) from None
    if bucket_size < 4 or max_position <= bucket_size // 2 + 1:
        raise ValueError(
            f"{owner} needs bucket_size >= 4 and max_position > "
            f"bucket_size // 2 + 1. Received bucket_size={bucket_size}, "
            f"max_position={max_position}"
        )
    return bucket_size, max_position


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
    batch, n_queries = q_shape[0], q_shape[1]
    n_keys = (k_shape or q_shape)[1]

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
    positional = [m for m in layer.mode if m != "c2c"]
    if position_embedding is not None:
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
    if relative_positions is not None or query_positions is not None:
        if positional and layer.position_embedding_shape is None:
            raise ValueError(
                f"`{given}` was given but the layer has no "
                "position table: pass `position_embedding` to the "
                "constructor."
            )
        if positional and not layer.owns_table and position_embedding is None:
            raise ValueError(
                f"`{given}` was given but no table: this layer "
                "was built with `position_embedding_shape=(None, "
                f"{layer.position_embedding_shape[1]})`, so pass the table "
                "at call time as `position_embedding=`."
            )
    if offsets_formed:
        pass
    elif relative_positions is not None:
        check_integer("relative_positions", relative_positions)
        check_shape(
            "relative_positions", shape_of(relative_positions),
            (batch, n_queries, n_keys, layer.n_coordinates),
            "(batch or 1, n_queries, n_keys, n_coordinates)",
            broadcast=(0, 1, 2),
        )
    elif query_positions is not None:
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
    elif "c2c" not in layer.mode and not layer.sequence_positions:
        raise ValueError(
            f"`mode={layer.mode}` needs `relative_positions` (or "
            "`query_positions` and `key_positions`): without them no "
            "attention term can be computed."
        )
