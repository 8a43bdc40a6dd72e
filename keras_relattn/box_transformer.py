"""`BoxTransformer`: edspdf's `BoxTransformerModule` as one Keras layer."""

import keras
from keras import ops

from keras_relattn import _arguments, _checks, _offsets
from keras_relattn._calling import KeywordCallArguments
from keras_relattn.transformer import RelativeTransformerLayer, serialize_activation

BOX_KEYS = ("xmin", "ymin", "xmax", "ymax", "width", "height")


@keras.saving.register_keras_serializable(package="keras_relattn")
class BoxTransformer(KeywordCallArguments, keras.layers.Layer):
    """A stack of `RelativeTransformerLayer`s over the text boxes of pages.

    The equivalent of edspdf's `BoxTransformerModule`: a learnt empty
    ("CLS") embedding is prepended to every page, the relative positions of
    the boxes are computed inside (the formula of
    `positions.box_relative_positions`, i.e. edspdf's
    `compute_pdf_relative_positions`), the CLS row and column get no
    position terms, every layer reads one shared trainable position table,
    and the CLS row is removed from the output. The box offsets are formed
    one block of lines at a time inside each layer, never as edspdf's
    `(pages, lines + 1, lines + 1, 2)` tensor: with the pooled path's blocks
    (`return_logits=False`, the default here), a page of many lines trains
    in bounded memory. Weights port both ways with
    edspdf's names through `keras_relattn.load_edspdf_state_dict` /
    `edspdf_state_dict`.

    Args:
        input_size (int): feature size of the line embeddings.
        num_heads (int): attention heads of each layer.
        dropout_p (float): dropout of the attention and residual branches.
        head_size (int | None): size of each attention head (default
            `input_size // num_heads`).
        activation (str | callable): `"gelu"` (exact, edspdf's default) or any activation
            `RelativeTransformerLayer` takes.
        init_resweight (float): initial value of the residual gates.
        n_relative_positions (int | None): rows of the shared table (and the
            scale of the x offsets). None: no position terms (content only).
        attention_mode (tuple[str, ...]): terms of the attention, see `RelativeAttention`.
        n_layers (int): number of layers.
        seed (int | None): seed of the dropouts.
        **kwargs (dict): other `keras.layers.Layer` arguments.

    Call arguments:
        - `embeds`: `(pages, lines, input_size)` line embeddings.
        - `boxes`: dict of `(pages, lines)` float tensors with edspdf's keys
            `xmin, ymin, xmax, ymax, width, height` (page-relative
            coordinates). A dict of `keras.Input`s works in functional
            models.
        - `mask`: `(pages, lines)` bool, True = a real line. Default: the
            embeddings' Keras mask, else all lines real.
        - `training` (bool): whether dropout is active.
        - `return_logits` (bool): default False (edspdf returns the embeddings
            alone). True also returns every layer's logits.

    Returns:
        Tensor | tuple: `(pages, lines, input_size)` contextualized embeddings; with
        `return_logits=True`, `(embeddings, [logits of each layer])`, each
        `(pages, lines + 1, lines + 1, num_heads)` (the CLS row and column
        first).

    Examples:
        >>> import numpy as np
        >>> from keras_relattn import BoxTransformer
        >>> layer = BoxTransformer(16, num_heads=2, n_relative_positions=32)
        >>> rng = np.random.default_rng(0)
        >>> x0 = rng.random((2, 5)).astype("float32") * 0.8
        >>> y0 = rng.random((2, 5)).astype("float32") * 0.9
        >>> boxes = dict(xmin=x0, ymin=y0, xmax=x0 + 0.1, ymax=y0 + 0.02,
        ...              width=np.full((2, 5), 0.1, "float32"),
        ...              height=np.full((2, 5), 0.02, "float32"))
        >>> out = layer(rng.normal(size=(2, 5, 16)).astype("float32"), boxes)
        >>> tuple(out.shape)
        (2, 5, 16)

    References:
        - edspdf, `edspdf.layers.box_transformer.BoxTransformerModule`.
    """

    def __init__(
        self,
        input_size,
        num_heads=2,
        dropout_p=0.0,
        head_size=None,
        activation="gelu",
        init_resweight=0.0,
        n_relative_positions=None,
        attention_mode=("c2c", "c2p", "p2c"),
        n_layers=2,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.input_size = _arguments.positive_int("input_size", input_size)
        self.n_layers = _arguments.positive_int("n_layers", n_layers)
        if n_relative_positions is not None:
            n_relative_positions = _arguments.positive_int(
                "n_relative_positions", n_relative_positions
            )
        self.n_relative_positions = n_relative_positions
        self.num_heads = _arguments.positive_int("num_heads", num_heads)
        self.dropout_p = _arguments.dropout_rate("dropout_p", dropout_p)
        self.head_size = head_size
        self.activation = activation
        self.init_resweight = float(init_resweight)
        self.attention_mode = tuple(attention_mode)
        self.seed = seed
        table_shape = None if n_relative_positions is None else (None, self.input_size)
        self.transformer_layers = [
            RelativeTransformerLayer(
                self.input_size,
                num_heads=num_heads,
                dropout_p=dropout_p,
                head_size=head_size,
                activation=activation,
                init_resweight=init_resweight,
                attention_mode=attention_mode,
                n_coordinates=2,
                position_embedding_shape=table_shape,
                seed=None if seed is None else seed + 2 * i,
                dtype=self.dtype_policy,
                name=f"layers_{i}",
            )
            for i in range(self.n_layers)
        ]
        self.supports_masking = True

    def build(self, embeds_shape=None, boxes_shape=None):
        # edspdf initializes both with torch.randn.
        normal = keras.initializers.RandomNormal(stddev=1.0, seed=self.seed)
        self.empty_embed = self.add_weight(
            name="empty_embed", shape=(self.input_size,), initializer=normal
        )
        self.position_embedding = None
        if self.n_relative_positions is not None:
            self.position_embedding = self.add_weight(
                name="position_embedding",
                shape=(self.n_relative_positions, self.input_size),
                initializer=normal,
            )
        for layer in self.transformer_layers:
            layer.build()
        self.built = True

    def call(self, embeds, boxes, mask=None, training=None, return_logits=False,
             embeds_mask=None):
        """The stack over the lines of each page.

        Args:
            embeds (Tensor): `(pages, lines, input_size)`.
            boxes (dict): `(pages, lines)` float tensors by edspdf's keys
                (`xmin, ymin, xmax, ymax, width, height`).
            mask (Tensor | None): `(pages, lines)` bool, True = a real line.
            training (bool | None): whether dropout is active.
            return_logits (bool): also return every layer's logits.
            embeds_mask (Tensor | None): the embeddings' Keras mask, filled
                in by Keras.

        Returns:
            Tensor | tuple: `(pages, lines, input_size)`; with
            `return_logits`, also the list of each layer's logits.
        """
        if mask is None:
            mask = embeds_mask
        _checks.check_shape(
            "embeds", _checks.shape_of(embeds), (None, None, self.input_size),
            "(pages, lines, input_size)",
        )
        batch, length = ops.shape(embeds)[0], ops.shape(embeds)[1]
        if mask is None:
            mask = ops.ones((batch, length), "bool")
        mask = _checks.as_bool(mask)
        dtype = self.compute_dtype
        cls = ops.zeros((batch, 1, self.input_size), dtype) + ops.cast(self.empty_embed, dtype)
        x = ops.concatenate([cls, ops.cast(embeds, dtype)], axis=1)
        keep = ops.concatenate([ops.ones((batch, 1), "bool"), mask], axis=1)

        positions = table = None
        if self.n_relative_positions is not None:
            self._check_boxes(boxes, *_checks.shape_of(embeds)[:2])
            # edspdf's box offsets, formed one block of queries at a time:
            # no (pages, lines + 1, lines + 1, 2) offsets tensor, and the CLS
            # row and column get no position terms.
            positions = _offsets.box_offsets(boxes, self.n_relative_positions, dtype)
            table = ops.cast(self.position_embedding, dtype)

        logits = []
        for layer in self.transformer_layers:
            out = layer(
                x, mask=keep, relative_positions=positions, position_embedding=table,
                training=training, return_logits=return_logits,
            )
            if return_logits:
                x, layer_logits = out
                logits.append(layer_logits)
            else:
                x = out
        x = x[:, 1:]
        return (x, logits) if return_logits else x

    @staticmethod
    def _check_boxes(boxes, batch, length):
        if not isinstance(boxes, dict):
            raise TypeError(
                f"`boxes` must be a dict of (pages, lines) float tensors with "
                f"edspdf's keys {BOX_KEYS}; got {type(boxes).__name__}."
            )
        missing = [key for key in BOX_KEYS if key not in boxes]
        if missing:
            raise ValueError(
                f"`boxes` lacks {missing}: it needs edspdf's keys {BOX_KEYS}, "
                "each a (pages, lines) float tensor."
            )
        for key in BOX_KEYS:
            _checks.check_shape(
                f"boxes[{key!r}]", _checks.shape_of(boxes[key]), (batch, length),
                "(pages, lines), as `embeds`",
            )

    def compute_output_spec(self, embeds, boxes=None, mask=None, training=None,
                            return_logits=False, embeds_mask=None):
        batch, length = embeds.shape[0], embeds.shape[1]
        if self.n_relative_positions is not None and boxes is not None:
            self._check_boxes(boxes, batch, length)  # symbolic models fail when built
        out = keras.KerasTensor((batch, length, self.input_size), dtype=self.compute_dtype)
        if not return_logits:
            return out
        rows = None if length is None else length + 1
        heads = self.transformer_layers[0].attention.total_heads
        return out, [
            keras.KerasTensor((batch, rows, rows, heads), dtype=self.compute_dtype)
            for _ in self.transformer_layers
        ]

    def compute_mask(self, embeds, previous_mask=None):
        return _checks.keras_mask_of(embeds)

    def get_config(self):
        config = super().get_config()
        config.update(
            input_size=self.input_size,
            num_heads=self.num_heads,
            dropout_p=self.dropout_p,
            head_size=self.head_size,
            activation=serialize_activation(self.activation),
            init_resweight=self.init_resweight,
            n_relative_positions=self.n_relative_positions,
            attention_mode=list(self.attention_mode),
            n_layers=self.n_layers,
            seed=self.seed,
        )
        return config
