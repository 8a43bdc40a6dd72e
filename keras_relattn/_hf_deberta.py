"""DeBERTa-v2/v3 in Hugging Face's terms: `config.json` to and from
`DebertaV3Encoder` arguments, and each weight's name and torch layout (the one
map that loading and saving both read). Plain dicts and NumPy arrays; the
models are read by their attributes, so this module imports none of them."""

import os

import numpy as np

# `config.json`'s `architectures[0]` -> the task whose head it holds.
ARCHITECTURES = {
    "DebertaV2Model": None,
    "DebertaV2ForSequenceClassification": "sequence_classification",
    "DebertaV2ForTokenClassification": "token_classification",
    "DebertaV2ForMaskedLM": "masked_lm",
    # Heads not ported: their backbone loads (`task=None`, or a fresh head).
    "DebertaV2ForQuestionAnswering": "question_answering",
    "DebertaV2ForMultipleChoice": "multiple_choice",
}
CLASSES = {task: name for name, task in ARCHITECTURES.items()}

# V3's fixed settings, as `config.json` writes them.
V3_SETTINGS = dict(
    model_type="deberta-v2", relative_attention=True, pos_att_type=["p2c", "c2p"],
    position_biased_input=False, share_att_key=True, norm_rel_ebd="layer_norm",
    type_vocab_size=0, hidden_act="gelu",
)

# The `from_pretrained` options: `DebertaV2Config` fields that override the
# checkpoint's (as in transformers), and `dtype`, the Keras dtype policy.
OPTIONS = ("num_labels", "id2label", "label2id", "legacy", "pooler_hidden_act",
            "pooler_dropout", "cls_dropout", "hidden_dropout_prob",
            "attention_probs_dropout_prob", "dtype")


def transformers_arguments(config):
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


def layer_names(i):
    prefix = f"encoder.layer.{i}."
    return dict(
        query=prefix + "attention.self.query_proj", key=prefix + "attention.self.key_proj",
        value=prefix + "attention.self.value_proj",
        attention_output=prefix + "attention.output.dense",
        attention_norm=prefix + "attention.output.LayerNorm",
        intermediate=prefix + "intermediate.dense", output=prefix + "output.dense",
        output_norm=prefix + "output.LayerNorm",
    )


# How a Keras variable is stored by torch: as is, a `Linear` weight
# (transposed), or a per-head projection (`(in, heads, d)` <-> `(heads * d, in)`).
AS_IS, LINEAR, HEADS = "as_is", "linear", "heads"


def linear(name, layer):
    return [(name + ".weight", layer.kernel, LINEAR), (name + ".bias", layer.bias, AS_IS)]


def norm(name, layer):
    return [(name + ".weight", layer.gamma, AS_IS), (name + ".bias", layer.beta, AS_IS)]


def backbone_variables(encoder):
    """`(DebertaV2Model name, variable, layout)` of every encoder weight: the
    one map both directions read."""
    entries = [("embeddings.word_embeddings.weight", encoder.token_embedding.embeddings, AS_IS)]
    entries += norm("embeddings.LayerNorm", encoder.embeddings_norm)
    entries += [("encoder.rel_embeddings.weight", encoder.relative_table, AS_IS)]
    entries += norm("encoder.LayerNorm", encoder.relative_norm)
    for i, block in enumerate(encoder.blocks):
        names = layer_names(i)
        attention = block["attention"]
        for role, projection in (("query", attention.query_projection),
                                 ("key", attention.key_projection),
                                 ("value", attention.value_projection)):
            entries += [(names[role] + ".weight", projection.kernel, HEADS),
                        (names[role] + ".bias", projection.bias, HEADS)]
        for role in ("attention_output", "intermediate", "output"):
            entries += linear(names[role], block[role])
        entries += norm(names["attention_norm"], block["attention_norm"])
        entries += norm(names["output_norm"], block["output_norm"])
    return entries


