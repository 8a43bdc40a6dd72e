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
import os
import warnings

import keras
import numpy as np
from keras import ops

from keras_relattn import _arguments, _checks, _hf_checkpoint
from keras_relattn import _hf_deberta as hf
from keras_relattn.relative_attention import RelativeAttention

__all__ = ["TASKS", "DebertaV3Encoder", "DebertaV3MaskedLMHead", "DebertaV3TaskModel",
           "TextModel", "backbone", "from_keras_hub", "from_pretrained", "from_transformers",
           "save_pretrained", "to_transformers_state_dict"]


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
        See `call` below (typed): `token_ids`, `padding_mask`, `training`.
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
        """The last hidden state of a batch of token ids.

        Args:
            token_ids (Tensor): int `(batch, length)`, the tokens' ids.
            padding_mask (Tensor | None): `(batch, length)`, bool or 0/1,
                True (1) for real tokens; `None`: every token is real.
            training (bool | None): whether dropout is active (`None`: as
                Keras decides, off outside `fit`).

        Returns:
            Tensor: `(batch, length, hidden_dim)`, the last hidden state.
        """
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


def backbone(vocabulary_size, num_layers, num_heads, hidden_dim, intermediate_dim,
             bucket_size=256, max_position=512, dropout=0.1, attention_dropout=0.1,
             layer_norm_epsilon=1e-7, padding="transformers"):
    """A `keras.Model` with KerasHub's inputs `{"token_ids", "padding_mask"}`
    and the last hidden state as output, around a `DebertaV3Encoder` (named
    `encoder`) built from these arguments.

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
        padding (str): `"transformers"` (as `DebertaV2Model`) or
            `"keras_hub"` (as `DebertaV3Backbone`); see `DebertaV3Encoder`.

    Returns:
        keras.Model: inputs `{"token_ids", "padding_mask"}`, each int
        `(batch, length)`; output `(batch, length, hidden_dim)`.

    Examples:
        >>> import numpy as np
        >>> from keras_relattn import deberta
        >>> model = deberta.backbone(
        ...     vocabulary_size=50, num_layers=1, num_heads=2, hidden_dim=16,
        ...     intermediate_dim=32, bucket_size=8, max_position=32)
        >>> ids, mask = np.array([[3, 4, 5]], "int32"), np.ones((1, 3), "int32")
        >>> tuple(model({"token_ids": ids, "padding_mask": mask}).shape)
        (1, 3, 16)

    References:
        - KerasHub, `keras_hub.models.DebertaV3Backbone` (the inputs' names).
    """
    token_ids = keras.Input((None,), dtype="int32", name="token_ids")
    padding_mask = keras.Input((None,), dtype="int32", name="padding_mask")
    encoder = DebertaV3Encoder(
        vocabulary_size, num_layers, num_heads, hidden_dim, intermediate_dim,
        bucket_size=bucket_size, max_position=max_position, dropout=dropout,
        attention_dropout=attention_dropout, layer_norm_epsilon=layer_norm_epsilon,
        padding=padding, name="encoder")
    outputs = encoder(token_ids, padding_mask)
    return keras.Model({"token_ids": token_ids, "padding_mask": padding_mask}, outputs)


TASKS = (None, "sequence_classification", "token_classification", "masked_lm")

# Hugging Face's activation names (`ACT2FN`) that the heads read.
_ACTIVATIONS = {
    "gelu": lambda x: keras.activations.gelu(x, approximate=False),
    "gelu_new": lambda x: keras.activations.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: keras.activations.gelu(x, approximate=True),
    "relu": keras.activations.relu, "tanh": keras.activations.tanh,
    "sigmoid": keras.activations.sigmoid, "silu": keras.activations.silu,
    "swish": keras.activations.silu, "linear": keras.activations.linear,
}


def _activation_name(name, value):
    if value not in _ACTIVATIONS:
        raise ValueError(f"`{name}` must be one of {sorted(_ACTIVATIONS)}. "
                         f"Received: {name}={value!r}")
    return value


def _task(task):
    if task not in TASKS:
        raise ValueError(f"`task` must be one of {TASKS}. Received: task={task!r}")
    return task


