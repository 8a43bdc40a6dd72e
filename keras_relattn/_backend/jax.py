"""The backend interface on JAX: one `lax.gather` that writes the logits in
their layout, and the recomputed blocks as a `lax.map` of `jax.checkpoint`,
compiled once per configuration and shape."""

import jax
import keras
from jax import lax
from keras import ops

from keras_relattn._records import flatten, rebuild
from keras_relattn._rows import BlockRows
from keras_relattn._backend.generic import _traced_by_key
from keras_relattn._backend.generic import (  # noqa: F401  (the interface)
    place_keys,
    GATHERS_ALONG_ROWS,
    INDEX_DTYPE,
    add_in_place,
    attend_band,
    attend_in_parts,
    band_min_keys,
    fuses_band,
    add_matmul_in_place,
    default_block_elements,
    layer_norm,
    masked_softmax_in_place,
    multiply_in_place,
    sizes_are_frozen,
    softmax,
    take_along_rows,
    works_in_place,
)

# On XLA, head-major scores and a gather written `(batch, queries, keys,
# heads)` (the returned logits' layout) fuse best; XLA adds the c2c term
# transposed inside the gather's fusion.
SCORE_LAYOUT = "head_major"
LOGITS_LAYOUT = "bqkh"
# The banded path: XLA fuses the terms outside the band into the logits it
# builds whole (the loop of recomputed blocks traces their first row), so
# short blocks, a narrow band.
BAND_ROWS = 64


def attends_in_parts():
    return False


def traced(fn, tensors, constants, key):
    """The blocks of one pooled call as one `jax.jit`, cached by `key`:
    eagerly, JAX compiles and dispatches each op of each block apart (the
    banded path of 1024 tokens was 3.9x slower than the per-token path's
    single block); one compiled loop instead. Inside a trace (`jax.jit`,
    `jax.grad`) it is a nested call, which XLA inlines."""
    return _traced_by_key(_TRACED, jax.jit, fn, tensors, constants, key)


_TRACED = {}  # compiled blocks by key (`generic._traced_by_key`)


def take_columns(table, columns, heads_last=True):
    # One gather whose output already has the heads where they go: XLA then
    # writes the logits once, in order.
    dims = lax.GatherDimensionNumbers(
        offset_dims=(columns.ndim if heads_last else 1,),
        collapsed_slice_dims=(1,),
        start_index_map=(1,),
    )
    return lax.gather(
        table, columns[..., None], dims, (table.shape[0], 1), mode="promise_in_bounds"
    )


def exact_gelu(x):
    """Keras' GELU (`erfc`) on JAX: `lax.erf` lowers to a StableHLO composite
    that TensorFlow's SavedModel loader (2.21) cannot read."""
    return keras.activations.gelu(x, approximate=False)


def checkpoint(fn, rows, tensors, constants):
    leaves, skeleton = flatten(tensors)
    return jax.checkpoint(lambda t: fn(rows, rebuild(skeleton, t), constants))(leaves)


def recomputed_blocks(fn, blocks, tensors, constants, key):
    """A `lax.map` of `jax.checkpoint` over the equal blocks (their first row
    traced), the shorter last one checkpointed apart: a loop's iterations run
    one after the other, where a Python loop of checkpoints leaves XLA free
    to schedule every block's recomputation at once (docs/performance.md,
    "Training at length"). The loop is one `jax.jit`, cached by
    `key` and the blocks, so an eager call compiles it once per shape."""
    size = blocks[0].stop - blocks[0].start
    n_equal = sum(1 for rows in blocks if rows.stop - rows.start == size)
    tail = tuple((rows.start, rows.stop) for rows in blocks[n_equal:])
    cache_key = (key, size, n_equal, tail)
    if cache_key not in _LOOPS:
        if len(_LOOPS) >= 64:
            _LOOPS.pop(next(iter(_LOOPS)))
        _LOOPS[cache_key] = _compiled_loop(fn, size, n_equal, tail, flatten(tensors)[1],
                                           flatten(constants)[1])
    return _LOOPS[cache_key](flatten(tensors)[0], flatten(constants)[0])


# Compiled loops by (key, blocks): `fn` and the records' structure are those
# of the first call with that key, which determines them.
_LOOPS = {}


def _compiled_loop(fn, size, n_equal, tail, tensors_skeleton, constants_skeleton):
    def loop(tensor_leaves, constant_leaves):
        tensors = rebuild(tensors_skeleton, tensor_leaves)
        constants = rebuild(constants_skeleton, constant_leaves)

        def block(start):
            return fn(BlockRows(start, size), tensors, constants)

        starts = ops.arange(n_equal, dtype="int32") * size
        looped = lax.map(jax.checkpoint(block), starts)  # (blocks, batch, rows, ...)
        looped = ops.swapaxes(looped, 0, 1)
        shape = tuple(looped.shape)
        done = [ops.reshape(looped, (shape[0], n_equal * size) + shape[3:])]
        for start, stop in tail:
            done.append(checkpoint(fn, slice(start, stop), tensors, constants))
        return done[0] if len(done) == 1 else ops.concatenate(done, 1)

    return jax.jit(loop)
