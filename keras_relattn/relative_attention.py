"""The `RelativeAttention` layer: DeBERTa-style disentangled attention."""

import functools
import math

import keras
import numpy as np
from keras import ops

from keras_relattn import _checks, _kernels

try:  # the backend's own softmax, without `keras.ops.softmax`'s shape check
    from keras.src.backend import nn as _backend_nn

    _backend_softmax = _backend_nn.softmax
except (ImportError, AttributeError):  # pragma: no cover - other Keras layouts
    _backend_softmax = ops.softmax

MODES = ("c2c", "c2p", "p2c")

# edspdf *replaces* masked logits by this value before the softmax (it does
# not add it).  It is representable in float16 and bfloat16, and the softmax
# always runs in float32, so it can neither overflow nor produce NaN.
MASKED_LOGIT = -10000.0


def _normalize_mode(mode):
    if isinstance(mode, str):
        mode = (mode,)
    try:
        mode = tuple(mode)
    except TypeError:
        raise TypeError(
            "`mode` must be a sequence of names among "
            f"{MODES}. Received: mode={mode!r}"
        ) from None
    if not mode:
        raise ValueError(
            f"`mode` must name at least one of {MODES}. Received: mode=()"
        )
    unknown = [m for m in mode if m not in MODES]
    if unknown:
        raise ValueError(
            f"`mode` contains unknown term(s) {unknown}; the known terms are "
            f"{MODES}. Received: mode={mode!r}"
        )
    # Keep the caller's order (it is part of the config) but drop repeats:
    # edspdf only tests membership.
    return tuple(dict.fromkeys(mode))


def _table_shape(position_embedding, position_embedding_shape):
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


# The call arguments besides the three inputs that `_check_call_inputs` checks.
_CHECKED_CALL_ARGUMENTS = (
    "mask", "relative_positions", "no_position_mask", "base_attn", "position_embedding",
)
# `call`'s leading arguments, in order.
_CALL_ARGUMENTS = (
    "content_queries", "content_keys", "content_values", *_CHECKED_CALL_ARGUMENTS,
)



def _prepare_input(name, value):
    """A call input as Keras should convert it (see `__call__`)."""
    if isinstance(value, (list, tuple)):
        value = np.asarray(value)
        if value.dtype == np.float64:
            value = value.astype("float32")
    if (
        name == "relative_positions"
        and isinstance(value, np.ndarray)
        and value.dtype.kind in "iu"
        and value.dtype.itemsize > 4 - (value.dtype.kind == "u")
    ):
        value = np.clip(value, -_kernels.OFFSET_BOUND, _kernels.OFFSET_BOUND).astype("int32")
    return value