@keras.saving.register_keras_serializable(package="keras_relattn")
class DebertaV3MaskedLMHead(keras.layers.Layer):
    """DeBERTa's masked-LM head: `dense`, the activation, `norm`, then the
    scores against the (tied) token embedding, plus a `bias` per token.

    Args:
        vocabulary_size (int): rows of the token embedding.
        hidden_dim (int): width of the hidden states.
        activation (str): a Hugging Face activation name (`hidden_act`).
        layer_norm_epsilon (float): the norm's epsilon.
        **kwargs (dict): other `keras.layers.Layer` arguments.

    Call arguments:
        See `call` below (typed): `hidden`, `embeddings`.
    """

    def __init__(self, vocabulary_size, hidden_dim, activation="gelu", layer_norm_epsilon=1e-7,
                 **kwargs):
        super().__init__(**kwargs)
        self.vocabulary_size = _arguments.positive_int("vocabulary_size", vocabulary_size)
        self.hidden_dim = _arguments.positive_int("hidden_dim", hidden_dim)
        self.activation = _activation_name("activation", activation)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.dense = keras.layers.Dense(hidden_dim, name="dense", dtype=self.dtype_policy)
        self.norm = keras.layers.LayerNormalization(epsilon=self.layer_norm_epsilon, name="norm",
                                                    dtype=self.dtype_policy)

    def build(self, hidden_shape=None, embeddings_shape=None):
        self.dense.build((None, None, self.hidden_dim))
        self.norm.build((None, None, self.hidden_dim))
        self.bias = self.add_weight(name="bias", shape=(self.vocabulary_size,),
                                    initializer="zeros")
        self.built = True

    def call(self, hidden, embeddings):
        """The scores of every token of the vocabulary at every position.

        Args:
            hidden (Tensor): `(batch, length, hidden_dim)`, the encoder's
                last hidden state.
            embeddings (Tensor): `(vocabulary_size, hidden_dim)`, the token
                embedding the scores are tied to.

        Returns:
            Tensor: `(batch, length, vocabulary_size)` logits.
        """
        x = self.norm(_ACTIVATIONS[self.activation](self.dense(hidden)))
        scores = ops.matmul(x, ops.transpose(ops.cast(embeddings, x.dtype)))
        return scores + ops.cast(self.bias, x.dtype)

    def compute_output_shape(self, hidden_shape, embeddings_shape=None):
        return tuple(hidden_shape[:-1]) + (self.vocabulary_size,)

    def get_config(self):
        config = super().get_config()
        config.update(vocabulary_size=self.vocabulary_size, hidden_dim=self.hidden_dim,
                      activation=self.activation, layer_norm_epsilon=self.layer_norm_epsilon)
        return config


