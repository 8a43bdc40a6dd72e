"""DeBERTa-v3 backbones on `RelativeAttention`: ported from Hugging Face
(`DebertaV2Model`) and KerasHub (`DebertaV3Backbone`), and back to Hugging
Face.

The attention is this package's layer in DeBERTa's settings
(`tied_position_projections`, `position_buckets`, `position_dropout_p`,
`sequence_positions`, no head bias), so a converted model trains long
documents the way the layer does: blocks of queries, the banded path,
recomputed blocks in the backward pass, no `(tokens, tokens)` tensor.
"""

import dataclasses

import keras
import numpy as np
from keras import ops

from keras_relattn import _arguments, _checks
from keras_relattn.relative_attention import RelativeAttention

__all__ = ["DebertaV3Encoder", "backbone", "from_keras_hub", "from_transformers",
           "to_transformers_state_dict"]


@keras.saving.register_keras_serializable(package="keras_relattn")
class DebertaV3Encoder(keras.layers.Layer):
    """DeBERTa-v3's embeddings and encoder: token ids in, the last hidden
    state out.

    Args:
        vocabulary_size (int): rows of the token embedding.
        num_layers (int): encoder layers.
        num_heads (int): attention heads.
        hidden_dim (int): width of the hidden states.
        intermediate_dim (int): width of the feed-forward layers.
        bucket_size (int): DeBERTa's `position_buckets` (the relative table
            has `2 * bucket_size` rows).
        max_position (int): DeBERTa's `max_relative_positions`.
        dropout (float): `hidden_dropout_prob`: embeddings, residual branches
            and the relative table.
        attention_dropout (float): `attention_probs_dropout_prob`.
        layer_norm_epsilon (float): every layer norm's epsilon.
        padding (str): `"transformers"`: as `DebertaV2Model`, padded tokens'
            embeddings are zeroed and a padded query averages every value
            (its whole row is masked); `"keras_hub"`: as `DebertaV3Backbone`,
            padding masks keys only.
        **kwargs (dict): other `keras.layers.Layer` arguments.

    Call arguments:
        token_ids: `(batch, length)` int.
        padding_mask: `(batch, length)` bool or 0/1, True for real tokens.
        training (bool): whether dropout is active.

    Returns:
        Tensor: `(batch, length, hidden_dim)`, the last hidden state.
    """

    def __init__(self, vocabulary_size, num_layers, num_heads, hidden_dim, intermediate_dim,
                 bucket_size=256, max_position=512, dropout=0.1, attention_dropout=0.1,
                 layer_norm_epsilon=1e-7, padding="transformers", **kwargs):
        super().__init__(**kwargs)
        self.vocabulary_size = _arguments.positive_int("vocabulary_size", vocabulary_size)
        self.num_layers = _arguments.positive_int("num_layers", num_layers)
        self.num_heads = _arguments.positive_int("num_heads", num_heads)
        self.hidden_dim = _arguments.positive_int("hidden_dim", hidden_dim)
        self.intermediate_dim = _arguments.positive_int("intermediate_dim", intermediate_dim)
        self.bucket_size, self.max_position = _arguments.bucket_arguments(
            bucket_size, max_position, owner=f"`{type(self).__name__}`")
        self.dropout = _arguments.dropout_rate("dropout", dropout)
        self.attention_dropout = _arguments.dropout_rate("attention_dropout", attention_dropout)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        if padding not in ("transformers", "keras_hub"):
            raise ValueError("`padding` must be 'transformers' or 'keras_hub'. Received: "
                             f"padding={padding!r}")
        self.padding = padding
        common = dict(dtype=self.dtype_policy)
        norm = dict(epsilon=self.layer_norm_epsilon, **common)
        self.token_embedding = keras.layers.Embedding(vocabulary_size, hidden_dim,
                                                      name="token_embedding", **common)
        self.embeddings_norm = keras.layers.LayerNormalization(name="embeddings_norm", **norm)
        self.relative_norm = keras.layers.LayerNormalization(name="relative_norm", **norm)
        self.blocks = []
        for i in range(num_layers):
            attention = RelativeAttention(
                hidden_dim, num_heads, position_embedding_shape=(None, hidden_dim),
                head_bias=False, sequence_positions=True, tied_position_projections=True,
                position_buckets=(bucket_size, max_position), dropout_p=attention_dropout,
                position_dropout_p=dropout, name=f"attention_{i}", **common)
            self.blocks.append(dict(
                attention=attention,
                attention_output=keras.layers.Dense(hidden_dim, name=f"attention_output_{i}",
                                                    **common),
                attention_norm=keras.layers.LayerNormalization(name=f"attention_norm_{i}",
                                                               **norm),
                intermediate=keras.layers.Dense(intermediate_dim, name=f"intermediate_{i}",
                                                **common),
                output=keras.layers.Dense(hidden_dim, name=f"output_{i}", **common),
                output_norm=keras.layers.LayerNormalization(name=f"output_norm_{i}", **norm),
            ))
        self._dropout_layer = keras.layers.Dropout(self.dropout, **common)

    def build(self, token_ids_shape=None, padding_mask_shape=None):
        hidden = (None, None, self.hidden_dim)
        self.token_embedding.build((None, None))
        self.embeddings_norm.build(hidden)
        self.relative_table = self.add_weight(
            name="relative_table", shape=(2 * self.bucket_size, self.hidden_dim),
            initializer=keras.initializers.TruncatedNormal(stddev=0.02))
        self.relative_norm.build((2 * self.bucket_size, self.hidden_dim))
        for block in self.blocks:
            block["attention"].build()
            block["attention_output"].build(hidden)
            block["attention_norm"].build(hidden)
            block["intermediate"].build(hidden)
            block["output"].build((None, None, self.intermediate_dim))
            block["output_norm"].build(hidden)
        self.built = True

    def call(self, token_ids, padding_mask=None, training=None):
        if padding_mask is None:
            padding_mask = ops.ones(ops.shape(token_ids), "bool")
        mask = _checks.as_bool(padding_mask)
        x = self.embeddings_norm(self.token_embedding(token_ids))
        if self.padding == "transformers":  # DebertaV2Embeddings zeroes padded tokens
            x = x * ops.cast(mask, x.dtype)[..., None]
        x = self._dropout_layer(x, training=training)
        table = self.relative_norm(self.relative_table)
        for block in self.blocks:
            attended = block["attention"](x, x, x, mask=mask, position_embedding=table,
                                          training=training, return_logits=False)
            if self.padding == "transformers":
                attended = self._padded_queries_average(block["attention"], x, mask, attended)
            update = self._dropout_layer(block["attention_output"](attended), training=training)
            x = block["attention_norm"](x + update)
            hidden = keras.activations.gelu(block["intermediate"](x), approximate=False)
            update = self._dropout_layer(block["output"](hidden), training=training)
            x = block["output_norm"](x + update)
        return x

    def _padded_queries_average(self, attention, x, mask, attended):
        """`DebertaV2Model` masks a padded query's whole row (its mask is an
        outer product), whose softmax then averages every value: the value
        projection of the mean input (it is affine)."""
        mean = ops.mean(x, axis=1, keepdims=True)  # (batch, 1, hidden)
        uniform = ops.reshape(attention.value_projection(mean), (ops.shape(x)[0], 1, -1))
        return ops.where(mask[..., None], attended, uniform)

    def compute_output_shape(self, token_ids_shape, padding_mask_shape=None):
        return tuple(token_ids_shape) + (self.hidden_dim,)

    def get_config(self):
        config = super().get_config()
        config.update(
            vocabulary_size=self.vocabulary_size, num_layers=self.num_layers,
            num_heads=self.num_heads, hidden_dim=self.hidden_dim,
            intermediate_dim=self.intermediate_dim, bucket_size=self.bucket_size,
            max_position=self.max_position, dropout=self.dropout,
            attention_dropout=self.attention_dropout,
            layer_norm_epsilon=self.layer_norm_epsilon, padding=self.padding,
        )
        return config


