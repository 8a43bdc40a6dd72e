"""Constructor and function argument checks: clear errors, and the arguments
normalized, before anything is built. (`_checks` checks the tensors a call
receives.) This module imports nothing of the package."""

import dataclasses

import numpy as np

MODES = ("c2c", "c2p", "p2c")


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


# `RelativeAttention` ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AttentionArguments:
    """`RelativeAttention`'s constructor arguments, checked and completed with
    edspdf's defaults: the layer's attributes of the same names."""

    size: int | None  # None: a logits-only layer given `query_size` and `key_size`
    n_heads: int  # pooling heads
    query_size: int
    key_size: int
    value_size: int
    head_size: int
    dropout_p: float
    n_coordinates: int
    mode: tuple[str, ...]  # terms among `MODES`, in the caller's order
    n_additional_heads: int  # logit-only heads
    position_embedding_shape: tuple[int | None, int] | None  # None: no table
    same_key_query_proj: bool
    same_positional_key_query_proj: bool
    use_head_bias: bool
    do_pooling: bool
    total_heads: int  # n_heads + n_additional_heads
    value_head_size: int | None  # size // n_heads
    sequence_positions: bool
    tied_position_projections: bool
    position_dropout_p: float | None  # None: edspdf's dropout placement
    position_buckets: tuple[int, int] | None  # (bucket_size, max_position)


def relative_attention_arguments(
    size, n_heads, query_size=None, key_size=None, value_size=None, head_size=None,
    position_embedding=None, position_embedding_shape=None, dropout_p=0.0,
    same_key_query_proj=False, same_positional_key_query_proj=False, n_coordinates=1,
    head_bias=True, do_pooling=True, mode=MODES, n_additional_heads=0,
    sequence_positions=False, tied_position_projections=False, position_dropout_p=None,
    position_buckets=None,
):
    """Every check of `RelativeAttention`'s constructor, in the order the
    errors are raised: an `AttentionArguments`."""
    checked = attention_arguments(
        size, n_heads, query_size, key_size, value_size, head_size, dropout_p,
        same_key_query_proj, n_coordinates, do_pooling, mode, n_additional_heads,
        position_embedding, position_embedding_shape,
    )
    table = checked["position_embedding_shape"]
    size, n_heads = checked["size"], checked["n_heads"]
    return AttentionArguments(
        **checked,
        same_key_query_proj=bool(same_key_query_proj),
        same_positional_key_query_proj=bool(same_positional_key_query_proj),
        use_head_bias=bool(head_bias),
        do_pooling=bool(do_pooling),
        total_heads=n_heads + checked["n_additional_heads"],
        value_head_size=None if size is None else size // n_heads,
        sequence_positions=_sequence_positions(
            sequence_positions, table, checked["n_coordinates"]),
        tied_position_projections=_tied_position_projections(
            tied_position_projections, table, checked["n_coordinates"],
            checked["query_size"], checked["key_size"],
            same_key_query_proj or same_positional_key_query_proj),
        position_dropout_p=(None if position_dropout_p is None
                            else dropout_rate("position_dropout_p", position_dropout_p)),
        position_buckets=_position_buckets(position_buckets),
    )


def attention_arguments(
    size, n_heads, query_size, key_size, value_size, head_size, dropout_p,
    same_key_query_proj, n_coordinates, do_pooling, mode, n_additional_heads,
    position_embedding, position_embedding_shape,
):
    """`RelativeAttention`'s size, term and table arguments, checked and
    completed with edspdf's defaults, as a dict of attribute values."""
    sizes = _attention_sizes(size, n_heads, query_size, key_size, value_size, head_size,
                             n_coordinates, n_additional_heads, do_pooling)
    dropout_p = dropout_rate("dropout_p", dropout_p)
    if same_key_query_proj and sizes["query_size"] != sizes["key_size"]:
        raise ValueError(
            "`same_key_query_proj=True` needs `query_size == key_size`. "
            f"Received: query_size={sizes['query_size']}, key_size={sizes['key_size']}"
        )
    terms = normalize_mode(mode)
    table = table_shape(position_embedding, position_embedding_shape)
    _check_terms_and_table(terms, table, sizes["head_size"], sizes["n_coordinates"])
    return {**sizes, "dropout_p": dropout_p, "mode": terms, "position_embedding_shape": table}


def _attention_sizes(size, n_heads, query_size, key_size, value_size, head_size,
                     n_coordinates, n_additional_heads, do_pooling):
    """The sizes, heads and coordinates, with their defaults."""
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
    return {"size": size, "n_heads": n_heads, "query_size": query_size,
            "key_size": key_size, "value_size": value_size, "head_size": head_size,
            "n_coordinates": n_coordinates, "n_additional_heads": n_additional_heads}


def _check_terms_and_table(terms, table, head_size, n_coordinates):
    """A computable term, and a table that splits into the coordinates."""
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


def _sequence_positions(value, table_shape, n_coordinates):
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


def _tied_position_projections(value, table_shape, n_coordinates, query_size, key_size,
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


def _position_buckets(value):
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


# DeBERTa's log buckets ------------------------------------------------------------


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