@keras.saving.register_keras_serializable(package="keras_relattn")
class DebertaV3TaskModel(keras.Model):
    """A DeBERTa-v3 encoder with a task head, as Hugging Face's
    `DebertaV2For<Task>` computes it: what `from_pretrained` returns.

    Args:
        encoder (dict): `DebertaV3Encoder` arguments.
        task (str | None): `None` (the last hidden state out),
            `"sequence_classification"` (`ContextPooler` on the first token,
            then `classifier`), `"token_classification"` (`classifier` on
            every token) or `"masked_lm"` (`DebertaV3MaskedLMHead`, tied to
            the token embedding).
        num_labels (int): classes of the classifiers.
        pooler_dim (int | None): the pooler's width (default: `hidden_dim`).
        pooler_activation (str): the pooler's activation (a Hugging Face name).
        pooler_dropout (float): dropout on the first token, before the pooler.
        classifier_dropout (float | None): dropout before the classifier
            (default: the encoder's `dropout`).
        transformers_config (dict | None): the `config.json` the model came
            from, kept (small JSON) so that `save_pretrained` writes its other
            fields (labels, token ids) back.
        **kwargs (dict): other `keras.Model` arguments (`name`, `dtype`).

    Call arguments:
        See `call` below (typed): `inputs`, `training`.
    """

    def __init__(self, encoder, task=None, num_labels=2, pooler_dim=None,
                 pooler_activation="gelu", pooler_dropout=0.0, classifier_dropout=None,
                 transformers_config=None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(encoder, dict):
            raise TypeError("`encoder` must be a dict of `DebertaV3Encoder` arguments. "
                            f"Received: encoder={encoder!r}")
        self.task = _task(task)
        self.encoder_arguments = dict(encoder)
        self.encoder = DebertaV3Encoder(name="encoder", dtype=self.dtype_policy, **encoder)
        hidden_dim = self.encoder.hidden_dim
        self.num_labels = _arguments.positive_int("num_labels", num_labels)
        self.pooler_dim = _arguments.positive_int("pooler_dim", pooler_dim, default=hidden_dim)
        self.pooler_activation = _activation_name("pooler_activation", pooler_activation)
        self.pooler_dropout = _arguments.dropout_rate("pooler_dropout", pooler_dropout)
        self.classifier_dropout = _arguments.dropout_rate(
            "classifier_dropout",
            self.encoder.dropout if classifier_dropout is None else classifier_dropout)
        self.transformers_config = dict(transformers_config or {})
        common = dict(dtype=self.dtype_policy)
        if task == "sequence_classification":
            self.pooler_dropout_layer = keras.layers.Dropout(self.pooler_dropout, **common)
            self.pooler = keras.layers.Dense(self.pooler_dim, name="pooler", **common)
        if task in ("sequence_classification", "token_classification"):
            self.classifier_dropout_layer = keras.layers.Dropout(self.classifier_dropout,
                                                                 **common)
            self.classifier = keras.layers.Dense(self.num_labels, name="classifier", **common)
        if task == "masked_lm":
            self.lm_head = DebertaV3MaskedLMHead(
                self.encoder.vocabulary_size, hidden_dim,
                activation=self.transformers_config.get("hidden_act", "gelu"),
                layer_norm_epsilon=self.encoder.layer_norm_epsilon, name="lm_head", **common)
        self.build()

    def build(self, input_shape=None):
        if self.built:
            return
        self.encoder.build()
        hidden = self.encoder.hidden_dim
        if self.task == "sequence_classification":
            self.pooler.build((None, hidden))
            self.classifier.build((None, self.pooler_dim))
        elif self.task == "token_classification":
            self.classifier.build((None, None, hidden))
        elif self.task == "masked_lm":
            self.lm_head.build()
        self.built = True

    def build_from_config(self, config):
        self.build()

    def call(self, inputs, training=None):
        """The task's logits for a batch of token ids.

        Args:
            inputs (dict): `{"token_ids": (batch, length) int,
                "padding_mask": (batch, length) bool or 0/1}`, KerasHub's
                names; the mask is optional (every token real).
            training (bool | None): whether dropout is active (`None`: as
                Keras decides, off outside `fit`).

        Returns:
            Tensor: the logits, `(batch, num_labels)`, `(batch, length,
            num_labels)` or `(batch, length, vocabulary_size)`; for
            `task=None` the last hidden state.
        """
        if not isinstance(inputs, dict) or "token_ids" not in inputs:
            raise TypeError("`inputs` must be a dict with 'token_ids' (and 'padding_mask'). "
                            f"Received: inputs={inputs!r}")
        hidden = self.encoder(inputs["token_ids"], inputs.get("padding_mask"),
                              training=training)
        if self.task == "sequence_classification":
            first = self.pooler_dropout_layer(hidden[:, 0], training=training)
            pooled = _ACTIVATIONS[self.pooler_activation](self.pooler(first))
            pooled = self.classifier_dropout_layer(pooled, training=training)
            return self.classifier(pooled)
        if self.task == "token_classification":
            return self.classifier(self.classifier_dropout_layer(hidden, training=training))
        if self.task == "masked_lm":
            return self.lm_head(hidden, self.encoder.token_embedding.embeddings)
        return hidden

    def compute_output_spec(self, inputs, training=None):
        ids = inputs["token_ids"]
        batch, length = ids.shape[0], ids.shape[1]
        shape = {None: (batch, length, self.encoder.hidden_dim),
                 "sequence_classification": (batch, self.num_labels),
                 "token_classification": (batch, length, self.num_labels),
                 "masked_lm": (batch, length, self.encoder.vocabulary_size)}[self.task]
        return keras.KerasTensor(shape, dtype=self.compute_dtype)

    def get_config(self):
        return {
            "name": self.name, "trainable": self.trainable,
            "dtype": keras.dtype_policies.serialize(self.dtype_policy),
            "encoder": self.encoder_arguments, "task": self.task, "num_labels": self.num_labels,
            "pooler_dim": self.pooler_dim, "pooler_activation": self.pooler_activation,
            "pooler_dropout": self.pooler_dropout,
            "classifier_dropout": self.classifier_dropout,
            "transformers_config": self.transformers_config,
        }


# Hugging Face -----------------------------------------------------------------

def _encoder_of(model):
    if isinstance(model, DebertaV3Encoder):
        return model
    try:
        encoder = model.get_layer("encoder")
    except (ValueError, AttributeError):
        encoder = None
    if not isinstance(encoder, DebertaV3Encoder):
        raise TypeError("`model` must be a `deberta.from_pretrained`, `from_transformers`, "
                        "`from_keras_hub` or `backbone` model, or a `DebertaV3Encoder`. "
                        f"Received: model={model!r}")
    return encoder


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
        >>> config = DebertaV2Config(
        ...     vocab_size=50, hidden_size=16, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=32, relative_attention=True,
        ...     position_buckets=8, max_relative_positions=32,
        ...     pos_att_type=["p2c", "c2p"], position_biased_input=False,
        ...     share_att_key=True, norm_rel_ebd="layer_norm", type_vocab_size=0)
        >>> state = DebertaV2Model(config).state_dict()
        >>> model = deberta.from_transformers(state, config.to_dict())
        >>> import numpy as np
        >>> ids, mask = np.array([[3, 4, 5]], "int32"), np.ones((1, 3), "int32")
        >>> tuple(model({"token_ids": ids, "padding_mask": mask}).shape)
        (1, 3, 16)

    References:
        - He et al., "DeBERTaV3: Improving DeBERTa using ELECTRA-Style
          Pre-Training with Gradient-Disentangled Embedding Sharing", 2021.
    """
    arguments = hf.transformers_arguments(config)
    model = backbone(**arguments)
    hf.assign(hf.backbone_variables(model.get_layer("encoder")), _backbone_state(state_dict),
            "`state_dict`")
    return model


def _numpy(value):
    if hasattr(value, "detach"):
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype="float32")


def _backbone_state(state_dict):
    return {k[len("deberta."):] if k.startswith("deberta.") else k: _numpy(v)
            for k, v in state_dict.items()}


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
    return {name: hf.to_torch_layout(_float32(variable), layout)
            for name, variable, layout in hf.backbone_variables(_encoder_of(model))}


# Hugging Face folders ---------------------------------------------------------


def from_pretrained(path, task=None, **options):
    """A Keras model equal to transformers' `DebertaV2Model` or
    `DebertaV2For<Task>`, read from a folder written by `save_pretrained`.

    Reads `config.json` and `model.safetensors` (or sharded safetensors and
    their index) with the safetensors NumPy API: neither torch nor
    transformers is needed. float16 and bfloat16 checkpoints load too (as
    float32 weights). A folder with only `pytorch_model.bin` is read with
    torch, which it then needs.

    Args:
        path (str | os.PathLike): the checkpoint folder.
        task (str | None): `None` (the backbone: the last hidden state out),
            `"sequence_classification"`, `"token_classification"` or
            `"masked_lm"`. The head is read from the checkpoint when its
            `architectures` is that task's (`DebertaV2For<Task>`); from any
            other DeBERTa-v2/v3 checkpoint it starts fresh, as transformers'
            `AutoModelFor<Task>.from_pretrained` does (with a warning).
        **options (dict): `config.json` fields to override, as transformers'
            `from_pretrained` takes them (`num_labels`, `id2label`, `legacy`,
            `pooler_hidden_act`, `pooler_dropout`, `cls_dropout`,
            `hidden_dropout_prob`, `attention_probs_dropout_prob`), and
            `dtype`, the Keras dtype policy (e.g. `"mixed_bfloat16"`).

    Returns:
        DebertaV3TaskModel: a Keras model that takes `{"token_ids",
        "padding_mask"}` and returns the logits (the last hidden state for
        `task=None`); no length cap.

    Examples:
        >>> import tempfile
        >>> from transformers import DebertaV2Config, DebertaV2ForSequenceClassification
        >>> from keras_relattn import deberta
        >>> config = DebertaV2Config(vocab_size=50, hidden_size=16, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=32, relative_attention=True,
        ...     position_buckets=8, max_relative_positions=32, pos_att_type=["p2c", "c2p"],
        ...     position_biased_input=False, share_att_key=True, norm_rel_ebd="layer_norm",
        ...     type_vocab_size=0, num_labels=3)
        >>> folder = tempfile.mkdtemp()
        >>> DebertaV2ForSequenceClassification(config).save_pretrained(folder)
        >>> model = deberta.from_pretrained(folder, "sequence_classification")
        >>> import numpy as np
        >>> ids, mask = np.array([[3, 4, 5]], "int32"), np.ones((1, 3), "int32")
        >>> tuple(model({"token_ids": ids, "padding_mask": mask}).shape)
        (1, 3)

    References:
        - Hugging Face transformers, `PreTrainedModel.from_pretrained` and
          `modeling_deberta_v2.py`.
    """
    task = _task(task)
    unknown = sorted(set(options) - set(hf.OPTIONS))
    if unknown:
        raise TypeError(f"`from_pretrained` got unknown option(s) {unknown}; it takes "
                        f"{list(hf.OPTIONS)}.")
    dtype = options.pop("dtype", None)
    checkpoint = _hf_checkpoint.read_folder(path, lambda c: hf.checked_config(c, path))
    config = dict(checkpoint.config)
    config.update(options)
    if "num_labels" in options:
        if "id2label" not in options:
            config["id2label"] = {str(i): f"LABEL_{i}" for i in range(options["num_labels"])}
            config["label2id"] = {v: int(k) for k, v in config["id2label"].items()}
    found = hf.task_found(config, checkpoint.tensors)
    model = DebertaV3TaskModel(**hf.task_arguments(config, task), dtype=dtype)
    state = checkpoint.tensors
    where = f"The checkpoint in {os.fspath(path)!r} ({checkpoint.weights_file})"
    hf.assign(hf.backbone_variables(model.encoder), _backbone_state(state), where)
    if task is not None:
        head = hf.head_variables(model, legacy=config.get("legacy", True))
        if found == task:
            hf.check_head_layout(model, state, config, where)
            hf.assign(head, state, where)
        else:
            warnings.warn(
                f"{where} is a {hf.CLASSES.get(found, found)}: the "
                f"{task} head ({', '.join(name for name, _, _ in head)}) starts from fresh "
                "weights. Fine-tune it before use.", stacklevel=2)
    return model


def save_pretrained(model, path, overwrite=False):
    """Writes `config.json` and `model.safetensors` that transformers'
    `AutoModel` / `AutoModelFor<Task>.from_pretrained(path)` loads with no
    missing or unexpected keys and the same logits.

    Args:
        model (keras.Model | DebertaV3Encoder): a `from_pretrained` model
            (any task), or a `from_transformers` / `from_keras_hub` /
            `backbone` model, or a `DebertaV3Encoder` (both written as
            `DebertaV2Model`).
        path (str | os.PathLike): the folder (created if needed).
        overwrite (bool): replace a different model already in `path`.
            Without it, a folder whose `config.json` describes another model
            (sizes, architecture, labels), or that holds weights in another
            layout, is refused and left as it was. Other files (a tokenizer)
            stay.

    Returns:
        str: `path`.

    Examples:
        >>> import tempfile
        >>> from keras_relattn import deberta
        >>> model = deberta.backbone(vocabulary_size=50, num_layers=1, num_heads=2,
        ...                          hidden_dim=16, intermediate_dim=32, bucket_size=8,
        ...                          max_position=32)
        >>> folder = deberta.save_pretrained(model, tempfile.mkdtemp())
        >>> again = deberta.from_pretrained(folder)
        >>> again.encoder.hidden_dim
        16

    References:
        - Hugging Face transformers, `PreTrainedModel.save_pretrained`.
    """
    if not isinstance(overwrite, bool):
        raise TypeError(f"`overwrite` must be a bool. Received: overwrite={overwrite!r}")
    encoder = _encoder_of(model)
    task = getattr(model, "task", None) if isinstance(model, DebertaV3TaskModel) else None
    config = hf.exported_config(model, encoder, task)
    prefix = "" if task is None else "deberta."
    tensors = {prefix + name: hf.to_torch_layout(_float32(variable), layout)
               for name, variable, layout in hf.backbone_variables(encoder)}
    if task is not None:
        tensors.update({name: hf.to_torch_layout(_float32(variable), layout) for
                        name, variable, layout in hf.head_variables(model, config["legacy"])})
    _hf_checkpoint.write_folder(path, config, tensors, overwrite=overwrite)
    return path


# Raw strings in ------------------------------------------------------------------


class TextModel:
    """Raw strings in: a tokenizer in front of a DeBERTa model, for
    `predict` and `fit` on text.

    The tokenizer runs in NumPy before the model (string tensors exist on
    TensorFlow only), so this works on every backend.

    Args:
        model (keras.Model): a `from_pretrained` / `from_keras_hub` /
            `backbone` model (its inputs `{"token_ids", "padding_mask"}`).
        tokenizer (Callable): a KerasHub preprocessor (`DebertaV3TextClassifierPreprocessor`,
            or any callable that returns `{"token_ids", "padding_mask"}`), or a
            transformers tokenizer (it returns `input_ids` and
            `attention_mask`). Its vocabulary must fit the token embedding.
        sequence_length (int): the length a transformers tokenizer pads and
            truncates to (a KerasHub preprocessor keeps its own).

    Returns:
        TextModel: `preprocess(texts)` gives the model's inputs as NumPy
        arrays; `predict(texts)`, `fit(texts, labels, ...)` and
        `evaluate(texts, labels, ...)` call the model's.

    Examples:
        >>> from tokenizers import Tokenizer, models, pre_tokenizers
        >>> from transformers import PreTrainedTokenizerFast
        >>> from keras_relattn import deberta
        >>> words = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "good": 2, "bad": 3},
        ...                                    unk_token="[UNK]"))
        >>> words.pre_tokenizer = pre_tokenizers.Whitespace()
        >>> tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="[PAD]",
        ...                                     unk_token="[UNK]")
        >>> model = deberta.backbone(vocabulary_size=8, num_layers=1, num_heads=2,
        ...                          hidden_dim=16, intermediate_dim=32, bucket_size=8,
        ...                          max_position=32)
        >>> text = deberta.TextModel(model, tokenizer, sequence_length=6)
        >>> text.preprocess(["good bad good"])["token_ids"].tolist()
        [[2, 3, 2, 0, 0, 0]]

    References:
        - KerasHub, `keras_hub.models.DebertaV3TextClassifierPreprocessor`;
          Hugging Face transformers, `PreTrainedTokenizerFast`.
    """

    def __init__(self, model, tokenizer, sequence_length=512):
        encoder = _encoder_of(model)
        if not callable(tokenizer):
            raise TypeError("`tokenizer` must be a KerasHub preprocessor or a transformers "
                            f"tokenizer (a callable). Received: tokenizer={tokenizer!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.sequence_length = _arguments.positive_int("sequence_length", sequence_length)
        size = _vocabulary_size(tokenizer)
        if size is not None and size > encoder.vocabulary_size:
            raise ValueError(
                f"`tokenizer` has a vocabulary of {size} tokens, larger than the model's token "
                f"embedding ({encoder.vocabulary_size} rows): its ids past "
                f"{encoder.vocabulary_size - 1} have no embedding. Received: "
                f"tokenizer={type(tokenizer).__name__} with {size} tokens")

    def preprocess(self, texts):
        """`{"token_ids", "padding_mask"}` (int32 NumPy arrays) of `texts`."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if hasattr(self.tokenizer, "convert_tokens_to_ids"):  # transformers
            out = self.tokenizer(texts, padding="max_length", truncation=True,
                                 max_length=self.sequence_length, return_tensors="np")
            ids, mask = out["input_ids"], out["attention_mask"]
        else:
            out = self.tokenizer(texts)
            out = out[0] if isinstance(out, tuple) else out
            ids, mask = out["token_ids"], out["padding_mask"]
        return {"token_ids": np.asarray(ids, "int32"), "padding_mask": np.asarray(mask, "int32")}

    def predict(self, texts, **kwargs):
        return self.model.predict(self.preprocess(texts), **kwargs)

    def fit(self, texts, labels, **kwargs):
        return self.model.fit(self.preprocess(texts), np.asarray(labels), **kwargs)

    def evaluate(self, texts, labels, **kwargs):
        return self.model.evaluate(self.preprocess(texts), np.asarray(labels), **kwargs)