def backbone(**encoder_arguments):
    """A `keras.Model` with KerasHub's inputs `{"token_ids", "padding_mask"}`
    and the last hidden state as output, around a `DebertaV3Encoder` (named
    `encoder`) built from `encoder_arguments`."""
    token_ids = keras.Input((None,), dtype="int32", name="token_ids")
    padding_mask = keras.Input((None,), dtype="int32", name="padding_mask")
    encoder = DebertaV3Encoder(name="encoder", **encoder_arguments)
    outputs = encoder(token_ids, padding_mask)
    return keras.Model({"token_ids": token_ids, "padding_mask": padding_mask}, outputs)


# Hugging Face -----------------------------------------------------------------


def _transformers_arguments(config):
    """`DebertaV3Encoder` arguments of a `DebertaV2Config.to_dict()`, or a
    `ValueError` naming the option v3's architecture lacks."""
    get = config.get
    unsupported = {
        "relative_attention": (get("relative_attention", False), True),
        "position_biased_input": (get("position_biased_input", True), False),
        "share_att_key": (get("share_att_key", False), True),
        "type_vocab_size": (get("type_vocab_size", 0), 0),
        "conv_kernel_size": (get("conv_kernel_size", 0), 0),
        "hidden_act": (get("hidden_act", "gelu"), "gelu"),
    }
    for name, (value, wanted) in unsupported.items():
        if value != wanted:
            raise ValueError(
                f"`{name}={value!r}` is not DeBERTa-v3's architecture ({name}={wanted!r}), "
                "which is the one ported here.")
    pos_att_type = get("pos_att_type") or []
    if isinstance(pos_att_type, str):
        pos_att_type = [t.strip() for t in pos_att_type.lower().split("|")]
    if sorted(pos_att_type) != ["c2p", "p2c"]:
        raise ValueError(f"`pos_att_type={pos_att_type!r}`: the port reads ['p2c', 'c2p'].")
    norm = [t.strip() for t in str(get("norm_rel_ebd", "none")).lower().split("|")]
    if "layer_norm" not in norm:
        raise ValueError(f"`norm_rel_ebd={get('norm_rel_ebd')!r}`: the port reads 'layer_norm'.")
    if get("embedding_size") not in (None, get("hidden_size")):
        raise ValueError("`embedding_size` differs from `hidden_size`: an embedding projection "
                         "is not ported.")
    buckets = get("position_buckets", -1)
    max_position = get("max_relative_positions", -1)
    if max_position < 1:
        max_position = get("max_position_embeddings")
    if buckets is None or buckets <= 0:
        raise ValueError("`position_buckets` <= 0 (no log buckets) is not DeBERTa-v3's.")
    return dict(
        vocabulary_size=get("vocab_size"), num_layers=get("num_hidden_layers"),
        num_heads=get("num_attention_heads"), hidden_dim=get("hidden_size"),
        intermediate_dim=get("intermediate_size"), bucket_size=buckets,
        max_position=max_position, dropout=get("hidden_dropout_prob", 0.1),
        attention_dropout=get("attention_probs_dropout_prob", 0.1),
        layer_norm_epsilon=get("layer_norm_eps", 1e-7),
    )