@keras.saving.register_keras_serializable(package="keras_relattn")
class RelativeAttention(keras.layers.Layer):
    """Disentangled relative self/cross attention (edspdf / DeBERTa style).

    The attention logit between query `i` and key `j` on head `h` is

    ```
    logits[b, i, j, h] = base_attn[b, i, j, h]
        + (c2c + c2p + p2c) / sqrt(number of terms)
        + head_bias[h]
    c2c = q[i, h] . k[j, h] / sqrt(head_size)
    c2p = sum_x q[i, h, x] . pos_k[idx(i, j, x), x, h] / sqrt(head_size)
    p2c = sum_x pos_q[idx(i, j, x), x, h] . k[j, h, x] / sqrt(head_size)
    idx(i, j, x) = clip(n_positions // 2 + relative_positions[b, i, j, x],
                        0, n_positions - 1)
    ```

    where `q`, `k` are linear projections of the content queries and keys,
    split per head and, for the position terms, each head is split in
    `n_coordinates` equal chunks (one per coordinate: x, y, ...), and
    `pos_q`, `pos_k` are per-coordinate projections of the position table.
    Only the terms of `mode` that can be computed are summed: the position
    terms need `relative_positions` (without them, only `c2c` is used, as in
    edspdf). Position terms are zeroed where `no_position_mask` is True.

    When values are given, the logits of the `n_heads` pooling heads (the
    `n_additional_heads` logit-only heads come first on the heads axis and
    are not pooled) are masked (masked logits are *replaced* by -10000),
    softmaxed over the keys in float32, and used to average the projected
    values; the heads are concatenated (there is no output projection).

    This reproduces `edspdf.layers.relative_attention.RelativeAttention`
    (edspdf 0.10.0) numerically, and weights move both ways with
    `keras_relattn.load_edspdf_state_dict` / `keras_relattn.edspdf_state_dict`.

    Args:
        size: int. Size of the pooled output (`n_heads * value head size`).
            Default for `query_size` and `key_size`. May be None with
            `do_pooling=False` when both of those are given.
        n_heads: int. Number of pooling attention heads.
        query_size: int. Feature size of the content queries. Defaults to
            `size`.
        key_size: int. Feature size of the content keys. Defaults to `size`.
        value_size: int. Feature size of the content values. Defaults to
            `key_size` (as in edspdf).
        head_size: int. Size of each query/key head. Defaults to
            `key_size // n_heads`.
        position_embedding: optional array (numpy or backend tensor) of shape
            `(n_positions, position_size)`: the relative position table. It is
            stored as a weight of the layer (`position_embedding`), never in
            the config.
        position_embedding_shape: optional `(n_positions, position_size)`:
            create an empty (zero) table of that shape, to be filled by
            loading weights. This is what `get_config()` records. With
            `(None, position_size)` the layer owns no table: it is passed at
            call time (`position_embedding=`), e.g. one
            `keras_relattn.PositionTable` shared by several layers.
        position_embedding_trainable: bool. Whether the table is trained.
            Default `False`, like edspdf's buffer for a plain tensor.
        dropout_p: float. Dropout rate applied, as edspdf does, to the raw
            queries, keys and values, to the table and to the attention
            weights. Default `0.0`.
        same_key_query_proj: bool. Share the content *and* positional
            projections between keys and queries.
        same_positional_key_query_proj: bool. Share only the positional
            projections.
        n_coordinates: int. Number of coordinates of a relative position
            (1 for text, 2 for page layouts and images, ...).
        head_bias: bool. Learn a per-head bias added to the logits.
        do_pooling: bool. Whether the layer pools values at all. With
            `False` it only computes logits and has no value projection.
        mode: sequence of `"c2c"`, `"c2p"`, `"p2c"`: the terms to compute.
        n_additional_heads: int. Logit-only heads, placed first on the heads
            axis of the returned logits.
        kernel_initializer, bias_initializer, kernel_regularizer,
        bias_regularizer, kernel_constraint, bias_constraint: passed to the
            projections.
        seed: optional int, seed of the dropout.
        **kwargs: other `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        content_queries: `(batch, n_queries, query_size)` float tensor.
        content_keys: `(batch, n_keys, key_size)`; defaults to the queries.
        content_values: `(batch, n_keys, value_size)`; when given (and
            `do_pooling`), the layer returns the pooled output too.
        mask: bool or 0/1 tensor, True = attend. Shape `(batch, n_keys)`,
            `(batch, n_queries, n_keys)` or `(batch, n_queries, n_keys,
            n_heads)` (pooling heads only). `None` means attend to all keys.
            It only affects pooling: the returned logits are unmasked.
        relative_positions: integer tensor `(batch or 1, n_queries, n_keys,
            n_coordinates)`: position of each key relative to each query.
        no_position_mask: bool tensor `(batch or 1, n_queries, n_keys)`; True
            disables the position terms for that pair.
        base_attn: float tensor `(batch, n_queries, n_keys, n_heads +
            n_additional_heads)` added to the logits.
        training: bool, whether dropout is active.
        return_logits: bool, default True (edspdf's outputs). With False
            (values required), only the pooled output is returned, like
            `MultiHeadAttention(..., return_attention_scores=False)`: the
            fast way to run a stack that never reads the logits. It computes
            only the pooling heads and, for long inputs, works through blocks
            of queries, so no `(batch, heads, queries, keys)` tensor is held
            for the whole input.
        position_embedding: optional `(n_positions, position_size)` tensor
            used instead of the layer's own table, e.g. the output of a
            `keras_relattn.PositionTable` shared by several layers.
        content_queries_mask, content_keys_mask, content_values_mask: Keras
            masks `(batch, length)`, filled in by Keras from the inputs'
            masks; the keys' and values' masks mask keys (in self attention
            the queries' mask is the keys' mask). They combine with `mask`.

    Returns:
        `(pooled, logits)` when `content_values` is given, else `logits`;
        `pooled` alone with `return_logits=False`.
        `pooled`: `(batch, n_queries, size)`; it carries the queries' Keras
        mask. `logits`: `(batch, n_queries, n_keys, n_heads +
        n_additional_heads)`, unmasked, bias included.

    Example:

    >>> import numpy as np
    >>> from keras_relattn import RelativeAttention
    >>> table = np.random.normal(size=(16, 32)).astype("float32")
    >>> layer = RelativeAttention(32, n_heads=4, position_embedding=table)
    >>> x = np.random.normal(size=(2, 10, 32)).astype("float32")
    >>> positions = np.arange(10)[None, :] - np.arange(10)[:, None]
    >>> positions = positions[None, :, :, None]  # (1, queries, keys, 1)
    >>> pooled, logits = layer(x, x, x, relative_positions=positions)
    >>> tuple(pooled.shape), tuple(logits.shape)
    ((2, 10, 32), (2, 10, 10, 4))

    References:
        - He et al., "DeBERTa: Decoding-enhanced BERT with Disentangled
          Attention", ICLR 2021.
        - edspdf, `edspdf.layers.relative_attention.RelativeAttention`.
    """

    def __init__(
        self,
        size,
        n_heads,
        query_size=None,
        key_size=None,
        value_size=None,
        head_size=None,
        position_embedding=None,
        dropout_p=0.0,
        same_key_query_proj=False,
        same_positional_key_query_proj=False,
        n_coordinates=1,
        head_bias=True,
        do_pooling=True,
        mode=MODES,
        n_additional_heads=0,
        position_embedding_shape=None,
        position_embedding_trainable=False,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if size is None and not do_pooling:
            # A logits-only layer needs no output size (as in edspdf), but
            # then nothing gives the query and key sizes a default.
            for name, value in (("query_size", query_size), ("key_size", key_size)):
                if value is None:
                    raise ValueError(
                        f"`{name}` is required when `size` is None (a "
                        "logits-only layer, `do_pooling=False`)."
                    )
        else:
            size = _checks.positive_int("size", size)
        n_heads = _checks.positive_int("n_heads", n_heads)
        query_size = _checks.positive_int("query_size", query_size, size)
        key_size = _checks.positive_int("key_size", key_size, size)
        value_size = _checks.positive_int("value_size", value_size, key_size)
        n_coordinates = _checks.positive_int("n_coordinates", n_coordinates)
        n_additional_heads = _checks.non_negative_int(
            "n_additional_heads", n_additional_heads
        )
        if head_size is None:
            if key_size % n_heads:
                raise ValueError(
                    f"`key_size` ({key_size}) must be divisible by `n_heads` "
                    f"({n_heads}) when `head_size` is not given."
                )
            head_size = key_size // n_heads
        head_size = _checks.positive_int("head_size", head_size)
        if do_pooling and size % n_heads:
            raise ValueError(
                f"`size` ({size}) must be divisible by `n_heads` ({n_heads}) "
                "when `do_pooling=True`: each head pools `size // n_heads` "
                "value features."
            )
        if not 0.0 <= float(dropout_p) < 1.0:
            raise ValueError(
                f"`dropout_p` must be in [0, 1). Received: dropout_p={dropout_p}"
            )
        if same_key_query_proj and query_size != key_size:
            raise ValueError(
                "`same_key_query_proj=True` needs `query_size == key_size`. "
                f"Received: query_size={query_size}, key_size={key_size}"
            )
        mode = _normalize_mode(mode)
        table_shape = _table_shape(position_embedding, position_embedding_shape)
        if table_shape is None and "c2c" not in mode:
            raise ValueError(
                f"`mode={mode}` has no term that can be computed: the position "
                "terms need a position table (`position_embedding`) and "
                "'c2c' is not in `mode`."
            )
        if table_shape is not None:
            if table_shape[1] % n_coordinates:
                raise ValueError(
                    f"The position table's feature size ({table_shape[1]}, "
                    f"table shape {table_shape}) must be divisible by "
                    f"`n_coordinates` ({n_coordinates})."
                )
            if head_size % n_coordinates:
                raise ValueError(
                    f"`head_size` ({head_size}) must be divisible by "
                    f"`n_coordinates` ({n_coordinates}): each head is split "
                    "in one chunk per coordinate."
                )

        self.size = size
        self.n_heads = n_heads
        self.query_size = query_size
        self.key_size = key_size
        self.value_size = value_size
        self.head_size = head_size
        self.dropout_p = float(dropout_p)
        self.same_key_query_proj = bool(same_key_query_proj)
        self.same_positional_key_query_proj = bool(same_positional_key_query_proj)
        self.n_coordinates = n_coordinates
        self.head_bias = bool(head_bias)
        self.do_pooling = bool(do_pooling)
        self.mode = mode
        self.n_additional_heads = n_additional_heads
        self.total_heads = n_heads + n_additional_heads
        self.value_head_size = None if size is None else size // n_heads
        self.position_embedding_shape = table_shape
        self.position_embedding_trainable = bool(position_embedding_trainable)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        self.seed = seed
        self._initial_table = position_embedding
        self.supports_masking = True

        self.dropout = (
            keras.layers.Dropout(self.dropout_p, seed=seed, dtype=self.dtype_policy)
            if self.dropout_p > 0
            else None
        )

    # ------------------------------------------------------------------ build
    def _sublayer_kwargs(self):
        return dict(
            kernel_initializer=keras.initializers.get(
                keras.initializers.serialize(self.kernel_initializer)
            ),
            bias_initializer=keras.initializers.get(
                keras.initializers.serialize(self.bias_initializer)
            ),
            kernel_regularizer=self.kernel_regularizer,
            bias_regularizer=self.bias_regularizer,
            kernel_constraint=self.kernel_constraint,
            bias_constraint=self.bias_constraint,
            dtype=self.dtype_policy,
        )

    def _content_projection(self, name, input_size, heads, head_size):
        proj = _Projection(
            "bsi,ihd->bshd",
            output_shape=(None, heads, head_size),
            bias_axes="hd",
            name=name,
            **self._sublayer_kwargs(),
        )
        proj.build((None, None, input_size))
        return proj

    def _position_projection(self, name):
        pos_size = self.position_embedding_shape[1]
        coords = self.n_coordinates
        proj = _Projection(
            "pxi,xihd->pxhd",
            output_shape=(coords, self.total_heads, self.head_size // coords),
            bias_axes="xhd",
            name=name,
            **self._sublayer_kwargs(),
        )
        proj.build((None, coords, pos_size // coords))
        return proj

    def build(
        self,
        content_queries_shape=None,
        content_keys_shape=None,
        content_values_shape=None,
    ):
        if content_queries_shape is not None:
            self._check_feature_shapes(
                content_queries_shape, content_keys_shape, content_values_shape
            )
        # Every size is known from the constructor, so `build` creates all the
        # state at once: `.keras` loading and weight porting never meet a
        # half-built layer.
        self.key_proj = self._content_projection(
            "key", self.key_size, self.total_heads, self.head_size
        )
        if not self.same_key_query_proj:
            self.query_proj = self._content_projection(
                "query", self.query_size, self.total_heads, self.head_size
            )
        if self.do_pooling:
            self.value_proj = self._content_projection(
                "value", self.value_size, self.n_heads, self.value_head_size
            )
        if self.owns_table:
            initial = self._initial_table
            self.position_embedding = self.add_weight(
                name="position_embedding",
                shape=self.position_embedding_shape,
                initializer=(
                    "zeros"
                    if initial is None
                    else _ArrayInitializer(keras.ops.convert_to_numpy(initial))
                ),
                trainable=self.position_embedding_trainable,
            )
            self._initial_table = None
        if self.position_embedding_shape is not None:
            self.position_key_proj = self._position_projection("position_key")
            if not (self.same_key_query_proj or self.same_positional_key_query_proj):
                self.position_query_proj = self._position_projection(
                    "position_query"
                )
        if self.head_bias:
            self.bias = self.add_weight(
                name="head_bias",
                shape=(self.total_heads,),
                initializer="zeros",
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
            )
        self.built = True

    @property
    def owns_table(self):
        """Whether the table is a weight of this layer (else passed at call)."""
        shape = self.position_embedding_shape
        return shape is not None and shape[0] is not None

    def projections(self):
        """The `EinsumDense` projections of this layer, each once."""
        if not self.built:
            self.build()
        found = [self.key_proj, self.query_projection]
        if self.do_pooling:
            found.append(self.value_proj)
        if self.position_embedding_shape is not None:
            found += [self.position_key_proj, self.position_query_projection]
        unique = []
        for proj in found:
            if all(proj is not seen for seen in unique):
                unique.append(proj)
        return unique

    def quantize(self, mode=None, type_check=True, config=None):
        """Quantizes every projection (as `Model.quantize` does).

        For inference: the head bias and the table stay float.
        """
        for proj in self.projections():
            proj.quantize(mode, type_check=type_check, config=config)

    def enable_lora(self, rank, lora_alpha=None, a_initializer="he_uniform",
                    b_initializer="zeros"):
        """Adds LoRA adapters to every projection (content and positional).

        The base kernels are frozen; only the adapters (and the biases and
        the head bias) stay trainable, as with `keras.layers.EinsumDense`.
        """
        for proj in self.projections():
            proj.enable_lora(
                rank, lora_alpha=lora_alpha, a_initializer=a_initializer,
                b_initializer=b_initializer,
            )

    @property
    def query_projection(self):
        """The queries' `EinsumDense` (the keys' one with `same_key_query_proj`)."""
        return self.key_proj if self.same_key_query_proj else self.query_proj

    @property
    def key_projection(self):
        """The keys' `EinsumDense`, kernel `(key_size, heads, head_size)`."""
        return self.key_proj

    @property
    def value_projection(self):
        """The values' `EinsumDense`, or None with `do_pooling=False`."""
        return self.value_proj if self.do_pooling else None

    @property
    def position_key_projection(self):
        """The table's projection for c2p, or None without a table."""
        if self.position_embedding_shape is None:
            return None
        return self.position_key_proj

    @property
    def position_query_projection(self):
        """The table's projection for p2c (the key one when shared), or None."""
        if self.position_embedding_shape is None:
            return None
        if self.same_key_query_proj or self.same_positional_key_query_proj:
            return self.position_key_proj
        return self.position_query_proj

    # ---------------------------------------------------------- validation
    def _check_feature_shapes(self, q_shape, k_shape, v_shape):
        _checks.check_shape(
            "content_queries", q_shape, (None, None, self.query_size),
            "(batch, n_queries, query_size)",
        )
        if k_shape is not None:
            _checks.check_shape(
                "content_keys", k_shape, (q_shape[0], None, self.key_size),
                "(batch, n_keys, key_size)",
            )
        elif self.query_size != self.key_size:
            raise ValueError(
                "`content_keys` is required when `query_size` "
                f"({self.query_size}) differs from `key_size` ({self.key_size})."
            )
        if v_shape is not None:
            if not self.do_pooling:
                raise ValueError(
                    "`content_values` was given but the layer was built with "
                    "`do_pooling=False`, so it has no value projection. Pass "
                    "no values to get the logits, or use `do_pooling=True`."
                )
            n_keys = (k_shape if k_shape is not None else q_shape)[1]
            _checks.check_shape(
                "content_values", v_shape, (q_shape[0], n_keys, self.value_size),
                "(batch, n_keys, value_size)",
            )

    def _check_call_inputs(
        self, queries, keys, values, mask=None, relative_positions=None,
        no_position_mask=None, base_attn=None, position_embedding=None,
        return_logits=True,
    ):
        if not return_logits and values is None:
            raise ValueError(
                "`return_logits=False` returns the pooled output alone, so it "
                "needs `content_values` (and `do_pooling=True`)."
            )
        q_shape = _checks.shape_of(queries)
        k_shape = None if keys is None else _checks.shape_of(keys)
        v_shape = None if values is None else _checks.shape_of(values)
        self._check_feature_shapes(q_shape, k_shape, v_shape)
        batch, n_queries = q_shape[0], q_shape[1]
        n_keys = (k_shape or q_shape)[1]

        if mask is not None:
            _checks.check_mask("mask", mask, batch, n_queries, n_keys, self.n_heads)
        if base_attn is not None:
            _checks.check_shape(
                "base_attn", _checks.shape_of(base_attn),
                (batch, n_queries, n_keys, self.total_heads),
                "(batch, n_queries, n_keys, n_heads + n_additional_heads)",
                broadcast=(0, 1, 2, 3),
            )
        if no_position_mask is not None:
            _checks.check_shape(
                "no_position_mask", _checks.shape_of(no_position_mask),
                (batch, n_queries, n_keys), "(batch or 1, n_queries, n_keys)",
                broadcast=(0, 1, 2),
            )
        positional = [m for m in self.mode if m != "c2c"]
        if position_embedding is not None:
            if self.position_embedding_shape is None:
                raise ValueError(
                    "A `position_embedding` table was passed at call time but "
                    "the layer has no position projections: construct it "
                    "with `position_embedding_shape=(None, position_size)`."
                )
            _checks.check_shape(
                "position_embedding", _checks.shape_of(position_embedding),
                (None, self.position_embedding_shape[1]),
                "(n_positions, position_size)",
            )
        if relative_positions is not None:
            if positional and self.position_embedding_shape is None:
                raise ValueError(
                    "`relative_positions` was given but the layer has no "
                    "position table: pass `position_embedding` to the "
                    "constructor."
                )
            if positional and not self.owns_table and position_embedding is None:
                raise ValueError(
                    "`relative_positions` was given but no table: this layer "
                    "was built with `position_embedding_shape=(None, "
                    f"{self.position_embedding_shape[1]})`, so pass the table "
                    "at call time as `position_embedding=`."
                )
            _checks.check_integer("relative_positions", relative_positions)
            _checks.check_shape(
                "relative_positions", _checks.shape_of(relative_positions),
                (batch, n_queries, n_keys, self.n_coordinates),
                "(batch or 1, n_queries, n_keys, n_coordinates)",
                broadcast=(0, 1, 2),
            )
        elif "c2c" not in self.mode:
            raise ValueError(
                f"`mode={self.mode}` needs `relative_positions`: without "
                "them no attention term can be computed."
            )

    # ------------------------------------------------------------- call
    def __call__(self, *args, **kwargs):
        # Before Keras converts the inputs: Python lists become arrays, and
        # 64-bit integer offsets are clamped while still 64-bit (JAX without
        # x64 would wrap them to int32 on conversion). The position argument
        # is found whether it is passed by keyword or by position.
        args = list(args)
        for position, name in enumerate(_CALL_ARGUMENTS):
            if position < len(args):
                args[position] = _prepare_input(name, args[position])
            elif name in kwargs:
                kwargs[name] = _prepare_input(name, kwargs[name])
        return super().__call__(*args, **kwargs)

    def _drop(self, x, training):
        if self.dropout is None:
            return x
        return self.dropout(x, training=training)

    def call(
        self,
        content_queries,
        content_keys=None,
        content_values=None,
        mask=None,
        relative_positions=None,
        no_position_mask=None,
        base_attn=None,
        position_embedding=None,
        training=None,
        return_logits=True,
        content_queries_mask=None,
        content_keys_mask=None,
        content_values_mask=None,
    ):
        self._check_call_inputs(
            content_queries, content_keys, content_values, mask,
            relative_positions, no_position_mask, base_attn, position_embedding,
            return_logits=return_logits,
        )
        compute_dtype = self.compute_dtype
        self_attention = content_keys is None
        keys_in = content_queries if self_attention else content_keys
        # Statically empty inputs only: a dynamic length is no Python test
        # (tracers would freeze it), and the ops below handle zero sizes too.
        if 0 in _checks.shape_of(content_queries)[:2] + _checks.shape_of(keys_in)[:2]:
            outputs = self._empty_outputs(content_queries, keys_in, content_values)
            return outputs if return_logits else outputs[0]
        key_mask = content_queries_mask if self_attention else content_keys_mask

        # (batch, length, heads, head_size)
        q = self.query_projection(self._drop(content_queries, training))
        k = self.key_proj(self._drop(keys_in, training))

        use_positions = relative_positions is not None and any(
            m in self.mode for m in ("c2p", "p2c")
        )
        terms = [m for m in self.mode if m == "c2c" or use_positions]
        # Every term is divided by sqrt(head_size) and their sum by
        # sqrt(number of terms): fold both into one scale applied to the
        # (small) projected queries and position queries.
        scale = 1.0 / (math.sqrt(self.head_size) * math.sqrt(len(terms)))
        q = q * ops.cast(scale, q.dtype)

        pos_tables = None
        if use_positions:
            table = (
                self.position_embedding
                if position_embedding is None
                else position_embedding
            )
            pos_tables = self._position_tables(table, scale, training)
        if not return_logits:
            attend = self._combine_masks(mask, key_mask, content_values_mask)
            return self._pooled_only(
                q, k, content_values, pos_tables, relative_positions, no_position_mask,
                base_attn, attend, training,
            )

        # Layouts. The logits are returned (batch, queries, keys, heads), as
        # edspdf does. The c2c matmul and the softmax + pooling run (batch,
        # heads, queries, keys), like MultiHeadAttention: a matmul writing or
        # reading the other layout pays a strided copy of the whole tensor
        # (measured on JAX CPU: W2 27 ms all-bqkh, 12 ms this way). The
        # position terms come in whichever layout the backend makes best
        # (see `_kernels.default_output`).
        bqkh, bhqk = [], []  # terms to sum, by layout
        if "c2c" in terms:
            bhqk.append(ops.einsum("bqhd,bkhd->bhqk", q, k))
        if use_positions:
            output = _kernels.default_output()
            positions = _kernels.position_logits(
                q, k, *pos_tables, relative_positions, output=output
            )
            if no_position_mask is not None:
                keep = ops.logical_not(_checks.as_bool(no_position_mask))
                keep = keep[..., None] if output == "bqkh" else keep[:, None]
                positions = positions * ops.cast(keep, positions.dtype)
            (bqkh if output == "bqkh" else bhqk).append(positions)
        if base_attn is not None:
            bqkh.append(ops.cast(base_attn, compute_dtype))
        if self.head_bias:
            if bhqk:
                bhqk[0] = bhqk[0] + ops.cast(self.bias, compute_dtype)[:, None, None]
            else:
                bqkh[0] = bqkh[0] + ops.cast(self.bias, compute_dtype)
        bhqk_sum = _sum(bhqk) if bhqk else None
        if bqkh:
            logits = _sum(bqkh)
            if bhqk_sum is not None:
                logits = logits + ops.transpose(bhqk_sum, (0, 2, 3, 1))
        else:
            logits = ops.transpose(bhqk_sum, (0, 2, 3, 1))

        if content_values is None:
            return logits
        # The pooling reads (batch, heads, queries, keys); only transpose
        # the summed logits back when some term came as (b, q, k, h).
        pool_source = ops.transpose(logits, (0, 3, 1, 2)) if bqkh else bhqk_sum

        values = self.value_proj(self._drop(content_values, training))
        attend = self._combine_masks(
            mask, key_mask, content_values_mask
        )  # broadcastable to (batch, pooling heads, queries, keys), or None
        pool_logits = ops.cast(pool_source[:, self.n_additional_heads :], "float32")
        if attend is not None:
            pool_logits = ops.where(attend, pool_logits, MASKED_LOGIT)
        weights = _softmax(pool_logits, axis=-1)
        weights = self._drop(ops.cast(weights, compute_dtype), training)
        pooled = ops.einsum("bhqk,bkhd->bqhd", weights, values)
        pooled = ops.reshape(
            pooled, (ops.shape(pooled)[0], ops.shape(pooled)[1], self.size)
        )
        return pooled, logits

    def _pooled_only(
        self, q, k, content_values, pos_tables, relative_positions, no_position_mask,
        base_attn, attend, training,
    ):
        """The pooled output alone (`return_logits=False`).

        Only the pooling heads are computed (the additional heads only make
        logits), all in `(batch, heads, queries, keys)`, the layout the
        softmax reads, and over blocks of queries when the inputs are long:
        no `(batch, heads, queries, keys)` tensor is held for the whole input
        (see `_query_blocks`). Each block follows the full path's rules
        exactly (mask *replaces* logits by -10000, float32 softmax, dropout).
        """
        dtype = self.compute_dtype
        first = self.n_additional_heads
        q, k = q[:, :, first:], k[:, :, first:]
        pos_q, pos_k = (
            None if t is None else t[:, :, first:] for t in pos_tables or (None, None)
        )
        values = self.value_proj(self._drop(content_values, training))
        keep = None
        if no_position_mask is not None:
            keep = ops.cast(ops.logical_not(_checks.as_bool(no_position_mask)), dtype)[:, None]
        base = None
        if base_attn is not None:
            base = ops.cast(base_attn, dtype)
            if _checks.shape_of(base)[-1] != 1:
                base = base[..., first:]
            base = ops.transpose(base, (0, 3, 1, 2))
        bias = None
        c2c_q, c2c_k = q, k
        if self.head_bias:
            bias = ops.cast(self.bias[first:], dtype)
            if "c2c" in self.mode:
                # Inside the c2c matmul (q . k + bias . 1): one pass less
                # over the (b, h, q, k) logits.
                c2c_q = ops.concatenate([q, ops.zeros_like(q[..., :1]) + bias[:, None]], -1)
                c2c_k = ops.concatenate([k, ops.ones_like(k[..., :1])], -1)
                bias = None
            else:
                bias = bias[:, None, None]

        positions = None
        if pos_tables is not None:  # the table scores, once for every block
            positions = _kernels.PositionTerms(
                q, k, pos_q, pos_k, relative_positions, output="bhqk"
            )
        pooled_blocks = []
        for rows in _query_blocks(q, k, self.n_heads):
            take = functools.partial(_take_rows, rows=rows)
            if self.dropout is None or not training:
                pooled = _kernels.inference_pooling(
                    c2c_q[:, rows] if "c2c" in self.mode else None,
                    c2c_k if "c2c" in self.mode else None,
                    positions, rows,
                    None if keep is None else take(keep, 2),
                    [t for t in (None if base is None else take(base, 2), bias) if t is not None],
                    None if attend is None else take(attend, 2),
                    values, MASKED_LOGIT,
                )
                if pooled is not None:
                    pooled_blocks.append(pooled)
                    continue
            terms = []
            if "c2c" in self.mode:
                terms.append(ops.einsum("bqhd,bkhd->bhqk", c2c_q[:, rows], c2c_k))
            if positions is not None:
                position_logits = positions.logits(rows)
                if keep is not None:
                    position_logits = position_logits * take(keep, 2)
                terms.append(position_logits)
            if base is not None:
                terms.append(take(base, 2))
            if bias is not None:
                terms.append(bias)
            logits = ops.cast(_sum(terms), "float32")
            if attend is not None:
                logits = ops.where(take(attend, 2), logits, MASKED_LOGIT)
            weights = self._drop(ops.cast(_softmax(logits, axis=-1), dtype), training)
            pooled_blocks.append(ops.einsum("bhqk,bkhd->bqhd", weights, values))
        pooled = (
            pooled_blocks[0]
            if len(pooled_blocks) == 1
            else ops.concatenate(pooled_blocks, axis=1)
        )
        return ops.reshape(pooled, (ops.shape(pooled)[0], ops.shape(pooled)[1], self.size))

    def _empty_outputs(self, queries, keys, values):
        """No batch, query or key: outputs of the right (empty) shapes.

        With queries but no keys there is nothing to attend to, and the pooled
        output is zeros. (edspdf divides by zero here.)
        """
        batch, n_queries = ops.shape(queries)[0], ops.shape(queries)[1]
        n_keys = ops.shape(keys)[1]
        logits = ops.zeros(
            (batch, n_queries, n_keys, self.total_heads), self.compute_dtype
        )
        if values is None:
            return logits
        return ops.zeros((batch, n_queries, self.size), self.compute_dtype), logits

    def _position_tables(self, table, scale, training):
        """The projected tables `(pos_q, pos_k)`: each `(P, coordinates,
        heads, chunk)`, or None when its term is off; `pos_q` scaled."""
        table = ops.cast(table, self.compute_dtype)
        pos_size = self.position_embedding_shape[1]
        coords = self.n_coordinates

        def project(proj):
            t = self._drop(table, training)
            return proj(ops.reshape(t, (-1, coords, pos_size // coords)))

        pos_k = pos_q = None
        if "c2p" in self.mode:
            pos_k = project(self.position_key_proj)
        if "p2c" in self.mode:
            pos_q = project(self.position_query_projection)
            pos_q = pos_q * ops.cast(scale, pos_q.dtype)
        return pos_q, pos_k

    def _combine_masks(self, mask, key_mask, values_mask):
        """All masks as one bool tensor broadcastable to (b, heads, q, k)."""
        attend = None
        for m in (key_mask, values_mask):
            if m is not None:
                m = _checks.as_bool(m)[:, None, None, :]
                attend = m if attend is None else ops.logical_and(attend, m)
        if mask is not None:
            m = _checks.as_bool(mask)
            if len(m.shape) == 2:
                m = m[:, None, None, :]
            elif len(m.shape) == 3:
                m = m[:, None]
            else:  # (b, q, k, pooling heads)
                m = ops.transpose(m, (0, 3, 1, 2))
            attend = m if attend is None else ops.logical_and(attend, m)
        return attend

    # ------------------------------------------------------- keras plumbing
    def compute_output_shape(
        self,
        content_queries_shape,
        content_keys_shape=None,
        content_values_shape=None,
    ):
        """`logits` shape, or `(pooled, logits)` shapes when values are given."""
        self._check_feature_shapes(
            content_queries_shape, content_keys_shape, content_values_shape
        )
        batch, n_queries = content_queries_shape[0], content_queries_shape[1]
        n_keys = (content_keys_shape or content_queries_shape)[1]
        logits = (batch, n_queries, n_keys, self.total_heads)
        if content_values_shape is None:
            return logits
        return (batch, n_queries, self.size), logits

    def compute_output_spec(
        self, content_queries, content_keys=None, content_values=None, *args, **kwargs
    ):
        # Same checks as `call`, so that symbolic models fail when built.
        kwargs.update(zip(_CHECKED_CALL_ARGUMENTS, args))
        return_logits = kwargs.get("return_logits", True)
        self._check_call_inputs(
            content_queries, content_keys, content_values,
            **{name: kwargs.get(name) for name in _CHECKED_CALL_ARGUMENTS},
            return_logits=return_logits,
        )
        shapes = self.compute_output_shape(
            _checks.shape_of(content_queries),
            None if content_keys is None else _checks.shape_of(content_keys),
            None if content_values is None else _checks.shape_of(content_values),
        )
        if content_values is None:
            return keras.KerasTensor(shapes, dtype=self.compute_dtype)
        if not return_logits:
            return keras.KerasTensor(shapes[0], dtype=self.compute_dtype)
        return tuple(
            keras.KerasTensor(shape, dtype=self.compute_dtype) for shape in shapes
        )

    def compute_mask(self, inputs, previous_mask=None):
        # Both outputs hold one row per query, so both carry the queries'
        # mask. `previous_mask` may be a key mask passed as `mask=`, so read
        # the queries' own Keras mask instead.
        query_mask = _checks.keras_mask_of(inputs)
        if query_mask is None:
            return None
        return (query_mask, query_mask)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "size": self.size,
                "n_heads": self.n_heads,
                "query_size": self.query_size,
                "key_size": self.key_size,
                "value_size": self.value_size,
                "head_size": self.head_size,
                "position_embedding": None,
                "position_embedding_shape": (
                    None
                    if self.position_embedding_shape is None
                    else list(self.position_embedding_shape)
                ),
                "position_embedding_trainable": self.position_embedding_trainable,
                "dropout_p": self.dropout_p,
                "same_key_query_proj": self.same_key_query_proj,
                "same_positional_key_query_proj": (
                    self.same_positional_key_query_proj
                ),
                "n_coordinates": self.n_coordinates,
                "head_bias": self.head_bias,
                "do_pooling": self.do_pooling,
                "mode": list(self.mode),
                "n_additional_heads": self.n_additional_heads,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "bias_initializer": keras.initializers.serialize(
                    self.bias_initializer
                ),
                "kernel_regularizer": keras.regularizers.serialize(
                    self.kernel_regularizer
                ),
                "bias_regularizer": keras.regularizers.serialize(
                    self.bias_regularizer
                ),
                "kernel_constraint": keras.constraints.serialize(
                    self.kernel_constraint
                ),
                "bias_constraint": keras.constraints.serialize(
                    self.bias_constraint
                ),
                "seed": self.seed,
            }
        )
        return config


class _Projection(keras.layers.EinsumDense):
    """`EinsumDense` whose float bias add cannot be misrouted.

    Keras' TensorFlow `ops.add` turns `x + bias` into `tf.nn.bias_add` when the
    bias squeezes to a vector, and picks the axis by size: with `head_size=1`
    a `(heads, 1)` bias is added along the *length* axis whenever the length
    equals the number of heads (a silent wrong answer, seen with Keras 3.15).
    `x - (-bias)` takes the plain broadcasting path on every backend.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.supports_masking = True  # the parent layer handles masks

    def quantize(self, mode=None, type_check=True, config=None):
        # EinsumDense refuses subclasses by default; this one only changes
        # the float bias add, so its quantized paths are EinsumDense's own.
        super().quantize(mode, type_check=False, config=config)

    def call(self, inputs, training=None):
        return self._add_bias(ops.einsum(self.equation, inputs, self.kernel))

    def quantized_call(self, *args, **kwargs):
        # EinsumDense's quantized paths add the bias with `ops.add` too: run
        # them without it (set around the layer's attribute tracking, which
        # must not see the swap), then add it the safe way.
        bias = self.bias
        object.__setattr__(self, "bias", None)
        try:
            x = super().quantized_call(*args, **kwargs)
        finally:
            object.__setattr__(self, "bias", bias)
        return self._add_bias(x)

    def _add_bias(self, x):
        if self.bias is None:
            return x
        return ops.subtract(x, ops.negative(ops.cast(self.bias, x.dtype)))


def _query_blocks(q, k, n_heads):
    """Slices of the queries to pool one after the other.

    One block (all queries) unless the sizes are known and a whole
    `(batch, heads, queries, keys)` tensor would pass
    `_kernels.pooling_block_elements()`; never a Python test of a traced
    size.
    """
    batch, n_queries = _checks.shape_of(q)[:2]
    n_keys = _checks.shape_of(k)[1]
    if None in (batch, n_queries, n_keys):
        return [slice(None)]
    per_query = max(1, batch * n_heads * n_keys)
    rows = max(1, _kernels.pooling_block_elements() // per_query)
    if rows >= n_queries:
        return [slice(None)]
    return [slice(s, min(s + rows, n_queries)) for s in range(0, n_queries, rows)]


def _take_rows(x, axis, rows):
    """`x`'s queries axis sliced to `rows`, unless it is 1 (broadcast)."""
    if rows == slice(None) or _checks.shape_of(x)[axis] == 1:
        return x
    return x[(slice(None),) * axis + (rows,)]


def _sum(terms):
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def _softmax(x, axis):
    # The backends' fused softmax (torch's is 2x faster than max/exp/sum/divide
    # as separate ops). Not `keras.ops.softmax`: it warns when the axis has
    # length 1 (one key), a legitimate case here, and a Python test of the
    # length would be frozen by tracers (ONNX export, symbolic shapes).
    return _backend_softmax(x, axis=axis)


class _ArrayInitializer(keras.initializers.Initializer):
    """Fills a weight with a given array (never serialized: see get_config)."""

    def __init__(self, value):
        self.value = np.asarray(value)

    def __call__(self, shape, dtype=None):
        if tuple(shape) != self.value.shape:
            raise ValueError(
                f"`position_embedding` has shape {self.value.shape}, expected "
                f"{tuple(shape)}"
            )
        return ops.convert_to_tensor(self.value, dtype=dtype)
