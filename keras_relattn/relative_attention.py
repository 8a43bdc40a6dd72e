"""The `RelativeAttention` layer: DeBERTa-style disentangled attention."""

import functools
import inspect
import math

import keras
import numpy as np
from keras import ops

from keras_relattn import _blockwise, _checks, _kernels, config
from keras_relattn._calling import KeywordCallArguments
from keras_relattn._checks import MODES
from keras_relattn._projection import ArrayInitializer, Projection

# edspdf *replaces* masked logits by this value before the softmax (it does
# not add it).  It is representable in float16 and bfloat16, and the softmax
# always runs in float32, so it can neither overflow nor produce NaN.
MASKED_LOGIT = -10000.0

# The call arguments besides the three inputs that `_check_call_inputs` checks.
_CHECKED_CALL_ARGUMENTS = (
    "mask", "relative_positions", "no_position_mask", "base_attn", "position_embedding",
    "query_positions", "key_positions",
)
# The call arguments the layer converts itself.
_CALL_ARGUMENTS = (
    "content_queries", "content_keys", "content_values", *_CHECKED_CALL_ARGUMENTS,
)


@keras.saving.register_keras_serializable(package="keras_relattn")
class RelativeAttention(KeywordCallArguments, keras.layers.Layer):
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
        size (int): Size of the pooled output (`n_heads * value head size`).
            Default for `query_size` and `key_size`. May be None with
            `do_pooling=False` when both of those are given.
        n_heads (int): Number of pooling attention heads.
        query_size (int): Feature size of the content queries. Defaults to
            `size`.
        key_size (int): Feature size of the content keys. Defaults to `size`.
        value_size (int): Feature size of the content values. Defaults to
            `key_size` (as in edspdf).
        head_size (int): Size of each query/key head. Defaults to
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
        position_embedding_trainable (bool): Whether the table is trained.
            Default `False`, like edspdf's buffer for a plain tensor.
        dropout_p (float): Dropout rate applied, as edspdf does, to the raw
            queries, keys and values, to the table and to the attention
            weights. Default `0.0`.
        same_key_query_proj (bool): Share the content *and* positional
            projections between keys and queries.
        same_positional_key_query_proj (bool): Share only the positional
            projections.
        n_coordinates (int): Number of coordinates of a relative position
            (1 for text, 2 for page layouts and images, ...).
        head_bias (bool): Learn a per-head bias added to the logits.
        do_pooling (bool): Whether the layer pools values at all. With
            `False` it only computes logits and has no value projection.
        mode: sequence of `"c2c"`, `"c2p"`, `"p2c"`: the terms to compute.
        n_additional_heads (int): Logit-only heads, placed first on the heads
            axis of the returned logits.
        kernel_initializer: initializer of the projections' kernels.
        bias_initializer: initializer of the projections' biases.
        kernel_regularizer: regularizer of the projections' kernels.
        bias_regularizer: regularizer of the projections' biases and of the
            head bias.
        kernel_constraint: constraint of the projections' kernels.
        bias_constraint: constraint of the projections' biases and of the
            head bias.
        seed (int | None): seed of the dropout.
        **kwargs: other `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        - `content_queries`: `(batch, n_queries, query_size)` float tensor.
        - `content_keys`: `(batch, n_keys, key_size)`; defaults to the queries.
        - `content_values`: `(batch, n_keys, value_size)`; when given (and
            `do_pooling`), the layer returns the pooled output too.
        - `mask`: bool or 0/1 tensor, True = attend. Shape `(batch, n_keys)`,
            `(batch, n_queries, n_keys)` or `(batch, n_queries, n_keys,
            n_heads)` (pooling heads only). `None` means attend to all keys.
            It only affects pooling: the returned logits are unmasked.
        - `relative_positions`: integer tensor `(batch or 1, n_queries, n_keys,
            n_coordinates)`: position of each key relative to each query.
        - `no_position_mask`: bool tensor `(batch or 1, n_queries, n_keys)`; True
            disables the position terms for that pair.
        - `base_attn`: float tensor `(batch, n_queries, n_keys, n_heads +
            n_additional_heads)` added to the logits.
        - `training` (bool): whether dropout is active.
        - `return_logits` (bool): default True (edspdf's outputs). With False
            (values required), only the pooled output is returned, like
            `MultiHeadAttention(..., return_attention_scores=False)`: the
            fast way to run a stack that never reads the logits. It computes
            only the pooling heads and, for long inputs, works through blocks
            of queries, so no `(batch, heads, queries, keys)` tensor is held
            for the whole input; in training each block is recomputed in the
            backward pass (FlashAttention-2's scheme), so no such tensor is
            kept for it either.
        - `position_embedding`: optional `(n_positions, position_size)` tensor
            used instead of the layer's own table, e.g. the output of a
            `keras_relattn.PositionTable` shared by several layers.
        - `query_positions`: integer tensor `(batch or 1, n_queries,
            n_coordinates)`, each query's coordinates, with `key_positions`
            `(batch or 1, n_keys, n_coordinates)`, instead of
            `relative_positions`: the layer forms the offsets `key -
            query` block by block, so no `(n_queries, n_keys)` positions
            tensor is ever needed (`keras_relattn.positions.
            sequence_positions`, `grid_positions`). In self attention
            `key_positions` defaults to `query_positions`. Offsets must fit
            int32 (coordinates within 2**31 of each other).
        - `key_positions`: see `query_positions`.
        - `content_queries_mask`, `content_keys_mask`, `content_values_mask`: Keras
            masks `(batch, length)`, filled in by Keras from the inputs'
            masks; the keys' and values' masks mask keys (in self attention
            the queries' mask is the keys' mask). They combine with `mask`.

    Returns:
        `(pooled, logits)` when `content_values` is given, else `logits`;
        `pooled` alone with `return_logits=False`.
        `pooled`: `(batch, n_queries, size)`; it carries the queries' Keras
        mask. `logits`: `(batch, n_queries, n_keys, n_heads +
        n_additional_heads)`, unmasked, bias included.

    Examples:
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
        checked = _checks.attention_arguments(
            size, n_heads, query_size, key_size, value_size, head_size, dropout_p,
            same_key_query_proj, n_coordinates, do_pooling, mode, n_additional_heads,
            position_embedding, position_embedding_shape,
        )
        self.size = checked["size"]
        self.n_heads = checked["n_heads"]
        self.query_size = checked["query_size"]
        self.key_size = checked["key_size"]
        self.value_size = checked["value_size"]
        self.head_size = checked["head_size"]
        self.dropout_p = checked["dropout_p"]
        self.n_coordinates = checked["n_coordinates"]
        self.mode = checked["mode"]
        self.n_additional_heads = checked["n_additional_heads"]
        self.position_embedding_shape = checked["position_embedding_shape"]
        self.same_key_query_proj = bool(same_key_query_proj)
        self.same_positional_key_query_proj = bool(same_positional_key_query_proj)
        self.use_head_bias = bool(head_bias)
        self.do_pooling = bool(do_pooling)
        self.total_heads = self.n_heads + self.n_additional_heads
        self.value_head_size = None if self.size is None else self.size // self.n_heads
        self.position_embedding_trainable = bool(position_embedding_trainable)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        self.seed = seed
        self.supports_masking = True
        # `call` converts its inputs itself (`_convert_input`): 64-bit offsets
        # must be clamped before a backend without int64 (JAX) narrows them.
        self._convert_input_args = False
        self._allow_non_tensor_positional_args = True

        self._initial_table = position_embedding
        self._dropout_layer = (
            keras.layers.Dropout(self.dropout_p, seed=seed, dtype=self.dtype_policy)
            if self.dropout_p > 0
            else None
        )
        # Made by `build`; None where the configuration has no use for one.
        self._query_projection = None
        self._key_projection = None
        self._value_projection = None
        self._position_query_projection = None
        self._position_key_projection = None
        self.position_embedding = None
        self.head_bias = None

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
        projection = Projection(
            "bsi,ihd->bshd",
            output_shape=(None, heads, head_size),
            bias_axes="hd",
            name=name,
            **self._sublayer_kwargs(),
        )
        projection.build((None, None, input_size))
        return projection

    def _position_projection(self, name):
        position_size = self.position_embedding_shape[1]
        coords = self.n_coordinates
        projection = Projection(
            "pxi,xihd->pxhd",
            output_shape=(coords, self.total_heads, self.head_size // coords),
            bias_axes="xhd",
            name=name,
            **self._sublayer_kwargs(),
        )
        projection.build((None, coords, position_size // coords))
        return projection

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
        self._key_projection = self._content_projection(
            "key", self.key_size, self.total_heads, self.head_size
        )
        if not self.same_key_query_proj:
            self._query_projection = self._content_projection(
                "query", self.query_size, self.total_heads, self.head_size
            )
        if self.do_pooling:
            self._value_projection = self._content_projection(
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
                    else ArrayInitializer(keras.ops.convert_to_numpy(initial))
                ),
                trainable=self.position_embedding_trainable,
            )
            self._initial_table = None
        # A position projection exists only where a term of `mode` reads it:
        # c2p the keys' one, p2c the queries' one (the keys' one when
        # shared). One that nothing reads would get no gradient; an edspdf
        # state dict that carries it still loads (see `porting`).
        if self.position_embedding_shape is not None:
            if "c2p" in self.mode or ("p2c" in self.mode and self._shares_position_projection):
                self._position_key_projection = self._position_projection("position_key")
            if "p2c" in self.mode and not self._shares_position_projection:
                self._position_query_projection = self._position_projection(
                    "position_query"
                )
        if self.use_head_bias:
            self.head_bias = self.add_weight(
                name="head_bias",
                shape=(self.total_heads,),
                initializer="zeros",
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
            )
        self.built = True

    @property
    def _has_position_terms(self):
        return "c2p" in self.mode or "p2c" in self.mode

    @property
    def _shares_position_projection(self):
        return self.same_key_query_proj or self.same_positional_key_query_proj

    @property
    def owns_table(self):
        """Whether the table is a weight of this layer (else passed at call)."""
        shape = self.position_embedding_shape
        return shape is not None and shape[0] is not None

    # ------------------------------------------------------------ sublayers
    @property
    def query_projection(self):
        """The queries' `EinsumDense` (the keys' one with `same_key_query_proj`)."""
        if self.same_key_query_proj:
            return self._key_projection
        return self._query_projection

    @property
    def key_projection(self):
        """The keys' `EinsumDense`, kernel `(key_size, heads, head_size)`."""
        return self._key_projection

    @property
    def value_projection(self):
        """The values' `EinsumDense`, or None with `do_pooling=False`."""
        return self._value_projection

    @property
    def position_key_projection(self):
        """The table's projection for c2p, or None when no term reads it
        (no table, or neither c2p nor a shared p2c)."""
        return self._position_key_projection

    @property
    def position_query_projection(self):
        """The table's projection for p2c (the keys' one when shared), or
        None when there is no table or no p2c."""
        if "p2c" not in self.mode:
            return None
        if self._shares_position_projection:
            return self._position_key_projection
        return self._position_query_projection

    def projections(self):
        """The `EinsumDense` projections of this layer, each once."""
        if not self.built:
            self.build()
        found = []
        for projection in (
            self.key_projection, self.query_projection, self.value_projection,
            self.position_key_projection, self.position_query_projection,
        ):
            if projection is not None and all(projection is not p for p in found):
                found.append(projection)
        return found

    def quantize(self, mode=None, type_check=True, config=None):
        """Quantizes every projection (as `Model.quantize` does).

        For inference: the head bias and the table stay float.
        """
        for projection in self.projections():
            projection.quantize(mode, type_check=type_check, config=config)

    def enable_lora(self, rank, lora_alpha=None, a_initializer="he_uniform",
                    b_initializer="zeros"):
        """Adds LoRA adapters to every projection (content and positional).

        The base kernels are frozen; only the adapters (and the biases and
        the head bias) stay trainable, as with `keras.layers.EinsumDense`.
        """
        options = dict(a_initializer=a_initializer, b_initializer=b_initializer)
        if lora_alpha is not None:
            if "lora_alpha" not in inspect.signature(Projection.enable_lora).parameters:
                raise ValueError(
                    f"`lora_alpha` needs Keras >= 3.10 (this is Keras "
                    f"{keras.__version__}). Received: lora_alpha={lora_alpha}"
                )
            options["lora_alpha"] = lora_alpha
        for projection in self.projections():
            projection.enable_lora(rank, **options)

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
        query_positions=None, key_positions=None, return_logits=True,
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
        given = "relative_positions"
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
            if positional and self.position_embedding_shape is None:
                raise ValueError(
                    f"`{given}` was given but the layer has no "
                    "position table: pass `position_embedding` to the "
                    "constructor."
                )
            if positional and not self.owns_table and position_embedding is None:
                raise ValueError(
                    f"`{given}` was given but no table: this layer "
                    "was built with `position_embedding_shape=(None, "
                    f"{self.position_embedding_shape[1]})`, so pass the table "
                    "at call time as `position_embedding=`."
                )
        if isinstance(relative_positions, _kernels.BlockOffsets):
            pass  # formed inside the package from checked inputs (`BoxTransformer`)
        elif relative_positions is not None:
            _checks.check_integer("relative_positions", relative_positions)
            _checks.check_shape(
                "relative_positions", _checks.shape_of(relative_positions),
                (batch, n_queries, n_keys, self.n_coordinates),
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
                _checks.check_integer(name, tokens)
                _checks.check_shape(
                    name, _checks.shape_of(tokens), (batch, length, self.n_coordinates),
                    f"(batch or 1, {'n_queries' if name[0] == 'q' else 'n_keys'}, "
                    "n_coordinates)",
                    broadcast=(0,),
                )
        elif "c2c" not in self.mode:
            raise ValueError(
                f"`mode={self.mode}` needs `relative_positions` (or "
                "`query_positions` and `key_positions`): without them no "
                "attention term can be computed."
            )

    # ------------------------------------------------------------- call
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
        query_positions=None,
        key_positions=None,
        content_queries_mask=None,
        content_keys_mask=None,
        content_values_mask=None,
    ):
        key_positions = _default_key_positions(
            content_queries, content_keys, query_positions, key_positions
        )
        (
            queries, keys, values, mask, relative_positions, no_position_mask, base_attn,
            table, query_positions, key_positions,
        ) = (
            self._convert_input(name, value) for name, value in zip(_CALL_ARGUMENTS, (
                content_queries, content_keys, content_values, mask, relative_positions,
                no_position_mask, base_attn, position_embedding, query_positions,
                key_positions,
            ))
        )
        self._check_call_inputs(
            queries, keys, values, mask, relative_positions, no_position_mask, base_attn,
            table, query_positions, key_positions, return_logits=return_logits,
        )
        key_mask = content_queries_mask if keys is None else content_keys_mask
        keys = queries if keys is None else keys
        if self._statically_empty(queries, keys):
            return self._empty_outputs(queries, keys, values, return_logits)
        attend = self._combine_masks(mask, key_mask, content_values_mask)
        if query_positions is not None:  # offsets formed block by block
            relative_positions = _kernels.TokenOffsets(query_positions, key_positions)
        use_positions = relative_positions is not None and self._has_position_terms
        scale = self._logit_scale(use_positions)

        q, k = self._content_heads(queries, keys, scale, training)
        tables = self._position_tables(table, scale, training) if use_positions else None
        if not return_logits:
            return self._pooled_only(
                q, k, values, tables, relative_positions, no_position_mask, base_attn,
                attend, training,
            )
        logits = self._logits(q, k, tables, relative_positions, no_position_mask, base_attn)
        if values is None:
            return logits.bqkh()
        pooled = self._pool(
            logits.bhqk()[:, self.n_additional_heads:], values, attend, training
        )
        return pooled, logits.bqkh()

    # ------------------------------------------------------------ call steps
    def _convert_input(self, name, value):
        """A call input as a tensor, as Keras converts layer inputs, except
        that Python lists become arrays and 64-bit integer offsets are
        clamped while still 64-bit (JAX without x64 wraps them to int32 on
        conversion; any offset beyond the bound lies beyond any table)."""
        if value is None or isinstance(value, (keras.KerasTensor, _kernels.BlockOffsets)):
            return value
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
            bound = _kernels.OFFSET_BOUND
            value = np.clip(value, -bound, bound).astype("int32")
        return self.dtype_policy.convert_input(value, self.autocast, self.input_dtype)

    @staticmethod
    def _statically_empty(queries, keys):
        # Statically empty inputs only: a dynamic length is no Python test
        # (tracers would freeze it), and the ops below handle zero sizes too.
        return 0 in _checks.shape_of(queries)[:2] + _checks.shape_of(keys)[:2]

    def _logit_scale(self, use_positions):
        """Every term is divided by sqrt(head_size) and their sum by
        sqrt(number of terms): one scale, applied to the (small) projected
        queries and position queries."""
        n_terms = len([m for m in self.mode if m == "c2c" or use_positions])
        return 1.0 / (math.sqrt(self.head_size) * math.sqrt(n_terms))

    def _content_heads(self, queries, keys, scale, training):
        """`(q, k)`, each `(batch, length, heads, head_size)`; `q` scaled."""
        q = self.query_projection(self._dropout(queries, training))
        k = self.key_projection(self._dropout(keys, training))
        return q * ops.cast(scale, q.dtype), k

    def _position_tables(self, table, scale, training):
        """The projected tables `(pos_q, pos_k)`: each `(n_positions,
        coordinates, heads, chunk)`, or None when its term is off; `pos_q`
        scaled."""
        table = self.position_embedding if table is None else table
        table = ops.cast(table, self.compute_dtype)
        coords = self.n_coordinates
        chunks = (-1, coords, self.position_embedding_shape[1] // coords)

        def project(projection):
            return projection(ops.reshape(self._dropout(table, training), chunks))

        pos_q = pos_k = None
        if "c2p" in self.mode:
            pos_k = project(self.position_key_projection)
        if "p2c" in self.mode:
            pos_q = project(self.position_query_projection)
            pos_q = pos_q * ops.cast(scale, pos_q.dtype)
        return pos_q, pos_k

    def _logits(self, q, k, tables, relative_positions, no_position_mask, base_attn):
        """Every head's logits: c2c + c2p + p2c (scaled), base, head bias."""
        logits = _kernels.LogitSum()
        if "c2c" in self.mode:
            logits.add(ops.einsum("bqhd,bkhd->bhqk", q, k), "bhqk")
        if tables is not None:
            position_terms = _kernels.PositionTerms(
                q, k, *tables, relative_positions, no_position_mask
            )
            logits.add(position_terms.logits(), position_terms.output)
        if base_attn is not None:
            logits.add(ops.cast(base_attn, self.compute_dtype), "bqkh")
        if self.use_head_bias:
            logits.add_head_bias(self.head_bias)
        return logits

    def _pool(self, logits, values, attend, training):
        """Masked float32 softmax of `(batch, pooling heads, queries, keys)`
        logits, averaging the projected values: `(batch, queries, heads,
        value_head_size)`, heads concatenated to `(batch, queries, size)`."""
        values = self.value_projection(self._dropout(values, training))
        return self._merge_heads(self._attend(logits, values, attend, training))

    def _attend(self, logits, values, attend, training, seed=None, first_row=0):
        """Masked float32 softmax, dropout and pooling. With a `seed`, the
        dropout mask is `_blockwise.keep_mask`'s (the same when a block is
        recomputed); else the dropout layer's."""
        logits = ops.cast(logits, "float32")
        if attend is not None:
            logits = ops.where(attend, logits, MASKED_LOGIT)
        weights = ops.cast(_kernels.softmax(logits, axis=-1), self.compute_dtype)
        if seed is None:
            weights = self._dropout(weights, training)
        else:
            rate = self._dropout_layer.rate
            keep = _blockwise.keep_mask(seed, ops.shape(weights), first_row, rate)
            weights = ops.where(keep, weights * ops.cast(1.0 / (1.0 - rate), weights.dtype), 0.0)
        return ops.einsum("bhqk,bkhd->bqhd", weights, values)

    def _merge_heads(self, pooled):
        return ops.reshape(pooled, (ops.shape(pooled)[0], ops.shape(pooled)[1], self.size))

    def _pooled_only(
        self, q, k, values, tables, relative_positions, no_position_mask, base_attn,
        attend, training,
    ):
        """The pooled output alone (`return_logits=False`).

        Only the pooling heads are computed (the additional heads only make
        logits), all in `(batch, heads, queries, keys)`, the layout the
        softmax reads, and over blocks of queries when the inputs are long:
        no `(batch, heads, queries, keys)` tensor is held for the whole input
        (see `_blockwise`). Each block follows the full path's rules
        exactly (mask *replaces* logits by -10000, float32 softmax, dropout).
        With several blocks of a long input, each is recomputed in the
        backward pass instead of kept (`_kernels.checkpoint`), so training is
        bounded too.
        """
        first = self.n_additional_heads
        q, k = q[:, :, first:], k[:, :, first:]
        values = self.value_projection(self._dropout(values, training))
        extra = []  # terms broadcastable to (batch, heads, queries, keys)
        if base_attn is not None:
            base = self._pooling_heads(ops.cast(base_attn, self.compute_dtype))
            extra.append(ops.transpose(base, (0, 3, 1, 2)))
        c2c_q, c2c_k = q, k
        if self.use_head_bias:
            bias = ops.cast(self.head_bias[first:], self.compute_dtype)
            if "c2c" in self.mode:
                # Inside the c2c matmul (q . k + bias . 1): one pass less
                # over the (b, h, q, k) logits.
                c2c_q = ops.concatenate([q, ops.zeros_like(q[..., :1]) + bias[:, None]], -1)
                c2c_k = ops.concatenate([k, ops.ones_like(k[..., :1])], -1)
            else:
                extra.append(bias[:, None, None])
        if "c2c" not in self.mode:
            c2c_q = c2c_k = None
        position_terms = None
        if tables is not None:  # the table scores, once for every block
            pos_q, pos_k = (None if t is None else t[:, :, first:] for t in tables)
            position_terms = _kernels.PositionTerms(
                q, k, pos_q, pos_k, relative_positions, no_position_mask, output="bhqk"
            )
        blocks = _blockwise.query_blocks(q, k, self.n_heads)
        recompute = len(blocks) > 1 and _blockwise.recomputes(q, k, self.n_heads)
        config._record(config.BlockPlan(_checks.shape_of(q)[1], len(blocks), recompute))
        seed = None
        if len(blocks) > 1 and training and self._dropout_layer is not None:
            # One draw per call; each block's mask is a function of it (the
            # same when the block is recomputed, or kept).
            seed = keras.random.randint(
                (), 0, 2**31 - 1, dtype="int32", seed=self._dropout_layer.seed_generator
            )
        tensors = [] if c2c_q is None else [c2c_q, c2c_k]
        if position_terms is not None:
            tensors += position_terms.score_tensors()
        tensors += [values, *extra]
        pooled_block = self._block_function(c2c_q is not None, position_terms, attend, training,
                                            seed)
        if recompute:
            done = _kernels.recomputed_blocks(pooled_block, blocks, tensors)
            if done is not None:
                return self._merge_heads(done)
        pooled = []
        for rows in blocks:
            done = None
            if recompute:
                done = _kernels.checkpoint(functools.partial(pooled_block, rows), tensors)
            elif self._dropout_layer is None or not training:
                block = functools.partial(_kernels.take_rows, axis=2, rows=rows)
                done = _kernels.inference_pooling(
                    None if c2c_q is None else c2c_q[:, rows], c2c_k, position_terms, rows,
                    [block(term) for term in extra], None if attend is None else block(attend),
                    values, MASKED_LOGIT,
                )
            if done is None:
                done = pooled_block(rows, *tensors)
            pooled.append(done)
        return self._merge_heads(pooled[0] if len(pooled) == 1 else ops.concatenate(pooled, 1))

    def _pooling_heads(self, base):
        """`base_attn` `(batch, queries, keys, heads or 1)` for the pooling
        heads only. A heads axis of 1 broadcasts; one of unknown size (a
        trace) may be 1 at run time, so it is broadcast to every head before
        the additional ones are dropped, never sliced blind."""
        first = self.n_additional_heads
        heads = _checks.shape_of(base)[-1]
        if first == 0 or heads == 1:
            return base
        if heads is None:
            base = base + ops.zeros((self.total_heads,), base.dtype)
        return base[..., first:]

    def _block_function(self, has_c2c, position_terms, attend, training, seed):
        """`pooled_block(rows, *tensors)`: one block of queries' logits,
        masked float32 softmax, dropout and pooling, `(batch, rows, heads,
        value_head_size)`.

        `tensors` are whole (the block takes its rows): the c2c queries and
        keys (with c2c), the table scores (`PositionTerms.score_tensors`),
        the values, then the extra terms. They are what a recomputed block
        differentiates (`_kernels.checkpoint`, `recomputed_blocks`); the
        masks and offsets are read in place.
        """
        n_c2c = 2 if has_c2c else 0
        n_scores = 0 if position_terms is None else len(position_terms.score_tensors())

        def pooled_block(rows, *tensors):
            c2c, scores = tensors[:n_c2c], tensors[n_c2c:n_c2c + n_scores]
            values, extra = tensors[n_c2c + n_scores], tensors[n_c2c + n_scores + 1:]
            terms = []
            if c2c:
                c2c_q = _kernels.take_rows(c2c[0], 1, rows)
                terms.append(ops.einsum("bqhd,bkhd->bhqk", c2c_q, c2c[1]))
            if position_terms is not None:
                terms.append(position_terms.with_scores(scores).logits(rows))
            terms += [_kernels.take_rows(term, 2, rows) for term in extra]
            block_attend = None if attend is None else _kernels.take_rows(attend, 2, rows)
            first_row = 0 if rows.start is None else rows.start
            return self._attend(_kernels.add_all(terms), values, block_attend, training, seed,
                                first_row)

        return pooled_block

    def _dropout(self, x, training):
        if self._dropout_layer is None:
            return x
        return self._dropout_layer(x, training=training)

    def _empty_outputs(self, queries, keys, values, return_logits):
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
        pooled = ops.zeros((batch, n_queries, self.size), self.compute_dtype)
        return (pooled, logits) if return_logits else pooled

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
        kwargs["key_positions"] = _default_key_positions(
            content_queries, content_keys, kwargs.get("query_positions"),
            kwargs.get("key_positions"),
        )
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
                "head_bias": self.use_head_bias,
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


def _default_key_positions(queries, keys, query_positions, key_positions):
    """`key_positions`, which default to `query_positions` when the keys are
    the queries (no keys given, or the same tensor)."""
    if key_positions is None and (keys is None or keys is queries):
        return query_positions
    return key_positions
