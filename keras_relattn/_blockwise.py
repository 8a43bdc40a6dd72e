"""Blocks of queries for the pooled path, and the dropout that a block
recomputed in the backward pass draws again identically.

The pooled path (`return_logits=False`) works through blocks of queries so
that no `(batch, heads, queries, keys)` tensor exists for the whole input
(`query_blocks`). When there are several and the input is long
(`recomputes`), each block is recomputed in the backward pass
(`_kernels.recomputed_blocks`, else `_kernels.checkpoint` per block):
autodiff keeps the blocks' inputs and outputs only, and the backward pass
recomputes their logits and softmax one block at a time, as
FlashAttention-2's backward does. A recomputed block must draw the
same dropout mask: `keep_mask` is a pure function of a per-call seed and of
each weight's coordinates.
"""

import numpy as np
from keras import ops

from keras_relattn import _checks, _kernels, config


def _static_sizes(q, k):
    """`(batch, n_queries, n_keys)`, or None unless all are statically known
    (a traced size is never tested in Python)."""
    batch, n_queries = _checks.shape_of(q)[:2]
    n_keys = _checks.shape_of(k)[1]
    return None if None in (batch, n_queries, n_keys) else (batch, n_queries, n_keys)


def query_blocks(q, k, n_heads):
    """Slices of the queries to pool one after the other.

    One block (all queries) unless the sizes are known and a whole
    `(batch, heads, queries, keys)` tensor would pass
    `_kernels.pooling_block_elements()`; never a Python test of a traced
    size.
    """
    sizes = _static_sizes(q, k)
    if sizes is None:
        return [slice(None)]
    batch, n_queries, n_keys = sizes
    per_query = max(1, batch * n_heads * n_keys)
    rows = max(1, _kernels.pooling_block_elements() // per_query)
    if rows >= n_queries:
        return [slice(None)]
    return [slice(s, min(s + rows, n_queries)) for s in range(0, n_queries, rows)]


def recomputes(q, k, n_heads):
    """Whether the pooled path's blocks are recomputed in the backward pass:
    sizes statically known and above `config.BlockSettings.recompute_elements`
    (2**23: the long inputs; shorter ones split in blocks, on torch eager,
    keep them: the recomputation would cost a forward for no memory the
    machine lacks)."""
    sizes = _static_sizes(q, k)
    if sizes is None:
        return False
    batch, n_queries, n_keys = sizes
    return batch * n_heads * n_queries * n_keys > config.get_block_settings().recompute_elements


def _int32(constant):
    """A uint32 constant as the int32 with the same bits."""
    return int(np.array(constant, np.uint32).view(np.int32))


# Odd constants of a multiply-xorshift hash (Murmur3's and "lowbias32"'s).
_ROW, _KEY, _HEAD = (_int32(c) for c in (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D))
_MIX1, _MIX2 = (_int32(c) for c in (0x7FEB352D, 0x846CA68B))


def _shift_right(x, bits):
    """Logical right shift of int32 bits (`right_shift` is arithmetic)."""
    return ops.bitwise_and(ops.right_shift(x, bits), (1 << (32 - bits)) - 1)


def keep_mask(seed, shape, first_row, rate):
    """Which attention weights dropout keeps, for one block.

    Args:
        seed: int32 scalar tensor, drawn once per call.
        shape: `(batch, heads, rows, keys)` of the block's weights.
        first_row: the number of the block's first query.
        rate: the dropout rate.

    Returns:
        bool `(batch, heads, rows, keys)`: True with probability `1 - rate`,
        a function of `seed` and each weight's (batch, head, query, key)
        only, so the same whenever and wherever the block is computed.
        Each weight hashes its coordinates with the seed (wrapping int32
        arithmetic) into 24 uniform bits.
    """
    batch, heads, rows, keys = shape
    pair = ops.reshape(ops.arange(batch * heads, dtype="int32"), (batch, heads, 1, 1))
    row = ops.reshape(ops.arange(rows, dtype="int32") + first_row, (1, 1, rows, 1))
    key = ops.reshape(ops.arange(keys, dtype="int32"), (1, 1, 1, keys))
    x = ops.cast(seed, "int32") + pair * _HEAD + row * _ROW + key * _KEY
    x = ops.bitwise_xor(x, _shift_right(x, 16)) * _MIX1
    x = ops.bitwise_xor(x, _shift_right(x, 15)) * _MIX2
    x = ops.bitwise_xor(x, _shift_right(x, 16))
    uniform = ops.cast(ops.bitwise_and(x, (1 << 24) - 1), "float32") * (1.0 / (1 << 24))
    return uniform >= rate
