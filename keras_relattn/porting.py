"""Weights both ways between edspdf (PyTorch) checkpoints and our layers.

edspdf stores a linear layer as `weight (out, in)` and `bias (out,)`; we store
`EinsumDense` kernels `(in, heads, head_size)` and biases `(heads, head_size)`
so that heads stay addressable (LoRA, quantization, sharding by path). The
grouped position projections are `weight (coordinates, in, out)` there and
`(coordinates, in, heads, chunk)` here. Shared projections appear under both
of their names in an edspdf state dict, as `torch.nn.Module.state_dict` does.
"""

import keras
import numpy as np

from keras_relattn.box_transformer import BoxTransformer
from keras_relattn.relative_attention import RelativeAttention
from keras_relattn.transformer import RelativeTransformerLayer


class _Entry:
    """One edspdf tensor and the Keras variable that holds it.

    `value` reads what the layer computes with (a LoRA kernel merged with
    its adapters); loading assigns `variable` (the base kernel).
    """

    def __init__(self, name, variable, shape, to_keras, to_edspdf, value=None):
        self.name = name
        self.variable = variable
        self.shape = tuple(shape)
        self.to_keras = to_keras
        self.to_edspdf = to_edspdf
        self.value = value or (lambda: variable)


def _kernel_entry(dense, name, shape, to_keras, to_edspdf):
    """The kernel of an `EinsumDense` / `Dense`, LoRA or not."""
    if getattr(dense, "quantization_mode", None) is not None:
        raise ValueError(
            f"Cannot port {name!r}: its layer is quantized "
            f"({dense.quantization_mode}). Port the float model, then quantize."
        )
    # With LoRA, `kernel` is the merged kernel (a tensor) and `_kernel` the
    # frozen base variable.
    base = dense._kernel if getattr(dense, "lora_enabled", False) else dense.kernel
    return _Entry(name, base, shape, to_keras, to_edspdf, value=lambda: dense.kernel)


def _linear(prefix, dense):
    n_in, heads, head = dense.kernel.shape  # (in, heads, head_size)
    return [
        _kernel_entry(
            dense,
            f"{prefix}.weight",
            (heads * head, n_in),
            lambda a: a.T.reshape(n_in, heads, head),
            lambda a: a.reshape(n_in, heads * head).T,
        ),
        _Entry(
            f"{prefix}.bias",
            dense.bias,
            (heads * head,),
            lambda a: a.reshape(heads, head),
            lambda a: a.reshape(-1),
        ),
    ]


def _grouped_linear(prefix, dense):
    coords, n_in, heads, chunk = dense.kernel.shape  # (coordinates, in, heads, chunk)
    return [
        _kernel_entry(
            dense,
            f"{prefix}.weight",
            (coords, n_in, heads * chunk),
            lambda a: a.reshape(coords, n_in, heads, chunk),
            lambda a: a.reshape(coords, n_in, heads * chunk),
        ),
        _Entry(
            f"{prefix}.bias",
            dense.bias,
            (coords, heads * chunk),
            lambda a: a.reshape(coords, heads, chunk),
            lambda a: a.reshape(coords, heads * chunk),
        ),
    ]


def _unused_grouped_linear(prefix, layer):
    """A position projection edspdf makes whenever it has a table, but that no
    term of the layer's `mode` reads (say `mode=("c2c",)`): our layer does
    not create it. Loading checks its shapes and drops it (it changes no
    output); exporting writes zeros, so that edspdf's strict loading finds it.
    Never for an alias of a projection the layer has (see `_attention_entries`).
    """
    coords = layer.n_coordinates
    n_in = layer.position_embedding_shape[1] // coords
    n_out = layer.head_size * layer.total_heads // coords
    return [
        _unused(f"{prefix}.weight", (coords, n_in, n_out)),
        _unused(f"{prefix}.bias", (coords, n_out)),
    ]


def _unused(name, shape):
    return _Entry(
        name, None, shape, lambda a: a, lambda a: a,
        value=lambda: np.zeros(shape, "float32"),
    )


def _dense(prefix, dense):
    """A `keras.layers.Dense` as a `torch.nn.Linear`."""
    n_in, n_out = dense.kernel.shape  # (in, out)
    return [
        _kernel_entry(dense, f"{prefix}.weight", (n_out, n_in), lambda a: a.T, lambda a: a.T),
        _identity(dense.bias, f"{prefix}.bias"),
    ]