def _numpy(value):
    if hasattr(value, "detach"):
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype="float32")


def _heads(kernel, bias, heads):
    """A torch `Linear` `(out, in)` as `(in, heads, d)` and `(heads, d)`."""
    hidden = kernel.shape[1]
    return kernel.T.reshape(hidden, heads, -1), bias.reshape(heads, -1)


def _layer_names(i):
    prefix = f"encoder.layer.{i}."
    return dict(
        query=prefix + "attention.self.query_proj", key=prefix + "attention.self.key_proj",
        value=prefix + "attention.self.value_proj",
        attention_output=prefix + "attention.output.dense",
        attention_norm=prefix + "attention.output.LayerNorm",
        intermediate=prefix + "intermediate.dense", output=prefix + "output.dense",
        output_norm=prefix + "output.LayerNorm",
    )


def from_transformers(state_dict, config):
    """A Keras model equal to Hugging Face's `DebertaV2Model` in DeBERTa-v3's
    settings, with its weights.

    Args:
        state_dict (dict): `DebertaV2Model.state_dict()` (torch tensors or NumPy
            arrays; a `deberta.` prefix, as in task models, is read too).
        config (dict): `DebertaV2Config.to_dict()`. An option v3 does not use
            (absolute positions, `relative_attention=False`, a part of
            `pos_att_type`, token types, a convolution layer) raises a
            `ValueError` naming it.

    Returns:
        keras.Model: `backbone(...)`: inputs `{"token_ids", "padding_mask"}`, the last
        hidden state out; padding as `DebertaV2Model`'s.

    Examples:
        >>> import torch
        >>> from transformers import DebertaV2Config, DebertaV2Model
        >>> from keras_relattn import deberta
        >>> config = DebertaV2Config(vocab_size=50, hidden_size=16, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=32, relative_attention=True,
        ...     position_buckets=8, max_relative_positions=32, pos_att_type=["p2c", "c2p"],
        ...     position_biased_input=False, share_att_key=True, norm_rel_ebd="layer_norm",
        ...     type_vocab_size=0)
        >>> model = deberta.from_transformers(DebertaV2Model(config).state_dict(),
        ...                                   config.to_dict())
        >>> import numpy as np
        >>> ids, mask = np.array([[3, 4, 5]], "int32"), np.ones((1, 3), "int32")
        >>> tuple(model({"token_ids": ids, "padding_mask": mask}).shape)
        (1, 3, 16)

    References:
        - He et al., "DeBERTaV3: Improving DeBERTa using ELECTRA-Style
          Pre-Training with Gradient-Disentangled Embedding Sharing", 2021.
    """
    arguments = _transformers_arguments(config)
    state = {k[len("deberta."):] if k.startswith("deberta.") else k: _numpy(v)
             for k, v in state_dict.items()}
    model = backbone(**arguments)
    encoder = model.get_layer("encoder")
    heads = arguments["num_heads"]
    encoder.token_embedding.embeddings.assign(state["embeddings.word_embeddings.weight"])
    _assign_norm(encoder.embeddings_norm, state, "embeddings.LayerNorm")
    encoder.relative_table.assign(state["encoder.rel_embeddings.weight"])
    _assign_norm(encoder.relative_norm, state, "encoder.LayerNorm")
    for i, block in enumerate(encoder.blocks):
        names = _layer_names(i)
        attention = block["attention"]
        for role, projection in (("query", attention.query_projection),
                                 ("key", attention.key_projection),
                                 ("value", attention.value_projection)):
            kernel, bias = _heads(state[names[role] + ".weight"], state[names[role] + ".bias"],
                                  heads)
            projection.kernel.assign(kernel)
            projection.bias.assign(bias)
        for role in ("attention_output", "intermediate", "output"):
            block[role].kernel.assign(state[names[role] + ".weight"].T)
            block[role].bias.assign(state[names[role] + ".bias"])
        _assign_norm(block["attention_norm"], state, names["attention_norm"])
        _assign_norm(block["output_norm"], state, names["output_norm"])
    return model