def head_variables(model, legacy=True):
    """The head's `(DebertaV2For<Task> name, variable, layout)`."""
    if model.task == "sequence_classification":
        return (linear("pooler.dense", model.pooler)
                + linear("classifier", model.classifier))
    if model.task == "token_classification":
        return linear("classifier", model.classifier)
    if model.task == "masked_lm":
        head = model.lm_head
        prefix = "cls.predictions.transform." if legacy else "lm_predictions.lm_head."
        bias = "cls.predictions.bias" if legacy else "lm_predictions.lm_head.bias"
        return (linear(prefix + "dense", head.dense) + norm(prefix + "LayerNorm", head.norm)
                + [(bias, head.bias, AS_IS)])
    return []


def torch_shape(variable, layout):
    shape = tuple(variable.shape)
    if layout == LINEAR:
        return shape[::-1]
    if layout == HEADS:
        return (int(np.prod(shape[1:])), shape[0]) if len(shape) == 3 else (int(np.prod(shape)),)
    return shape


def to_torch_layout(array, layout):
    if layout == LINEAR:
        return array.T.copy()
    if layout == HEADS:
        return array.reshape(array.shape[0], -1).T.copy() if array.ndim == 3 else array.reshape(-1)
    return array


def assign(entries, state, where):
    """Each entry's tensor from `state` (float32 arrays), shapes checked
    first: a tensor missing or of another shape is a `ValueError` naming it,
    and nothing is assigned."""
    missing = [name for name, _, _ in entries if name not in state]
    if missing:
        shown = ", ".join(missing[:6]) + (", ..." if len(missing) > 6 else "")
        raise ValueError(f"{where} lacks {len(missing)} tensor(s) the model needs: {shown}")
    for name, variable, layout in entries:
        want = torch_shape(variable, layout)
        if tuple(state[name].shape) != want:
            hint = (" (is the tokenizer's vocabulary larger than `vocab_size`?)"
                    if "word_embeddings" in name else
                    " (does `num_labels` differ from the checkpoint's head?)"
                    if "classifier" in name else "")
            raise ValueError(f"{where}: `{name}` has shape {tuple(state[name].shape)}, but "
                             f"config.json's sizes give {want}{hint}")
    for name, variable, layout in entries:
        array = state[name]
        if layout == LINEAR:
            array = array.T
        elif layout == HEADS:
            array = (array.T if array.ndim == 2 else array).reshape(variable.shape)
        variable.assign(array)


def checked_config(config, path):
    """A copy of `config.json`, or a `ValueError` if it is not a DeBERTa-v2/v3
    checkpoint of an architecture read here."""
    model_type = config.get("model_type")
    if model_type != "deberta-v2":
        raise ValueError(f"`path` is not a DeBERTa-v2/v3 checkpoint: its config.json has "
                         f"model_type={model_type!r} (expected 'deberta-v2'). "
                         f"Received: path={os.fspath(path)!r}")
    architectures = config.get("architectures") or ["DebertaV2Model"]
    if architectures[0] not in ARCHITECTURES:
        raise ValueError(f"`path` holds an architecture not read here: "
                         f"architectures={architectures!r} (expected one of "
                         f"{sorted(ARCHITECTURES)}). Received: path={os.fspath(path)!r}")
    transformers_arguments(config)  # v3's settings, or a ValueError naming the option
    return dict(config)


def task_found(config, state):
    """The task of the checkpoint's head: its `architectures`, or (a config
    written without them) its tensors' names."""
    if config.get("architectures"):
        return ARCHITECTURES[config["architectures"][0]]
    if "classifier.weight" in state:
        return ("sequence_classification" if "pooler.dense.weight" in state
                else "token_classification")
    if "cls.predictions.bias" in state or "lm_predictions.lm_head.bias" in state:
        return "masked_lm"
    return None


