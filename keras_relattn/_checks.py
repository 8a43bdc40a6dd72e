"""Argument and shape checks that raise clear errors before any backend op."""

import keras
import numpy as np
from keras import ops

try:  # Keras keeps the mask accessor private; fall back to the attribute.
    from keras.src.backend.common.masking import get_keras_mask as _get_mask
except ImportError:  # pragma: no cover - depends on the Keras version
    def _get_mask(x):
        return getattr(x, "_keras_mask", None)


def positive_int(name, value, default=None):
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        if hasattr(value, "__index__") and not isinstance(value, bool):
            value = int(value)
        else:
            raise TypeError(
                f"`{name}` must be a positive int. Received: {name}={value!r}"
            )
    if value < 1:
        raise ValueError(f"`{name}` must be >= 1. Received: {name}={value}")
    return value


def non_negative_int(name, value):
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(
            f"`{name}` must be an int >= 0. Received: {name}={value!r}"
        )
    value = int(value)
    if value < 0:
        raise ValueError(f"`{name}` must be >= 0. Received: {name}={value}")
    return value


def shape_of(x):
    """Static shape as a tuple of ints, None for every dimension not known as
    an int (unknown, or symbolic as under `jax.export` or `torch.export`)."""
    shape = getattr(x, "shape", None)
    if shape is None:
        shape = ops.shape(ops.convert_to_tensor(x))
    return tuple(_static_dim(d) for d in shape)


def _static_dim(d):
    # torch's SymInt and jax's symbolic dimensions are not `int`s.
    return int(d) if isinstance(d, (int, np.integer)) else None


def dtype_of(x):
    return keras.backend.standardize_dtype(getattr(x, "dtype", type(x)))


def check_shape(name, got, expected, description, broadcast=()):
    """`expected` holds ints or None (unknown); raise on the first conflict.

    A size of 1 is accepted on each axis listed in `broadcast` (it
    broadcasts, as in edspdf).
    """
    got = tuple(got)
    ok = len(got) == len(expected)
    if ok:
        for axis, (g, e) in enumerate(zip(got, expected)):
            if g is None or e is None or g == e:
                continue
            if axis in broadcast and g == 1:
                continue
            ok = False
            break
    if not ok:
        raise ValueError(
            f"`{name}` has shape {got}, expected {description} = "
            f"{_show(expected)}."
        )


def check_mask(name, mask, batch, n_queries, n_keys, n_heads):
    shape = shape_of(mask)
    # Sizes of 1 broadcast (as in edspdf): on the batch, on the queries of a
    # 3-D or 4-D mask, and on the heads of a 4-D mask.
    forms = {
        2: ((batch, n_keys), "(batch, n_keys)", (0,)),
        3: ((batch, n_queries, n_keys), "(batch, n_queries, n_keys)", (0, 1, 2)),
        4: (
            (batch, n_queries, n_keys, n_heads),
            "(batch, n_queries, n_keys, n_heads) (pooling heads only)",
            (0, 1, 2, 3),
        ),
    }
    if len(shape) not in forms:
        raise ValueError(
            f"`{name}` has shape {shape}, expected one of "
            + ", ".join(f"{d} = {_show(e)}" for e, d, _ in forms.values())
            + "."
        )
    expected, description, broadcast = forms[len(shape)]
    check_shape(name, shape, expected, description, broadcast=broadcast)
    dtype = dtype_of(mask)
    if not (dtype == "bool" or "int" in dtype or "float" in dtype):
        raise TypeError(f"`{name}` must be bool or 0/1 numbers, got {dtype}.")


def check_integer(name, x):
    dtype = dtype_of(x)
    if "int" not in dtype:
        raise TypeError(
            f"`{name}` must have an integer dtype (int32 or int64), got "
            f"{dtype}."
        )


def as_bool(mask):
    if dtype_of(mask) == "bool":
        return mask
    return ops.not_equal(mask, 0)


def keras_mask_of(x):
    try:
        return _get_mask(x)
    except Exception:  # pragma: no cover - tensors that refuse attributes
        return None


def _show(shape):
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"
