"""The `RelativeAttention` layer: DeBERTa-style disentangled attention."""

import dataclasses
import math

import keras
import numpy as np
from keras import ops

from keras_relattn import _arguments, _block_plan, _checks, _offsets
from keras_relattn._calling import KeywordCallArguments
from keras_relattn._logits import LogitSum, attend, combine_masks
from keras_relattn._position_terms import position_terms
from keras_relattn._weights import AttentionWeights

# The call arguments besides the three inputs that `_checks.call_inputs` checks.
_CHECKED_CALL_ARGUMENTS = (
    "mask", "relative_positions", "no_position_mask", "base_attn", "position_embedding",
    "query_positions", "key_positions",
)
# The call arguments the layer converts itself.
_CALL_ARGUMENTS = (
    "content_queries", "content_keys", "content_values", *_CHECKED_CALL_ARGUMENTS,
)


@keras.saving.register_keras_serializable(package="keras_relattn")
class RelativeAttention(KeywordCallArguments, AttentionWeights, keras.layers.Layer):
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
        size (int | None): Size of the pooled output (`n_heads * value head size`).
            Default for `query_size` and `key_size`. May be None with
            `do_pooling=False` when both of those are given.
        n_heads (int): Number of pooling attention heads.
        query_size (int | None): Feature size of the content queries. Defaults to
            `size`.
        key_size (int | None): Feature size of the content keys. Defaults to `size`.
        value_size (int | None): Feature size of the content values. Defaults to
            `key_size` (as in edspdf).
        head_size (int | None): Size of each query/key head. Defaults to
            `key_size // n_heads`.
        position_embedding (array | None): the table (numpy or backend tensor), shape
            `(n_positions, position_size)`: the relative position table. It is
            stored as a weight of the layer (`position_embedding`), never in
            the config.
        position_embedding_shape (tuple | None): `(n_positions, position_size)`:
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
        mode (tuple[str, ...]): of `"c2c"`, `"c2p"`, `"p2c"`: the terms to compute.
        n_additional_heads (int): Logit-only heads, placed first on the heads
            axis of the returned logits.
        kernel_initializer (str | keras.initializers.Initializer): initializer
            of the projections' kernels.
        bias_initializer (str | keras.initializers.Initializer): initializer
            of the projections' biases.
        kernel_regularizer (str | keras.regularizers.Regularizer | None):
            regularizer of the projections' kernels.
        bias_regularizer (str | keras.regularizers.Regularizer | None):
            regularizer of the projections' biases and of the head bias.
        kernel_constraint (str | keras.constraints.Constraint | None):
            constraint of the projections' kernels.
        bias_constraint (str | keras.constraints.Constraint | None):
            constraint of the projections' biases and of the head bias.
        seed (int | None): seed of the dropout.
        sequence_positions (bool): the positions are each token's index (text):
            the layer forms the offsets `key index - query index` itself, and
            takes no positions input. Then `return_logits=False` computes the
            position terms only where they vary, a band of keys around each
            block of queries (outside it, every pair reads an edge row of the
            clamped table): see "Performance". Needs a table and
            `n_coordinates=1`.
        tied_position_projections (bool): DeBERTa's `share_att_key`: the
            position keys and queries are the content key and query
            projections applied to the table (one weight each, no position
            projections of their own). Needs `n_coordinates=1` and a table as
            wide as the queries and keys.
        position_dropout_p (float | None): DeBERTa's dropout placement: with a
            rate here, `dropout_p` drops the attention probabilities only and
            this rate the table (one mask for both terms), nothing the raw
            queries, keys and values. None: edspdf's (`dropout_p` on all).
        position_buckets (tuple | None): `(bucket_size, max_position)`:
            DeBERTa's relative positions. The offset of key `j` to query `i`
            reads table row `n_positions // 2 + bucket(i - j)`, with
            `positions.log_bucket_positions`' buckets (query minus key, as
            DeBERTa): use a table of `2 * bucket_size` rows.
        **kwargs (dict): other `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        See `call` below (typed): `content_queries`, `content_keys`,
        `content_values`, `mask`, `relative_positions` (or `query_positions`
        and `key_positions`), `no_position_mask`, `base_attn`,
        `position_embedding`, `training`, `return_logits`, and the Keras masks
        of the inputs.

    Returns:
        Tensor | tuple: `(pooled, logits)` when `content_values` is given, else `logits`;
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

    def __init__(self, size, n_heads, query_size=None, key_size=None, value_size=None,
                 head_size=None, position_embedding=None, dropout_p=0.0,
                 same_key_query_proj=False, same_positional_key_query_proj=False,
                 n_coordinates=1, head_bias=True, do_pooling=True, mode=("c2c", "c2p", "p2c"),
                 n_additional_heads=0, position_embedding_shape=None,
                 position_embedding_trainable=False, kernel_initializer="glorot_uniform",
                 bias_initializer="zeros", kernel_regularizer=None, bias_regularizer=None,
                 kernel_constraint=None, bias_constraint=None, seed=None,
                 sequence_positions=False, tied_position_projections=False,
                 position_dropout_p=None, position_buckets=None, **kwargs):
        super().__init__(**kwargs)
        checked = _arguments.relative_attention_arguments(
            size, n_heads, query_size=query_size, key_size=key_size, value_size=value_size,
            head_size=head_size, position_embedding=position_embedding,
            position_embedding_shape=position_embedding_shape, dropout_p=dropout_p,
            same_key_query_proj=same_key_query_proj,
            same_positional_key_query_proj=same_positional_key_query_proj,
            n_coordinates=n_coordinates, head_bias=head_bias, do_pooling=do_pooling, mode=mode,
            n_additional_heads=n_additional_heads, sequence_positions=sequence_positions,
            tied_position_projections=tied_position_projections,
            position_dropout_p=position_dropout_p, position_buckets=position_buckets)
        # `size`, `n_heads`, ..., `position_buckets`: the fields of `AttentionArguments`.
        for field in dataclasses.fields(checked):
            setattr(self, field.name, getattr(checked, field.name))
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
        # DeBERTa's placement: the table's own dropout (and none on the inputs).
        self._position_dropout_layer = (
            keras.layers.Dropout(self.position_dropout_p,
                                 seed=None if seed is None else seed + 1, dtype=self.dtype_policy)
            if self.position_dropout_p else None
        )
        # Made by `build`; None where the configuration has no use for one.
        self._query_projection = self._key_projection = self._value_projection = None
        self._position_query_projection = self._position_key_projection = None
        self.position_embedding = self.head_bias = None

    # ------------------------------------------------------------- call
    def call(self, content_queries, content_keys=None, content_values=None, mask=None,
             relative_positions=None, no_position_mask=None, base_attn=None,
             position_embedding=None, training=None, return_logits=True, query_positions=None,
             key_positions=None, content_queries_mask=None, content_keys_mask=None,
             content_values_mask=None):
        """Runs the attention (edspdf's `forward`, and more).

        Args:
            content_queries (Tensor): `(batch, n_queries, query_size)` float.
            content_keys (Tensor | None): `(batch, n_keys, key_size)`;
                defaults to the queries.
            content_values (Tensor | None): `(batch, n_keys, value_size)`;
                when given (and `do_pooling`), the pooled output is returned
                too.
            mask (Tensor | None): bool or 0/1, True = attend: `(batch,
                n_keys)`, `(batch, n_queries, n_keys)` or `(batch, n_queries,
                n_keys, n_heads)` (pooling heads only). None: every key. It
                only affects pooling: the returned logits are unmasked.
            relative_positions (Tensor | None): integer `(batch or 1,
                n_queries, n_keys, n_coordinates)`: each key's position
                relative to each query.
            no_position_mask (Tensor | None): bool `(batch or 1, n_queries,
                n_keys)`; True disables the position terms of that pair.
            base_attn (Tensor | None): float `(batch, n_queries, n_keys,
                n_heads + n_additional_heads)` (sizes of 1 broadcast) added to
                the logits.
            position_embedding (Tensor | None): `(n_positions,
                position_size)`, used instead of the layer's own table (e.g. a
                `PositionTable`'s output shared by several layers).
            training (bool | None): whether dropout is active.
            return_logits (bool): True (edspdf's outputs) or False: the
                pooled output alone, computed for the pooling heads only,
                over blocks of queries for long inputs (recomputed in the
                backward pass), and with `sequence_positions`, on the banded
                path: the fast way to run a stack that never reads logits.
            query_positions (Tensor | None): integer `(batch or 1, n_queries,
                n_coordinates)`, each query's coordinates, with
                `key_positions`, instead of `relative_positions`: the layer
                forms the offsets `key - query` block by block (no
                `(n_queries, n_keys)` tensor). Offsets must fit int32.
            key_positions (Tensor | None): integer `(batch or 1, n_keys,
                n_coordinates)`; defaults to `query_positions` in self
                attention.
            content_queries_mask (Tensor | None): the queries' Keras mask
                `(batch, n_queries)`, filled in by Keras; in self attention it
                masks keys.
            content_keys_mask (Tensor | None): the keys' Keras mask, filled
                in by Keras; it masks keys (combined with `mask`).
            content_values_mask (Tensor | None): the values' Keras mask,
                likewise.

        Returns:
            Tensor | tuple: `(pooled, logits)` with values, else `logits`;
            `pooled` alone with `return_logits=False`. `pooled`: `(batch,
            n_queries, size)`; `logits`: `(batch, n_queries, n_keys, n_heads
            + n_additional_heads)`.
        """
        inputs = self._checked_inputs(
            return_logits, content_queries, content_keys, content_values, mask,
            relative_positions, no_position_mask, base_attn, position_embedding,
            query_positions, _offsets.default_key_positions(
                content_queries, content_keys, query_positions, key_positions))
        queries, keys, values = (inputs.pop(name) for name in _CALL_ARGUMENTS[:3])
        key_mask = content_queries_mask if keys is None else content_keys_mask
        keys = queries if keys is None else keys
        if self._statically_empty(queries, keys):
            return self._empty_outputs(queries, keys, values, return_logits)
        attend_mask, keys_only = combine_masks(inputs["mask"], key_mask, content_values_mask)
        q, k, position = self._heads(queries, keys, inputs, training)
        if not return_logits:
            return self._pooled_only(q, k, values, position, inputs["base_attn"],
                                     attend_mask, keys_only, training)
        logits = self._logits(q, k, position, inputs["base_attn"])
        if values is None:
            return logits.bqkh()
        values = self.value_projection(self._input_dropout(values, training))
        pooled = attend(logits.bhqk()[:, self.n_additional_heads:], values, attend_mask,
                        lambda weights: self._dropout(weights, training))
        return self._merge_heads(pooled), logits.bqkh()

    # ------------------------------------------------------------ call steps
    def _checked_inputs(self, return_logits, *given):
        """The call's inputs (`_CALL_ARGUMENTS`, in order) by name, converted
        and checked (`_checks.call_inputs`)."""
        inputs = {name: self._convert_input(name, value)
                  for name, value in zip(_CALL_ARGUMENTS, given)}
        _checks.call_inputs(self, **inputs, return_logits=return_logits,
                            offsets_formed=self._formed(inputs["relative_positions"]))
        return inputs

    def _convert_input(self, name, value):
        """A call input as a tensor, as Keras converts layer inputs, except
        that Python lists become arrays and 64-bit integer offsets are
        clamped while still 64-bit (JAX without x64 wraps them to int32 on
        conversion; any offset beyond the bound lies beyond any table)."""
        if value is None or isinstance(value, (keras.KerasTensor, _offsets.FormedOffsets)):
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
            bound = _offsets.OFFSET_BOUND
            value = np.clip(value, -bound, bound).astype("int32")
        return self.dtype_policy.convert_input(value, self.autocast, self.input_dtype)

    @staticmethod
    def _formed(relative_positions):
        return isinstance(relative_positions, _offsets.FormedOffsets)

    @staticmethod
    def _statically_empty(queries, keys):
        # Statically empty inputs only: a dynamic length is no Python test
        # (tracers would freeze it), and the ops below handle zero sizes too.
        return 0 in _checks.shape_of(queries)[:2] + _checks.shape_of(keys)[:2]

    def _heads(self, queries, keys, inputs, training):
        """`(q, k, position)`: the content heads (`_content_heads`) and, where
        the position terms are on, `((pos_q, pos_k), offsets,
        no_position_mask)`, else None."""
        offsets = inputs["relative_positions"]
        if self.sequence_positions:  # token indices: the offsets formed block by block
            offsets = _offsets.sequence_offsets(queries, keys)
        elif inputs["query_positions"] is not None:  # offsets formed block by block
            offsets = _offsets.token_offsets(inputs["query_positions"], inputs["key_positions"])
        use_positions = offsets is not None and self._has_position_terms
        scale = self._logit_scale(use_positions)
        q, k = self._content_heads(queries, keys, scale, training)
        if not use_positions:
            return q, k, None
        tables = self._position_tables(inputs["position_embedding"], scale, training)
        return q, k, (tables, offsets, inputs["no_position_mask"])

    def _logit_scale(self, use_positions):
        """Every term is divided by sqrt(head_size) and their sum by
        sqrt(number of terms): one scale, applied to the (small) projected
        queries and position queries."""
        n_terms = len([m for m in self.mode if m == "c2c" or use_positions])
        return 1.0 / (math.sqrt(self.head_size) * math.sqrt(n_terms))

    def _content_heads(self, queries, keys, scale, training):
        """`(q, k)`, each `(batch, length, heads, head_size)`; `q` scaled."""
        q = self.query_projection(self._input_dropout(queries, training))
        k = self.key_projection(self._input_dropout(keys, training))
        return q * ops.cast(scale, q.dtype), k

    def _position_tables(self, table, scale, training):
        """The projected tables `(pos_q, pos_k)`: each `(n_positions,
        coordinates, heads, chunk)`, or None when its term is off; `pos_q`
        scaled."""
        table = self.position_embedding if table is None else table
        table = ops.cast(table, self.compute_dtype)
        coords = self.n_coordinates
        chunks = (-1, coords, self.position_embedding_shape[1] // coords)

        if self._position_dropout_layer is not None:  # DeBERTa's: one mask for both terms
            table = self._position_dropout_layer(table, training=training)

        def project(projection):
            if self.tied_position_projections:  # the content projections, on the table
                return ops.reshape(projection(table[None]), (-1, 1) + tuple(
                    projection.kernel.shape[1:]))
            return projection(ops.reshape(self._input_dropout(table, training), chunks))

        pos_q = pos_k = None
        if "c2p" in self.mode:
            pos_k = project(self.key_projection if self.tied_position_projections
                            else self.position_key_projection)
        if "p2c" in self.mode:
            pos_q = project(self.query_projection if self.tied_position_projections
                            else self.position_query_projection)
            pos_q = pos_q * ops.cast(scale, pos_q.dtype)
        return pos_q, pos_k

    def _logits(self, q, k, position, base_attn):
        """Every head's logits, `LogitSum` of c2c + c2p + p2c (scaled),
        base and head bias."""
        logits = LogitSum()
        if "c2c" in self.mode:
            logits.add(ops.einsum("bqhd,bkhd->bhqk", q, k), "bhqk")
        if position is not None:
            (pos_q, pos_k), offsets, no_position_mask = position
            terms, tensors, constants = position_terms(
                q, k, pos_q, pos_k, offsets, no_position_mask, buckets=self.position_buckets)
            logits.add(terms.logits(tensors, constants), terms.output)
        if base_attn is not None:
            logits.add(ops.cast(base_attn, self.compute_dtype), "bqkh")
        if self.use_head_bias:
            logits.add_head_bias(self.head_bias)
        return logits

    def _pooled_only(self, q, k, values, position, base_attn, attend_mask, keys_only,
                     training):
        """The pooled output alone (`return_logits=False`): the pooling heads
        only, planned and run in blocks of queries (`_block_plan.pool`)."""
        first = self.n_additional_heads
        dropout = self._dropout_layer if bool(training) else None
        if position is not None:
            tables, offsets, no_position_mask = position
            tables = tuple(None if t is None else t[:, :, first:] for t in tables)
            position = (tables, offsets, no_position_mask)
        base = None
        if base_attn is not None:
            base = _block_plan.pooling_heads(ops.cast(base_attn, self.compute_dtype), first,
                                             self.total_heads)
        pooled = _block_plan.pool(
            q[:, :, first:], k[:, :, first:],
            self.value_projection(self._input_dropout(values, training)),
            position=position, base=base,
            head_bias=(ops.cast(self.head_bias[first:], self.compute_dtype)
                       if self.use_head_bias else None),
            attend_mask=attend_mask, keys_only=keys_only, c2c="c2c" in self.mode,
            banded=self.sequence_positions, buckets=self.position_buckets, dropout=dropout)
        return self._merge_heads(pooled)

    def _merge_heads(self, pooled):
        return ops.reshape(pooled, (ops.shape(pooled)[0], ops.shape(pooled)[1], self.size))

    def _input_dropout(self, x, training):
        """edspdf's dropout of the raw inputs and table (none with DeBERTa's
        placement)."""
        if self.position_dropout_p is not None:
            return x
        return self._dropout(x, training)

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

    # ------------------------------------------------------- keras plumbing
    def compute_output_shape(
        self,
        content_queries_shape,
        content_keys_shape=None,
        content_values_shape=None,
    ):
        """`logits` shape, or `(pooled, logits)` shapes when values are given."""
        _checks.feature_shapes(
            self, content_queries_shape, content_keys_shape, content_values_shape
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
        kwargs["key_positions"] = _offsets.default_key_positions(
            content_queries, content_keys, kwargs.get("query_positions"),
            kwargs.get("key_positions"),
        )
        _checks.call_inputs(
            self, content_queries, content_keys, content_values,
            **{name: kwargs.get(name) for name in _CHECKED_CALL_ARGUMENTS},
            return_logits=return_logits,
            offsets_formed=self._formed(kwargs.get("relative_positions")),
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
                "sequence_positions": self.sequence_positions,
                "tied_position_projections": self.tied_position_projections,
                "position_dropout_p": self.position_dropout_p,
                "position_buckets": (None if self.position_buckets is None
                                     else list(self.position_buckets)),
            }
        )
        return config