def _vocabulary_size(tokenizer):
    inner = getattr(tokenizer, "tokenizer", None)  # a KerasHub preprocessor's
    if inner is not None and hasattr(inner, "vocabulary_size"):
        return int(inner.vocabulary_size())
    if hasattr(tokenizer, "vocabulary_size"):
        return int(tokenizer.vocabulary_size())
    if hasattr(tokenizer, "convert_tokens_to_ids"):
        return len(tokenizer)
    return None


# KerasHub ---------------------------------------------------------------------


def from_keras_hub(keras_hub_model):
    """A Keras model equal to a KerasHub `DebertaV3Backbone`, or to a
    `DebertaV3TextClassifier` (`DebertaV3Classifier`) with its head, with its
    weights: the same inputs `{"token_ids", "padding_mask"}` and output, its
    padding (keys only).

    Args:
        keras_hub_model (DebertaV3Backbone | DebertaV3TextClassifier): the
            `keras_hub.models` model to port. A classifier's preprocessor is
            not part of the result: keep it in front (see the DeBERTa guide).

    Returns:
        keras.Model: for a backbone, `backbone(..., padding="keras_hub")`; for
        a classifier, a `DebertaV3TaskModel` with
        `task="sequence_classification"` (its pooled dense is the pooler).

    Examples:
        >>> from keras_hub.models import DebertaV3Backbone
        >>> from keras_relattn import deberta
        >>> source = DebertaV3Backbone(
        ...     vocabulary_size=50, num_layers=1, num_heads=2, hidden_dim=16,
        ...     intermediate_dim=32, max_sequence_length=32, bucket_size=8)
        >>> model = deberta.from_keras_hub(source)
        >>> import numpy as np
        >>> ids, mask = np.array([[3, 4, 5]], "int32"), np.ones((1, 3), "int32")
        >>> tuple(model({"token_ids": ids, "padding_mask": mask}).shape)
        (1, 3, 16)

    References:
        - KerasHub, `keras_hub.models.DebertaV3Backbone` and
          `DebertaV3TextClassifier`.
    """
    if _is_keras_hub_classifier(keras_hub_model):
        head = _keras_hub_classifier_head(keras_hub_model)
        weights = _keras_hub_weights(keras_hub_model.backbone)
        model = DebertaV3TaskModel(
            dict(weights.arguments, padding="keras_hub"), task="sequence_classification",
            num_labels=head.num_labels, pooler_dim=head.pooler.kernel.shape[1],
            pooler_activation="gelu", pooler_dropout=head.pooler_dropout,
            classifier_dropout=head.classifier_dropout)
        _set_keras_hub_weights(model.encoder, weights)
        for mine, theirs in ((model.pooler, head.pooler), (model.classifier, head.classifier)):
            mine.kernel.assign(theirs.kernel)
            mine.bias.assign(theirs.bias)
        return model
    if type(keras_hub_model).__name__ != "DebertaV3Backbone":
        raise TypeError("`keras_hub_model` must be a KerasHub `DebertaV3Backbone` or "
                        "`DebertaV3TextClassifier`. Received: "
                        f"keras_hub_model={type(keras_hub_model).__name__}")
    weights = _keras_hub_weights(keras_hub_model)
    model = backbone(**weights.arguments, padding="keras_hub")
    _set_keras_hub_weights(model.get_layer("encoder"), weights)
    return model