def _identity(variable, name):
    return _Entry(name, variable, variable.shape, lambda a: a, lambda a: a)


def _attention_entries(layer, prefix=""):
    """edspdf's `RelativeAttention`."""
    entries = _linear(prefix + "content_key_proj", layer.key_projection)
    entries += _linear(prefix + "content_query_proj", layer.query_projection)
    if layer.do_pooling:
        entries += _linear(prefix + "content_value_proj", layer.value_projection)
    if layer.owns_table:
        entries.append(
            _identity(layer.position_embedding, prefix + "position_embedding")
        )
    if layer.position_embedding_shape is not None:
        key, query = layer.position_key_projection, layer.position_query_projection
        if layer.same_key_query_proj or layer.same_positional_key_query_proj:
            # edspdf registers one module under both names, and a strict
            # load copies each name into it: both must carry the one shared
            # tensor (zeros under an alias would overwrite it). The layer
            # holds it as its keys' projection, whichever term reads it.
            query = key
        for name, dense in (("position_key_proj", key), ("position_query_proj", query)):
            if dense is None:
                entries += _unused_grouped_linear(prefix + name, layer)
            else:
                entries += _grouped_linear(prefix + name, dense)
    if layer.use_head_bias:
        entries.append(_identity(layer.head_bias, prefix + "bias"))
    return entries


def _transformer_layer_entries(layer, prefix=""):
    """edspdf's `BoxTransformerLayer`."""
    entries = _attention_entries(layer.attention, prefix + "attention.")
    entries.append(_identity(layer.resweight, prefix + "resweight"))
    entries.append(_identity(layer.resweight2, prefix + "resweight2"))
    for name in ("norm", "norm2"):
        norm = getattr(layer, name)
        entries.append(_identity(norm.gamma, f"{prefix}{name}.weight"))
        entries.append(_identity(norm.beta, f"{prefix}{name}.bias"))
    for name in ("linear1", "linear2"):
        entries += _dense(f"{prefix}{name}", getattr(layer, name))
    return entries


def _box_transformer_entries(layer, prefix=""):
    """edspdf's `BoxTransformerModule`: its state dict names the one shared
    table under each layer, as `torch.nn.Module.state_dict` does."""
    entries = [_identity(layer.empty_embed, prefix + "empty_embed")]
    for i, block in enumerate(layer.transformer_layers):
        name = f"{prefix}layers.{i}."
        entries += _transformer_layer_entries(block, name)
        if layer.position_embedding is not None:
            entries.append(
                _identity(layer.position_embedding, name + "attention.position_embedding")
            )
    return entries


def _handlers():
    return (
        (BoxTransformer, _box_transformer_entries),
        (RelativeTransformerLayer, _transformer_layer_entries),
        (RelativeAttention, _attention_entries),
    )


def _entries(layer, prefix=""):
    for layer_type, entries in _handlers():
        if isinstance(layer, layer_type):
            if not layer.built:
                layer.build()
            attention = getattr(layer, "attention", layer)
            for option in ("tied_position_projections", "position_buckets",
                           "position_dropout_p"):
                if getattr(attention, option, None) not in (None, False):
                    raise ValueError(
                        f"This layer uses `{option}`, a DeBERTa option edspdf's "
                        "RelativeAttention has no counterpart for: port it with "
                        "`keras_relattn.deberta` instead.")
            return entries(layer, prefix)
    raise TypeError(
        "`layer` must be a keras_relattn layer with an edspdf counterpart "
        "(RelativeAttention, RelativeTransformerLayer or BoxTransformer), got "
        f"{type(layer).__name__}."
    )


def _to_numpy(value):
    if hasattr(value, "detach"):  # a torch tensor, maybe on a GPU
        value = value.detach().cpu()
        if not value.dtype.is_floating_point or value.element_size() >= 4:
            return value.numpy()
        # NumPy has no bfloat16: half-precision checkpoints load as float32.
        return value.float().numpy()
    return np.asarray(value)


