"""The logits' sum, and the one attention step: masked float32 softmax,
dropout, pooling.

Every path pools through `attend`: the full path (logits returned), the
pooled path in one block or in blocks, inference in place, and the blocks a
backward pass recomputes.
"""

import numpy as np
from keras import ops

from keras_relattn import _backend, _checks

# edspdf *replaces* masked logits by this value before the softmax (it does
# not add it). It is representable in float16 and bfloat16, and the softmax
# always runs in float32, so it can neither overflow nor produce NaN; a row
# whose every key is masked averages the values uniformly.
MASKED_LOGIT = -10000.0

LAYOUTS = ("bqkh", "bhqk")


def add_all(terms):
    """The sum of `terms`, in order."""
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


class LogitSum:
    """The terms of the logits, each kept in the layout it was made in, and
    summed once, in the layout a reader asks for.

    The logits are returned `(batch, queries, keys, heads)` ("bqkh"), as
    edspdf does; the c2c matmul and the softmax + pooling run `(batch,
    heads, queries, keys)` ("bhqk"), like `MultiHeadAttention`: a matmul
    writing or reading the other layout pays a strided copy of the whole
    tensor. The position terms come in whichever layout the backend makes
    best (`_backend.get().LOGITS_LAYOUT`).
    """

    def __init__(self):
        self._terms = {"bqkh": [], "bhqk": []}
        self._sums = {}

    def add(self, term, layout):
        if layout not in LAYOUTS:
            raise ValueError(f"`layout` must be one of {LAYOUTS}, got {layout!r}")
        self._terms[layout].append(term)
        self._sums.clear()

    def add_head_bias(self, bias):
        """Adds a `(heads,)` bias to the first term (one pass less)."""
        for layout, expand in (("bhqk", lambda b: b[:, None, None]), ("bqkh", lambda b: b)):
            terms = self._terms[layout]
            if terms:
                terms[0] = terms[0] + expand(ops.cast(bias, terms[0].dtype))
                self._sums.clear()
                return

    def _bhqk_sum(self):
        if "bhqk" not in self._sums:
            terms = self._terms["bhqk"]
            self._sums["bhqk"] = add_all(terms) if terms else None
        return self._sums["bhqk"]

    def bqkh(self):
        """The summed logits, `(batch, queries, keys, heads)`."""
        if "bqkh" not in self._sums:
            bhqk = self._bhqk_sum()
            bhqk = None if bhqk is None else ops.transpose(bhqk, (0, 2, 3, 1))
            if self._terms["bqkh"]:
                total = add_all(self._terms["bqkh"])
                self._sums["bqkh"] = total if bhqk is None else total + bhqk
            else:
                self._sums["bqkh"] = bhqk
        return self._sums["bqkh"]

    def bhqk(self):
        """The summed logits, `(batch, heads, queries, keys)`: transposed
        back from `bqkh()` only when some term came as `(b, q, k, h)`."""
        if self._terms["bqkh"]:
            return ops.transpose(self.bqkh(), (0, 3, 1, 2))
        return self._bhqk_sum()


def combine_masks(mask, key_mask, values_mask):
    """The layer's masks as one bool tensor broadcastable to `(batch, heads,
    queries, keys)` (None without any), and whether it masks keys only
    (the same for every query and head): decided from the masks' ranks,
    never from a dimension a trace may not know."""
    attend_mask, keys_only = None, True
    for m in (key_mask, values_mask):
        if m is not None:
            m = _checks.as_bool(m)[:, None, None, :]
            attend_mask = m if attend_mask is None else ops.logical_and(attend_mask, m)
    if mask is not None:
        m = _checks.as_bool(mask)
        keys_only = len(m.shape) == 2
        if len(m.shape) == 2:
            m = m[:, None, None, :]
        elif len(m.shape) == 3:
            m = m[:, None]
        else:  # (b, q, k, pooling heads)
            m = ops.transpose(m, (0, 3, 1, 2))
        attend_mask = m if attend_mask is None else ops.logical_and(attend_mask, m)
    return attend_mask, keys_only


def attend(logits, values, attend_mask=None, dropout=None, in_place=False):
    """The attention step: `(batch, heads, queries, keys)` logits, masked
    (logits *replaced* by `MASKED_LOGIT` where `attend_mask` is False),
    softmaxed over the keys in float32, dropped out, and averaging `values`
    `(batch, keys, heads, value_size)`: `(batch, queries, heads,
    value_size)`.

    `dropout`: a function of the weights, or None. `in_place`
    (`_backend.works_in_place`): the softmax overwrites the float32 logits.
    """
    backend = _backend.get()
    if in_place:
        weights = backend.masked_softmax_in_place(logits, attend_mask, MASKED_LOGIT)
    else:
        logits = ops.cast(logits, "float32")
        if attend_mask is not None:
            logits = ops.where(attend_mask, logits, MASKED_LOGIT)
        weights = ops.cast(backend.softmax(logits, axis=-1), values.dtype)
    if dropout is not None:
        weights = dropout(weights)
    return ops.einsum("bhqk,bkhd->bqhd", weights, values)


def seeded_dropout(seed, first_row, rate):
    """Dropout of a block's `(batch, heads, rows, keys)` weights whose mask is
    `keep_mask(seed, ...)`: the same whenever the block is computed again."""

    def dropout(weights):
        keep = keep_mask(seed, ops.shape(weights), first_row, rate)
        return ops.where(keep, weights * ops.cast(1.0 / (1.0 - rate), weights.dtype), 0.0)

    return dropout


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
