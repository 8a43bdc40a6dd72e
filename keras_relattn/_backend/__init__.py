"""The backend-specific code, behind one interface, chosen once.

As Keras puts `keras.ops.dot_product_attention` in front of one function per
backend (`keras/src/backend/<name>/nn.py`), every backend-specific operation
of this package is a function of the module `get()` returns: `jax`,
`tensorflow` or `torch` where the backend has a faster way, else `generic`
(plain `keras.ops`, which every fast path is tested against). No other
module names a backend or compares `keras.backend.backend()`.

The interface (each module defines every name; see `generic` for what each
computes):

- layout choices: `INDEX_DTYPE`, `SCORE_LAYOUT`, `LOGITS_LAYOUT`,
  `GATHERS_ALONG_ROWS`, `default_block_elements()`, `sizes_are_frozen()`;
- gathers: `take_columns`, `take_along_rows`;
- numerics: `softmax`, `masked_softmax_in_place`, `exact_gelu`,
  `layer_norm`;
- in-place inference: `works_in_place`, `add_in_place`, `add_matmul_in_place`;
- recomputed blocks: `checkpoint`, `recomputed_blocks`.
"""

import functools
import importlib

import keras

_FAST = ("jax", "tensorflow", "torch")


@functools.cache
def _load(name):
    return importlib.import_module(
        f"keras_relattn._backend.{name if name in _FAST else 'generic'}"
    )


def get():
    """The module of the backend Keras runs on (fixed for the process; a
    plain read, which `torch.compile` traces without a break)."""
    return _CURRENT


def reference():
    """The plain `keras.ops` module (`generic`): the fallback, and what the
    tests compare each fast path with."""
    return _load("generic")


_CURRENT = _load(keras.backend.backend())