def load_edspdf_state_dict(layer, state_dict):
    """Loads an edspdf `state_dict` into a keras_relattn layer.

    `RelativeAttention` takes the state dict of edspdf's `RelativeAttention`,
    `RelativeTransformerLayer` that of its `BoxTransformerLayer`, and
    `BoxTransformer` that of its `BoxTransformerModule`.

    Every tensor must be present with the right shape and every key of the
    state dict must be used: all the problems are listed in one error. Into
    a LoRA layer, the base kernels are loaded and the adapters' `B` zeroed.

    Args:
        layer (keras.layers.Layer): one of those layers (built or not), configured like the
            edspdf module the state dict comes from.
        state_dict (dict): edspdf parameter names to numpy arrays or
            torch tensors, e.g. `module.state_dict()`.

    Returns:
        keras.layers.Layer: the layer, for chaining.

    Examples:
        >>> import keras, numpy as np
        >>> from keras_relattn import RelativeAttention, edspdf_state_dict
        >>> from keras_relattn import load_edspdf_state_dict
        >>> a = RelativeAttention(8, 2)
        >>> b = load_edspdf_state_dict(RelativeAttention(8, 2), edspdf_state_dict(a))
        >>> x = np.ones((1, 3, 8), "float32")
        >>> same = keras.ops.all(keras.ops.equal(a(x), b(x)))
        >>> bool(keras.ops.convert_to_numpy(same))
        True

    References:
        - edspdf, `edspdf.layers.relative_attention.RelativeAttention` and
          `edspdf.layers.box_transformer.BoxTransformerLayer`.
    """
    entries = _entries(layer)
    problems = []
    values = {}
    expected_names = {e.name for e in entries}
    for name in sorted(set(state_dict) - expected_names):
        problems.append(f"unexpected key {name!r}")
    for entry in entries:
        if entry.name not in state_dict:
            problems.append(f"missing key {entry.name!r} of shape {entry.shape}")
            continue
        array = _to_numpy(state_dict[entry.name])
        if array.shape != entry.shape:
            problems.append(
                f"{entry.name!r} has shape {array.shape}, expected {entry.shape}"
            )
            continue
        if entry.variable is None:  # a tensor our layer has no use for
            continue
        new = entry.to_keras(array)
        key = id(entry.variable)
        if key in values and not np.array_equal(values[key][1], new):
            problems.append(
                f"{entry.name!r} differs from {values[key][0]!r}, but this "
                "layer shares them (same_key_query_proj / "
                "same_positional_key_query_proj)"
            )
            continue
        values[key] = (entry.name, new, entry.variable)
    if problems:
        raise ValueError(
            f"Cannot load this edspdf state dict into {layer.name!r}:\n  - "
            + "\n  - ".join(problems)
        )
    for _, new, variable in values.values():
        variable.assign(new.astype(variable.dtype))
    _restart_lora(layer)
    return layer


def _restart_lora(layer):
    """Zero every LoRA `B` adapter: the layer then computes the checkpoint
    just loaded into its base kernels, and its adapters train from there."""
    for sublayer in layer._flatten_layers():
        if getattr(sublayer, "lora_enabled", False):
            sublayer.lora_kernel_b.assign(np.zeros(sublayer.lora_kernel_b.shape, "float32"))


def edspdf_state_dict(layer):
    """The layer's weights as an edspdf `state_dict` of numpy arrays.

    Shared projections appear under both of their edspdf names, as
    `torch.nn.Module.state_dict` writes them.

    Args:
        layer (keras.layers.Layer): a `RelativeAttention`, `RelativeTransformerLayer` or
            `BoxTransformer` (built on demand). LoRA kernels are exported
            merged with their adapters.

    Returns:
        dict: edspdf parameter names to numpy arrays; with
        `{k: torch.from_numpy(v) for k, v in ...items()}` it loads with
        `load_state_dict(..., strict=True)` into the edspdf module of the
        same configuration.

    Examples:
        >>> from keras_relattn import RelativeAttention, edspdf_state_dict
        >>> state = edspdf_state_dict(RelativeAttention(8, 2, n_additional_heads=1))
        >>> {k: v.shape for k, v in state.items() if k.startswith("content_key")}
        {'content_key_proj.weight': (12, 8), 'content_key_proj.bias': (12,)}

    References:
        - edspdf, `edspdf.layers.relative_attention.RelativeAttention`.
    """
    return {
        entry.name: np.ascontiguousarray(
            entry.to_edspdf(np.asarray(keras.ops.convert_to_numpy(entry.value())))
        )
        for entry in _entries(layer)
    }
