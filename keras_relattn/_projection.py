"""The projections of `RelativeAttention`, and the initializer of its table."""

import keras
import numpy as np
from keras import ops


class Projection(keras.layers.EinsumDense):
    """`EinsumDense` whose float bias add cannot be misrouted.

    Keras' TensorFlow `ops.add` turns `x + bias` into `tf.nn.bias_add` when the
    bias squeezes to a vector, and picks the axis by size: with `head_size=1`
    a `(heads, 1)` bias is added along the *length* axis whenever the length
    equals the number of heads (a silent wrong answer, seen with Keras 3.15).
    `x - (-bias)` takes the plain broadcasting path on every backend.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.supports_masking = True  # the parent layer handles masks

    def quantize(self, mode=None, type_check=True, config=None):
        # EinsumDense refuses subclasses by default; this one only changes
        # the float bias add, so its quantized paths are EinsumDense's own.
        if config is None:  # Keras < 3.12 has no `config`
            super().quantize(mode, type_check=False)
        else:
            super().quantize(mode, type_check=False, config=config)

    def call(self, inputs, training=None):
        return self._add_bias(ops.einsum(self.equation, inputs, self.kernel))

    def quantized_call(self, *args, **kwargs):
        # EinsumDense's quantized paths add the bias with `ops.add` too: run
        # them without it (set around the layer's attribute tracking, which
        # must not see the swap), then add it the safe way.
        bias = self.bias
        object.__setattr__(self, "bias", None)
        try:
            x = super().quantized_call(*args, **kwargs)
        finally:
            object.__setattr__(self, "bias", bias)
        return self._add_bias(x)

    def _add_bias(self, x):
        if self.bias is None:
            return x
        return ops.subtract(x, ops.negative(ops.cast(self.bias, x.dtype)))


class ArrayInitializer(keras.initializers.Initializer):
    """Fills a weight with a given array (never serialized: see get_config)."""

    def __init__(self, value):
        self.value = np.asarray(value)

    def __call__(self, shape, dtype=None):
        if tuple(shape) != self.value.shape:
            raise ValueError(
                f"`position_embedding` has shape {self.value.shape}, expected "
                f"{tuple(shape)}"
            )
        return ops.convert_to_tensor(self.value, dtype=dtype)
