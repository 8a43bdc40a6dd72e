"""`RelativeTransformerLayer`: edspdf's `BoxTransformerLayer` for Keras."""


import keras
from keras import ops

from keras_relattn import _arguments, _backend
from keras_relattn._calling import KeywordCallArguments
from keras_relattn.relative_attention import RelativeAttention


def exact_gelu(x):
    """The exact GELU (torch's, edspdf's default), in a form every export of
    the backend carries (`_backend.get().exact_gelu`)."""
    return _backend.get().exact_gelu(x)


def tanh_gelu(x):
    """GELU's tanh approximation (torch's `approximate="tanh"`)."""
    return keras.activations.gelu(x, approximate=True)


# "gelu": torch's exact GELU, edspdf's default.
_NAMED_ACTIVATIONS = {"gelu": exact_gelu, "gelu_tanh": tanh_gelu}


def get_activation(activation):
    """The feed-forward activation: `"gelu"` (exact, edspdf's), `"gelu_tanh"`,
    or any Keras activation (a name such as `"relu"`, or a registered
    function)."""
    if isinstance(activation, str) and activation in _NAMED_ACTIVATIONS:
        return _NAMED_ACTIVATIONS[activation]
    if activation == "glu":
        raise ValueError(
            "`activation='glu'` is not supported: edspdf's 'glu' halves the "
            "features and cannot feed its own second linear layer. Use "
            "'gelu' (edspdf's default), 'gelu_tanh', 'relu' or another Keras "
            "activation."
        )
    try:
        function = keras.activations.get(activation)
    except (ValueError, TypeError) as error:
        raise ValueError(
            "`activation` must be 'gelu' (exact, edspdf's default), "
            "'gelu_tanh' or a Keras activation. Received: "
            f"activation={activation!r} ({error})"
        ) from None
    if function is None or not callable(function):
        raise ValueError(
            f"`activation` must name an activation. Received: activation={activation!r}"
        )
    return function


class LayerNorm(keras.layers.LayerNormalization):
    """`LayerNormalization` over the last axis that exports to ONNX from
    torch too (see `_backend.get().layer_norm`); the same weights and
    numbers."""

    def call(self, inputs):
        outputs = _backend.get().layer_norm(
            inputs, ops.convert_to_tensor(self.gamma), ops.convert_to_tensor(self.beta),
            self.epsilon, size=self.gamma.shape[-1],  # a Keras variable's static shape
        )
        if outputs is None:
            return super().call(inputs)
        return ops.cast(outputs, self.compute_dtype)


def serialize_activation(activation):
    """`activation` as a config value: names stay names."""
    if isinstance(activation, str):
        return activation
    return keras.activations.serialize(activation)


