"""The backend-specific code, behind one interface, chosen once.

As Keras puts `keras.ops.dot_product_attention` in front of one function per
backend (`keras/src/backend/<name>/nn.py`), every backend-specific operation
of this package is a function of the module `get()` returns: `jax`,
`tensorflow` or `torch` where the backend has a faster way, else `generic`
(plain `keras.ops`, which every fast path is tested against). No other
module names a backend or compares `keras.backend.backend()`.

The interface (each module defines every name; `generic` says what each
computes; axes: `b` batch, `h` heads, `q` queries or rows, `k` keys, `P`
table rows, `d` head size; "record": a frozen dataclass of tensors,
`keras_relattn._records`, which a backend flattens where it needs a list):

- layout choices: `INDEX_DTYPE` (of table indices), `SCORE_LAYOUT`
  ("head_major" or "heads_minor" flat scores), `LOGITS_LAYOUT` ("bhqk" or
  "bqkh"), `GATHERS_ALONG_ROWS`, `BAND_ROWS` (queries per banded block),
  `default_block_elements()`, `sizes_are_frozen()`;
- gathers: `take_columns(table (h, n), columns, heads_last) -> (*columns,
  h)`, `take_along_rows(scores (b, h, q, P) or (b, h, P, k), index (b|1, q,
  k), axis, out) -> (b, h, q, k)`, `place_keys(outside (..., k), inside
  (..., w), start) -> (..., k)`;
- numerics: `softmax(x, axis)`, `masked_softmax_in_place(logits (b, h, q,
  k), attend, masked_logit)`, `exact_gelu(x)`, `layer_norm(x, gamma, beta,
  epsilon, size) -> x or None`;
- in-place inference: `works_in_place(tensors: list)`, `add_in_place(total,
  term)`, `add_matmul_in_place(total (b, h, q, k), a (b, h, q, d), b (b, h,
  d, k))`, `multiply_in_place(total, factor)`;
- recomputed blocks (a block is a function of its rows and two records,
  what the gradient flows to and what it reads only, returning `(b, rows, h,
  dv)`): `checkpoint(fn, rows, tensors, constants)`,
  `recomputed_blocks(fn, blocks, tensors, constants, key) -> (b, q, h, dv)
  or None`; every block of a call as one traced function, `traced(fn,
  tensors, constants, key) -> (b, q, h, dv) or None`;
- the banded path's blocks: `band_min_keys() -> int` (the keys from which
  the band pays, measured), `fuses_band()`, `attends_in_parts()`,
  `attend_in_parts(queries (left, right) (b, q, h, d), constants (left,
  right) (b, h, q), keys (b, k, h, d), values (b, k, h, dv), band_queries
  (b, q, h, d), band_positions (b, h, q, band), band_keys (start, stop),
  key_mask (b, k) | None) -> (b, q, h, dv) or None` (None: no fused
  kernel; the caller joins the parts' logits and attends);
  `attend_band(far_queries (left, right) (b, n, h, d), far_constants (left,
  right) (b, h, n), keys (b, n, h, d), values (b, n, h, dv), band_queries
  (b, n, h, d), window_table (w, h, d) | None, window_scores (b, h, n, w) |
  None, window (below, above), key_mask (b, n) | None) -> (b, n, h, dv) or
  None` (every query at once; None: no such kernel, the blocks run).

A backend module imports nothing of the package but the rows of a block
and the records it flattens (`keras_relattn._rows`, `keras_relattn._records`).
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