def _assign_norm(norm, state, name):
    norm.gamma.assign(state[name + ".weight"])
    norm.beta.assign(state[name + ".bias"])


def to_transformers_state_dict(model):
    """The weights of a `from_transformers` / `from_keras_hub` model (or its
    `DebertaV3Encoder`) under `DebertaV2Model`'s names, as NumPy arrays: what
    `DebertaV2Model.load_state_dict(..., strict=True)` takes (wrap each in
    `torch.from_numpy`).

    Args:
        model (keras.Model | DebertaV3Encoder): a `deberta.backbone` model, or its encoder.

    Returns:
        dict: NumPy float32 arrays by `DebertaV2Model`'s parameter names.

    Examples:
        >>> from keras_relattn import deberta
        >>> model = deberta.backbone(vocabulary_size=50, num_layers=1, num_heads=2,
        ...                          hidden_dim=16, intermediate_dim=32, bucket_size=8,
        ...                          max_position=32)
        >>> state = deberta.to_transformers_state_dict(model)
        >>> state["encoder.rel_embeddings.weight"].shape
        (16, 16)

    References:
        - Hugging Face transformers, `DebertaV2Model`.
    """
    encoder = model if isinstance(model, DebertaV3Encoder) else model.get_layer("encoder")
    value = _float32
    state = {
        "embeddings.word_embeddings.weight": value(encoder.token_embedding.embeddings),
        "embeddings.LayerNorm.weight": value(encoder.embeddings_norm.gamma),
        "embeddings.LayerNorm.bias": value(encoder.embeddings_norm.beta),
        "encoder.rel_embeddings.weight": value(encoder.relative_table),
        "encoder.LayerNorm.weight": value(encoder.relative_norm.gamma),
        "encoder.LayerNorm.bias": value(encoder.relative_norm.beta),
    }
    for i, block in enumerate(encoder.blocks):
        names = _layer_names(i)
        attention = block["attention"]
        for role, projection in (("query", attention.query_projection),
                                 ("key", attention.key_projection),
                                 ("value", attention.value_projection)):
            kernel = value(projection.kernel)
            state[names[role] + ".weight"] = kernel.reshape(kernel.shape[0], -1).T.copy()
            state[names[role] + ".bias"] = value(projection.bias).reshape(-1)
        for role in ("attention_output", "intermediate", "output"):
            state[names[role] + ".weight"] = value(block[role].kernel).T.copy()
            state[names[role] + ".bias"] = value(block[role].bias)
        for role in ("attention_norm", "output_norm"):
            state[names[role] + ".weight"] = value(block[role].gamma)
            state[names[role] + ".bias"] = value(block[role].beta)
    return state


