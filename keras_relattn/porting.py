"""Weights both ways between edspdf (PyTorch) checkpoints and our layers.

edspdf stores a linear layer as `weight (out, in)` and `bias (out,)`; we store
`EinsumDense` kernels `(in, heads, head_size)` and biases `(heads, head_size)`
so that heads stay addressable (LoRA, quantization, sharding by path). The
grouped position projections are `weight (coordinates, in, out)` there and
`(coordinates, in, heads, chunk)` here. Shared projections appear under both
of their names in an edspdf state dict, as `torch.nn.Module.state_dict` does.
"""

import numpy as np


class _Entry:
    """One edspdf tensor and the Keras variable that holds it."""

    def __init__(self, name, variable, shape, to_keras, to_edspdf):
        self.name = name
        self.variable = variable
        self.shape = tuple(shape)
        self.to_keras = to_keras
        self.to_edspdf = to_edspdf


def _linear(prefix, dense):
    kernel = dense.kernel  # (in, heads, head_size)
    n_in, heads, head = kernel.shape
    return [
        _Entry(
            f"{prefix}.weight",
            kernel,
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
    kernel = dense.kernel  # (coordinates, in, heads, chunk)
    coords, n_in, heads, chunk = kernel.shape
    return [
        _Entry(
            f"{prefix}.weight",
            kernel,
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


def _dense(prefix, dense):
    """A `keras.layers.Dense` as a `torch.nn.Linear`."""
    kernel = dense.kernel  # (in, out)
    n_in, n_out = kernel.shape
    return [
        _Entry(f"{prefix}.weight", kernel, (n_out, n_in), lambda a: a.T, lambda a: a.T),
        _identity(dense.bias, f"{prefix}.bias"),
    ]


def _identity(variable, name):
    return _Entry(name, variable, variable.shape, lambda a: a, lambda a: a)


def _attention_entries(layer, prefix=""):
    entries = _linear(prefix + "content_key_proj", layer.key_proj)
    entries += _linear(prefix + "content_query_proj", layer._query_projection)
    if layer.do_pooling:
        entries += _linear(prefix + "content_value_proj", layer.value_proj)
    if layer.owns_table:
        entries.append(
            _identity(layer.position_embedding, prefix + "position_embedding")
        )
    if layer.position_embedding_shape is not None:
        entries += _grouped_linear(
            prefix + "position_key_proj", layer.position_key_proj
        )
        entries += _grouped_linear(
            prefix + "position_query_proj", layer._position_query_projection
        )
    if layer.head_bias:
        entries.append(_identity(layer.bias, prefix + "bias"))
    return entries


def _entries(layer, prefix=""):
    if not layer.built:
        layer.build()
    entries_fn = getattr(layer, "_edspdf_entries", None)
    if entries_fn is not None:
        return entries_fn(prefix)
    from keras_relattn.relative_attention import RelativeAttention

    if isinstance(layer, RelativeAttention):
        return _attention_entries(layer, prefix)
    raise TypeError(
        "`layer` must be a keras_relattn layer with an edspdf counterpart, "
        f"got {type(layer).__name__}."
    )


def _to_numpy(value):
    if hasattr(value, "detach"):  # a torch tensor, maybe on a GPU
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def load_edspdf_state_dict(layer, state_dict):
    """Loads an edspdf `state_dict` into a keras_relattn layer.

    `RelativeAttention` takes the state dict of edspdf's `RelativeAttention`,
    `RelativeTransformerLayer` that of its `BoxTransformerLayer`.

    Every tensor must be present with the right shape and every key of the
    state dict must be used: all the problems are listed in one error.

    Args:
        layer: a `RelativeAttention` (built or not) configured like the
            edspdf module the state dict comes from.
        state_dict: mapping of edspdf parameter names to numpy arrays or
            torch tensors, e.g. `module.state_dict()`.

    Returns:
        The layer, for chaining.

    Example:

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
    return layer


def edspdf_state_dict(layer):
    """The layer's weights as an edspdf `state_dict` of numpy arrays.

    Shared projections appear under both of their edspdf names, as
    `torch.nn.Module.state_dict` writes them.

    Args:
        layer: a `RelativeAttention` or `RelativeTransformerLayer` (built
            on demand).

    Returns:
        dict of edspdf parameter names to numpy arrays; with
        `{k: torch.from_numpy(v) for k, v in ...items()}` it loads with
        `load_state_dict(..., strict=True)` into the edspdf module of the
        same configuration.

    Example:

    >>> from keras_relattn import RelativeAttention, edspdf_state_dict
    >>> state = edspdf_state_dict(RelativeAttention(8, 2, n_additional_heads=1))
    >>> {k: v.shape for k, v in state.items() if k.startswith("content_key")}
    {'content_key_proj.weight': (12, 8), 'content_key_proj.bias': (12,)}

    References:
        - edspdf, `edspdf.layers.relative_attention.RelativeAttention`.
    """
    return {
        entry.name: np.ascontiguousarray(
            entry.to_edspdf(np.asarray(entry.variable.numpy()))
        )
        for entry in _entries(layer)
    }