@keras.saving.register_keras_serializable(package="keras_relattn")
class RelativeTransformerLayer(KeywordCallArguments, keras.layers.Layer):
    """Relative self attention and a feed-forward block, with gated residuals.

    The equivalent of edspdf's `BoxTransformerLayer`:

    ```
    update, logits = attention(x, x, x, mask, relative_positions, ...)
    x = norm(x + dropout(update) * resweight)
    x = norm2(x + dropout(linear2(dropout(act(linear1(x))))) * resweight2)
    ```

    `resweight` and `resweight2` are learnt scalars starting at
    `init_resweight` (0: the layer starts as the identity, then normalized).
    Weights port both ways with edspdf's names through
    `keras_relattn.load_edspdf_state_dict` / `edspdf_state_dict`.

    Args:
        input_size (int): feature size of the embeddings.
        num_heads (int): attention heads.
        dropout_p (float): dropout of the attention and of the residual
            branches.
        head_size (int | None): size of each attention head (default
            `input_size // num_heads`).
        activation (str | callable): `"gelu"` (exact, as torch's: edspdf's default),
            `"gelu_tanh"` (its tanh approximation), or any Keras activation
            (`"relu"`, `"silu"`, a registered function).
        init_resweight (float): initial value of the residual gates.
        attention_mode (tuple[str, ...]): terms of the attention, see `RelativeAttention`.
        position_embedding (array | None): `(n_positions, position_size)`, the
            attention's own table.
        n_coordinates (int | None): coordinates of a relative position; by default 2
            (edspdf's layer always uses 2), or 1 with `sequence_positions`.
        position_embedding_shape (tuple | None): as in `RelativeAttention`; use
            `(None, position_size)` to pass a shared table at call time.
        position_embedding_trainable (bool): whether an owned table trains.
        sequence_positions (bool): the positions are each token's index (text,
            `n_coordinates=1`): the attention forms them itself, and the
            stack takes no positions input (see `RelativeAttention`).
        layer_norm_epsilon (float): default 1e-5 as `torch.nn.LayerNorm`.
        **kwargs (dict): other `keras.layers.Layer` arguments.

    Call arguments:
        - `embeds`: `(batch, length, input_size)`.
        - `mask`: `(batch, length)` bool, True = a real element. Filled from the
            embeddings' Keras mask when not given. `None`: all real.
        - `relative_positions`: `(batch or 1, length, length, n_coordinates)`
            int tensor.
        - `positions`: `(batch or 1, length, n_coordinates)` int tensor, each
            token's coordinates, instead of `relative_positions`: the
            attention forms the offsets block by block (see
            `RelativeAttention`'s `query_positions`).
        - `no_position_mask`: `(batch or 1, length, length)` bool.
        - `position_embedding`: optional shared table for the attention.
        - `training`: bool.
        - `return_logits` (bool): default True. False returns the embeddings
            alone and runs the attention's pooled-only path (faster, and
            long inputs in bounded memory): the way to run a stack.

    Returns:
        Tensor | tuple: `(embeds, attention_logits)`: `(batch, length, input_size)` and
        `(batch, length, length, num_heads)`; `embeds` alone with
        `return_logits=False`.

    Examples:
        >>> import numpy as np
        >>> from keras_relattn import RelativeTransformerLayer
        >>> from keras_relattn.positions import grid_relative_positions
        >>> layer = RelativeTransformerLayer(32, num_heads=2, init_resweight=0.1,
        ...     position_embedding=np.random.normal(size=(9, 16)).astype("float32"))
        >>> x = np.random.normal(size=(2, 6, 32)).astype("float32")
        >>> out, logits = layer(x, relative_positions=grid_relative_positions(2, 3))
        >>> tuple(out.shape), tuple(logits.shape)
        ((2, 6, 32), (2, 6, 6, 2))

    References:
        - edspdf, `edspdf.layers.box_transformer.BoxTransformerLayer`.
    """

    def __init__(
        self,
        input_size,
        num_heads=2,
        dropout_p=0.0,
        head_size=None,
        activation="gelu",
        init_resweight=0.0,
        attention_mode=("c2c", "c2p", "p2c"),
        position_embedding=None,
        n_coordinates=None,
        position_embedding_shape=None,
        position_embedding_trainable=False,
        layer_norm_epsilon=1e-5,
        seed=None,
        sequence_positions=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self._activation = get_activation(activation)
        self.input_size = _arguments.positive_int("input_size", input_size)
        self.num_heads = _arguments.positive_int("num_heads", num_heads)
        if self.input_size % self.num_heads:
            raise ValueError(
                f"`input_size` ({input_size}) must be divisible by `num_heads` "
                f"({num_heads}): each head pools `input_size // num_heads` features."
            )
        self.dropout_p = _arguments.dropout_rate("dropout_p", dropout_p)
        self.activation = activation
        self.init_resweight = float(init_resweight)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.seed = seed
        self.attention = RelativeAttention(
            size=input_size,
            n_heads=num_heads,
            head_size=head_size,
            position_embedding=position_embedding,
            position_embedding_shape=position_embedding_shape,
            position_embedding_trainable=position_embedding_trainable,
            dropout_p=dropout_p,
            n_coordinates=(1 if sequence_positions else 2) if n_coordinates is None
            else n_coordinates,
            mode=attention_mode,
            do_pooling=True,
            seed=seed,
            sequence_positions=sequence_positions,
            dtype=self.dtype_policy,
            name="attention",
        )
        common = dict(dtype=self.dtype_policy)
        self.norm = LayerNorm(
            epsilon=self.layer_norm_epsilon, name="norm", **common
        )
        self.norm2 = LayerNorm(
            epsilon=self.layer_norm_epsilon, name="norm2", **common
        )
        self.linear1 = keras.layers.Dense(2 * input_size, name="linear1", **common)
        self.linear2 = keras.layers.Dense(input_size, name="linear2", **common)
        # Its own stream: the attention's dropout draws from `seed` already.
        self._dropout_layer = (
            keras.layers.Dropout(
                self.dropout_p, seed=None if seed is None else seed + 1, **common
            )
            if self.dropout_p > 0
            else None
        )
        self.supports_masking = True

    def build(self, embeds_shape=None):
        self.attention.build()
        shape = (None, None, self.input_size)
        self.norm.build(shape)
        self.norm2.build(shape)
        self.linear1.build(shape)
        self.linear2.build((None, None, 2 * self.input_size))
        gate = keras.initializers.Constant(self.init_resweight)
        self.resweight = self.add_weight(name="resweight", shape=(1,), initializer=gate)
        self.resweight2 = self.add_weight(name="resweight2", shape=(1,), initializer=gate)
        self.built = True

    def _dropout(self, x, training):
        if self._dropout_layer is None:
            return x
        return self._dropout_layer(x, training=training)

    def call(
        self,
        embeds,
        mask=None,
        relative_positions=None,
        no_position_mask=None,
        position_embedding=None,
        training=None,
        return_logits=True,
        positions=None,
        embeds_mask=None,
    ):
        """The attention and feed-forward block.

        Args:
            embeds (Tensor): `(batch, length, input_size)`.
            mask (Tensor | None): `(batch, length)` bool, True = a real
                element; by default the embeddings' Keras mask, else all.
            relative_positions (Tensor | None): integer `(batch or 1, length,
                length, n_coordinates)`.
            no_position_mask (Tensor | None): bool `(batch or 1, length,
                length)`.
            position_embedding (Tensor | None): a table shared at call time.
            training (bool | None): whether dropout is active.
            return_logits (bool): True: `(embeds, logits)`; False: the
                embeddings alone, through the attention's pooled path.
            positions (Tensor | None): integer `(batch or 1, length,
                n_coordinates)`, each token's coordinates, instead of
                `relative_positions`.
            embeds_mask (Tensor | None): the embeddings' Keras mask, filled
                in by Keras.

        Returns:
            Tensor | tuple: `(batch, length, input_size)`, with the logits
            `(batch, length, length, num_heads)` when `return_logits`.
        """
        if mask is None:
            mask = embeds_mask
        attended = self.attention(
            embeds, embeds, embeds, mask=mask, relative_positions=relative_positions,
            no_position_mask=no_position_mask, position_embedding=position_embedding,
            training=training, return_logits=return_logits, query_positions=positions,
        )
        update, logits = attended if return_logits else (attended, None)
        gate = ops.cast(self.resweight, self.compute_dtype)
        embeds = self.norm(embeds + self._dropout(update, training) * gate)
        hidden = self._dropout(self._activation(self.linear1(embeds)), training)
        update = self.linear2(hidden)
        gate2 = ops.cast(self.resweight2, self.compute_dtype)
        embeds = self.norm2(embeds + self._dropout(update, training) * gate2)
        return (embeds, logits) if return_logits else embeds

    def compute_output_spec(self, embeds, *args, return_logits=True, **kwargs):
        batch, length = embeds.shape[0], embeds.shape[1]
        embeds = keras.KerasTensor((batch, length, self.input_size), dtype=self.compute_dtype)
        if not return_logits:
            return embeds
        return (
            embeds,
            keras.KerasTensor(
                (batch, length, length, self.attention.total_heads),
                dtype=self.compute_dtype,
            ),
        )

    def compute_mask(self, inputs, previous_mask=None):
        return self.attention.compute_mask(inputs, previous_mask)

    def get_config(self):
        config = super().get_config()
        attention = self.attention
        config.update(
            input_size=self.input_size,
            num_heads=self.num_heads,
            dropout_p=self.dropout_p,
            head_size=attention.head_size,
            activation=serialize_activation(self.activation),
            init_resweight=self.init_resweight,
            attention_mode=list(attention.mode),
            position_embedding=None,
            n_coordinates=attention.n_coordinates,
            position_embedding_shape=(
                None
                if attention.position_embedding_shape is None
                else list(attention.position_embedding_shape)
            ),
            position_embedding_trainable=attention.position_embedding_trainable,
            layer_norm_epsilon=self.layer_norm_epsilon,
            seed=self.seed,
            sequence_positions=attention.sequence_positions,
        )
        return config