# KerasHub ---------------------------------------------------------------------


def from_keras_hub(keras_hub_backbone):
    """A Keras model equal to a KerasHub `DebertaV3Backbone`, with its
    weights: the same inputs `{"token_ids", "padding_mask"}` and output, its
    padding (keys only).

    Args:
        keras_hub_backbone (keras_hub.models.DebertaV3Backbone): the backbone to port.

    Returns:
        keras.Model: `backbone(..., padding="keras_hub")`.

    Examples:
        >>> from keras_hub.models import DebertaV3Backbone
        >>> from keras_relattn import deberta
        >>> source = DebertaV3Backbone(vocabulary_size=50, num_layers=1, num_heads=2,
        ...     hidden_dim=16, intermediate_dim=32, max_sequence_length=32, bucket_size=8)
        >>> model = deberta.from_keras_hub(source)
        >>> import numpy as np
        >>> ids, mask = np.array([[3, 4, 5]], "int32"), np.ones((1, 3), "int32")
        >>> tuple(model({"token_ids": ids, "padding_mask": mask}).shape)
        (1, 3, 16)

    References:
        - KerasHub, `keras_hub.models.DebertaV3Backbone`.
    """
    weights = _keras_hub_weights(keras_hub_backbone)
    model = backbone(**weights.arguments, padding="keras_hub")
    encoder = model.get_layer("encoder")
    encoder.token_embedding.embeddings.assign(weights.token_embedding)
    _set_norm(encoder.embeddings_norm, weights.embeddings_norm)
    encoder.relative_table.assign(weights.relative_table)
    _set_norm(encoder.relative_norm, weights.relative_norm)
    for block, layer in zip(encoder.blocks, weights.layers):
        attention = block["attention"]
        for mine, theirs in ((attention.query_projection, layer.query),
                             (attention.key_projection, layer.key),
                             (attention.value_projection, layer.value),
                             (block["attention_output"], layer.attention_output),
                             (block["intermediate"], layer.intermediate),
                             (block["output"], layer.output)):
            mine.kernel.assign(theirs.kernel)
            mine.bias.assign(theirs.bias)
        _set_norm(block["attention_norm"], layer.attention_norm)
        _set_norm(block["output_norm"], layer.output_norm)
    return model