def _set_keras_hub_weights(encoder, weights):
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


def _is_keras_hub_classifier(model):
    return type(model).__name__ in ("DebertaV3TextClassifier", "DebertaV3Classifier")


@dataclasses.dataclass(frozen=True)
class _KerasHubClassifierHead:
    """What `from_keras_hub` reads of a `DebertaV3TextClassifier`'s head."""

    pooler: "_Dense"  # pooled_dense: (hidden, pooler_dim), (pooler_dim,); gelu
    classifier: "_Dense"  # logits: (pooler_dim, num_labels), (num_labels,)
    num_labels: int
    pooler_dropout: float
    classifier_dropout: float


def _keras_hub_classifier_head(source):
    """The one reader of a KerasHub classifier's head layers (by their names)."""
    logits = source.get_layer("logits")
    if logits.activation is not keras.activations.linear:
        raise ValueError("`keras_hub_model` has an output activation "
                         f"({logits.activation.__name__}); the port keeps logits, as "
                         "transformers' classifiers do. Build it with activation=None.")
    return _KerasHubClassifierHead(
        pooler=_dense_of(source.get_layer("pooled_dense")),
        classifier=_dense_of(source.get_layer("logits")),
        num_labels=int(source.num_classes),
        pooler_dropout=float(source.get_layer("pooled_dropout").rate),
        classifier_dropout=float(source.get_layer("classifier_dropout").rate),
    )


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
