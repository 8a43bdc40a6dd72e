"""The weights of `RelativeAttention`: its projections, table and head bias,
built at once from the configuration, and what acts on them all (LoRA, int8)."""

import inspect

import keras

from keras_relattn import _checks
from keras_relattn._projection import ArrayInitializer, Projection


class AttentionWeights:
    """A mixin of `RelativeAttention`: `build` and the sublayers, by the names
    Keras' `MultiHeadAttention` uses (`query`, `key`, `value`, plus
    `position_query`, `position_key`), so that LoRA, quantization and
    `LayoutMap` regexes find them."""

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
            _checks.feature_shapes(
                self, content_queries_shape, content_keys_shape, content_values_shape
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
        if self.position_embedding_shape is not None and not self.tied_position_projections:
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