@dataclasses.dataclass(frozen=True)
class _Dense:
    kernel: np.ndarray
    bias: np.ndarray


@dataclasses.dataclass(frozen=True)
class _Norm:
    gamma: np.ndarray
    beta: np.ndarray


@dataclasses.dataclass(frozen=True)
class _KerasHubLayer:
    """One KerasHub transformer layer's weights, in our blocks' shapes."""

    query: _Dense  # (hidden, heads, head_size), (heads, head_size)
    key: _Dense
    value: _Dense
    attention_output: _Dense  # (heads * head_size, hidden), (hidden,)
    attention_norm: _Norm
    intermediate: _Dense  # (hidden, intermediate), (intermediate,)
    output: _Dense  # (intermediate, hidden), (hidden,)
    output_norm: _Norm


@dataclasses.dataclass(frozen=True)
class _KerasHubWeights:
    """What `from_keras_hub` reads of a `DebertaV3Backbone`: NumPy arrays."""

    arguments: dict  # `DebertaV3Encoder`'s, but `padding`
    token_embedding: np.ndarray  # (vocabulary_size, hidden)
    embeddings_norm: _Norm
    relative_table: np.ndarray  # (2 * bucket_size, hidden)
    relative_norm: _Norm
    layers: tuple  # a `_KerasHubLayer` per transformer layer


def _keras_hub_weights(source):
    """The one reader of a KerasHub `DebertaV3Backbone`'s internals (its
    sublayers and their private attributes, which KerasHub may rename): its
    settings and weights as a `_KerasHubWeights`."""
    first = source.transformer_layers[0]
    arguments = {
        "vocabulary_size": source.vocabulary_size, "num_layers": source.num_layers,
        "num_heads": source.num_heads, "hidden_dim": source.hidden_dim,
        "intermediate_dim": source.intermediate_dim, "bucket_size": source.bucket_size,
        "max_position": source.max_sequence_length, "dropout": source.dropout,
        "attention_dropout": source.dropout, "layer_norm_epsilon": first.layer_norm_epsilon,
    }
    layers = []
    for layer in source.transformer_layers:
        attention = layer._self_attention_layer
        output = attention._output_dense  # kernel (heads, head_size, hidden)
        layers.append(_KerasHubLayer(
            query=_dense_of(attention._query_dense),
            key=_dense_of(attention._key_dense),
            value=_dense_of(attention._value_dense),
            attention_output=_Dense(
                _float32(output.kernel).reshape(-1, source.hidden_dim), _float32(output.bias)),
            attention_norm=_norm_of(layer._self_attention_layer_norm),
            intermediate=_dense_of(layer._feedforward_intermediate_dense),
            output=_dense_of(layer._feedforward_output_dense),
            output_norm=_norm_of(layer._feedforward_layer_norm),
        ))
    return _KerasHubWeights(
        arguments=arguments,
        token_embedding=_float32(source.token_embedding.embeddings),
        embeddings_norm=_norm_of(source.embeddings_layer_norm),
        relative_table=_float32(source.relative_embeddings.rel_embeddings),
        relative_norm=_norm_of(source.relative_embeddings.layer_norm), layers=tuple(layers),
    )


def _float32(v):
    return np.asarray(keras.ops.convert_to_numpy(v), "float32")


def _dense_of(layer):
    return _Dense(_float32(layer.kernel), _float32(layer.bias))


def _norm_of(layer):
    # A norm's weights are copied in their own dtype (float32 or not), as they always were.
    return _Norm(keras.ops.convert_to_numpy(layer.gamma), keras.ops.convert_to_numpy(layer.beta))


def _set_norm(mine, theirs):
    mine.gamma.assign(theirs.gamma)
    mine.beta.assign(theirs.beta)
