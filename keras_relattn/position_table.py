"""`PositionTable`: one trainable relative-position table for many layers."""

import keras
from keras import ops

from keras_relattn import _arguments


@keras.saving.register_keras_serializable(package="keras_relattn")
class PositionTable(keras.layers.Layer):
    """A trainable `(n_positions, size)` table, shared by attention layers.

    Keras rebuilds every layer from its config when it loads a model, so a
    variable handed to several constructors comes back as several copies. A
    table that is the *output* of one layer, fed to each attention layer at
    call time, stays one weight through `.keras` files. This is how edspdf's
    `BoxTransformerModule` shares its trainable table across its layers.

    Args:
        n_positions (int): number of rows (relative positions) of the table.
        size (int): feature size of each row.
        initializer (str | keras.initializers.Initializer): initializer of
            the table. Default: standard normal, as edspdf's `torch.randn`
            table.
        regularizer (str | keras.regularizers.Regularizer | None):
            regularizer of the table.
        constraint (str | keras.constraints.Constraint | None): constraint of
            the table.
        **kwargs (dict): other `keras.layers.Layer` arguments.

    Call arguments:
        - `inputs`: any tensor; only anchors the table in a functional graph.
            Its values are ignored.

    Returns:
        Tensor: the table, `(n_positions, size)`, in the layer's compute dtype.

    Examples:
        >>> import keras, numpy as np
        >>> from keras_relattn import PositionTable, RelativeAttention
        >>> tokens = keras.Input((None, 16))
        >>> positions = keras.Input((None, None, 1), dtype="int32")
        >>> table = PositionTable(32, 16, name="table")(tokens)
        >>> x = tokens
        >>> for _ in range(2):
        ...     x = RelativeAttention(16, 2, position_embedding_shape=(None, 16))(
        ...         x, x, x, relative_positions=positions, position_embedding=table,
        ...         return_logits=False)
        >>> model = keras.Model([tokens, positions], x)
        >>> [w.path for w in model.weights if w.shape == (32, 16)]
        ['table/embeddings']

    References:
        - edspdf, `edspdf.layers.box_transformer.BoxTransformerModule`
          (one trainable table shared by its layers).
        - KerasHub, `keras_hub.layers.RelativeEmbedding` (DeBERTa-v3's
          table, computed once and passed to every layer).
    """

    def __init__(
        self,
        n_positions,
        size,
        initializer=None,
        regularizer=None,
        constraint=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.n_positions = _arguments.positive_int("n_positions", n_positions)
        self.size = _arguments.positive_int("size", size)
        self.initializer = keras.initializers.get(
            initializer or keras.initializers.RandomNormal(stddev=1.0)
        )
        self.regularizer = keras.regularizers.get(regularizer)
        self.constraint = keras.constraints.get(constraint)

    def build(self, input_shape=None):
        self.embeddings = self.add_weight(
            name="embeddings",
            shape=(self.n_positions, self.size),
            initializer=self.initializer,
            regularizer=self.regularizer,
            constraint=self.constraint,
        )
        self.built = True

    def call(self, inputs=None):
        return ops.cast(self.embeddings, self.compute_dtype)

    def compute_output_shape(self, input_shape=None):
        return (self.n_positions, self.size)

    def compute_output_spec(self, inputs=None):
        return keras.KerasTensor((self.n_positions, self.size), dtype=self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update(
            n_positions=self.n_positions,
            size=self.size,
            initializer=keras.initializers.serialize(self.initializer),
            regularizer=keras.regularizers.serialize(self.regularizer),
            constraint=keras.constraints.serialize(self.constraint),
        )
        return config