def _num_labels(config):
    if config.get("id2label"):
        return len(config["id2label"])
    return config.get("num_labels", 2)


def task_arguments(config, task):
    cls_dropout = config.get("cls_dropout")
    return dict(
        encoder=transformers_arguments(config), task=task, num_labels=_num_labels(config),
        pooler_dim=config.get("pooler_hidden_size", config["hidden_size"]),
        pooler_activation=config.get("pooler_hidden_act", "gelu"),
        pooler_dropout=config.get("pooler_dropout", 0.0),
        classifier_dropout=(config.get("hidden_dropout_prob", 0.1) if cls_dropout is None
                            or task == "token_classification" else cls_dropout),
        transformers_config={k: v for k, v in config.items()
                             if k not in ("transformers_version", "torch_dtype", "dtype")},
    )


def check_head_layout(model, state, config, where):
    """A masked-LM checkpoint whose head is in the other layout than its
    `legacy` says: name both, and the option that reads it."""
    if model.task != "masked_lm":
        return
    legacy = config.get("legacy", True)
    theirs = "lm_predictions.lm_head.bias" if legacy else "cls.predictions.bias"
    mine = "cls.predictions.bias" if legacy else "lm_predictions.lm_head.bias"
    if mine not in state and theirs in state:
        raise ValueError(f"{where} holds the masked-LM head as `{theirs.rsplit('.', 1)[0]}.*`, "
                         f"but its config says legacy={legacy!r} (`{mine.rsplit('.', 1)[0]}.*`)."
                         f" Pass legacy={not legacy!r} to read it.")


def exported_config(model, encoder, task):
    """The `config.json` of `model`: its source's fields, then its own sizes
    and v3's settings; a `ValueError` for what transformers cannot hold."""
    source = dict(getattr(model, "transformers_config", None) or {})
    config = {k: v for k, v in source.items() if k not in ("transformers_version",)}
    config.update(V3_SETTINGS)
    config.update(
        architectures=[CLASSES[task]], vocab_size=encoder.vocabulary_size,
        hidden_size=encoder.hidden_dim, num_hidden_layers=encoder.num_layers,
        num_attention_heads=encoder.num_heads, intermediate_size=encoder.intermediate_dim,
        position_buckets=encoder.bucket_size, max_relative_positions=encoder.max_position,
        hidden_dropout_prob=encoder.dropout,
        attention_probs_dropout_prob=encoder.attention_dropout,
        layer_norm_eps=encoder.layer_norm_epsilon, dtype="float32",
    )
    config.setdefault("max_position_embeddings", encoder.max_position)
    config.setdefault("pad_token_id", 0)
    config.setdefault("initializer_range", 0.02)
    config.setdefault("legacy", True)
    config.setdefault("pooler_hidden_size", encoder.hidden_dim)
    config.setdefault("pooler_hidden_act", "gelu")
    config.setdefault("pooler_dropout", 0.0)
    if task in ("sequence_classification", "token_classification"):
        if task == "sequence_classification":
            if model.pooler_dim != encoder.hidden_dim:
                raise ValueError(
                    f"transformers' `ContextPooler` is square (hidden_size={encoder.hidden_dim}),"
                    f" but this model's pooler has pooler_dim={model.pooler_dim}: it cannot be "
                    "saved as a `DebertaV2ForSequenceClassification`.")
            config.update(pooler_hidden_size=model.pooler_dim,
                          pooler_hidden_act=model.pooler_activation,
                          pooler_dropout=model.pooler_dropout, cls_dropout=model.classifier_dropout)
        labels = config.get("id2label") or {}
        if len(labels) != model.num_labels:
            labels = {str(i): f"LABEL_{i}" for i in range(model.num_labels)}
        config["id2label"] = {str(k): v for k, v in labels.items()}
        config["label2id"] = {v: int(k) for k, v in config["id2label"].items()}
    config.pop("num_labels", None)  # transformers derives it from id2label
    return config
