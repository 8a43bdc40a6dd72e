"""Running the pooled path (`return_logits=False`): one block of queries,
and every block in order (`pooled`). What the blocks are, and what they
read, is planned in `_block_plan`.

A block is a pure function of its records (`run_block(step, rows, tensors,
constants)`): the `BlockStep` is static and hashable, `BlockTensors` are
what the gradient flows to, `BlockConstants` are read only (masks, offsets,
the dropout seed). So a block computed again computes the same numbers, and
a backend can compile the loop once per step and shape. Dropout in a split
input is `_logits.keep_mask` of a per-call seed and each weight's
coordinates: the same mask wherever the block runs.

Every block ends in the one attention step, `_logits.attend` (masked
float32 softmax, dropout, pooling), but one: the banded block that the
backend attends on its fused kernel (`attend_in_parts`, torch; never with
dropout).
"""

import dataclasses
from typing import Any, Optional

from keras import ops

from keras_relattn import _backend
from keras_relattn._logits import add_all, attend, seeded_dropout
from keras_relattn._position_terms import PositionTerms
from keras_relattn._records import Record, flatten
from keras_relattn._rows import BlockRows, first_row, take_rows


@dataclasses.dataclass(frozen=True)
class Band:
    """Where the position terms vary, for token-index positions (`key -
    query` offsets `r` of tokens numbered 0, 1, ...): every pair with `r <=
    below` reads the table row `row_below` (the left edge), every pair with
    `r >= above` the row `row_above`. A block of queries needs gathers over
    `width` keys only (`width < n_keys`); elsewhere its terms are a query's
    score plus a key's score against an edge row (`BandEdges`)."""

    below: int
    above: int
    width: int
    row_below: int
    row_above: int
    window_rows: tuple = ()  # the table row of each offset between below and above


@dataclasses.dataclass(frozen=True)
class BlockStep:
    """What a block of queries computes, apart from its tensors: which
    fields of `BlockTensors` and `BlockConstants` it reads (hashable: a
    compiled loop is cached by it)."""

    c2c: bool  # the c2c term: `BlockTensors.c2c_q` and `c2c_k`
    positions: Optional[PositionTerms]  # c2p + p2c: `BlockTensors.positions`
    n_extra: int  # len(`BlockTensors.extra`)
    masked: bool  # `BlockConstants.attend`
    dropout_rate: float  # drawn from `BlockConstants.seed` where not 0
    band: Optional[Band] = None  # the banded path: `BlockTensors.edges`
    keys_only_mask: bool = True  # the mask is the same for every query and head
    # The band's far keys on the backend's fused kernel (`attend_band`,
    # `attend_in_parts`): planned only where no weight is dropped, as the
    # kernels drop none; with dropout, the band's blocks build their logits.
    fused_band: bool = False


@dataclasses.dataclass(frozen=True)
class BandEdges(Record):
    """Each query's and key's score against the band's two edge rows."""

    c2p: Any = None  # (batch, heads, queries, 2): the queries against pos_k's edge rows
    p2c: Any = None  # (batch, heads, 2, keys): pos_q's edge rows against the keys
    table_q: Any = None  # (2, heads, d): pos_q's edge rows (with p2c)


@dataclasses.dataclass(frozen=True)
class BlockTensors(Record):
    """What the blocks read and the gradient flows to (pooling heads only)."""

    values: Any  # (batch, keys, heads, dv), projected
    # c2c: (batch, queries, heads, d) scaled and (batch, keys, heads, d); with
    # the head bias riding in the matmul, one more column each (the bias, ones).
    c2c_q: Any = None
    c2c_k: Any = None
    extra: tuple = ()  # terms broadcastable to (batch, heads, queries, keys)
    positions: Any = None  # `_position_terms.PositionTensors`
    edges: Optional[BandEdges] = None  # the banded path


@dataclasses.dataclass(frozen=True)
class BlockConstants(Record):
    """What the blocks read only."""

    attend: Any = None  # bool, broadcastable to (batch, heads, queries, keys); True: attend
    seed: Any = None  # int32 scalar: the dropout masks' (`_logits.keep_mask`)
    positions: Any = None  # `_position_terms.PositionConstants`


def run_block(step, rows, tensors, constants, dropout=None, in_place=False):
    """One block of queries (`rows`): its logits, then the attention step
    (`_logits.attend`): `(batch, rows, heads, dv)`."""
    if dropout is None and step.dropout_rate:
        dropout = seeded_dropout(constants.seed, first_row(rows), step.dropout_rate)
    if step.band is not None:
        in_parts = band_in_parts(step, rows, tensors, constants, dropout)
        if in_parts is not None:
            return in_parts
    logits = None
    if step.band is not None:
        logits = banded_positions(step, rows, tensors, constants)
    elif step.positions is not None:
        logits = step.positions.logits(tensors.positions, constants.positions, rows, in_place)
    if step.c2c:
        logits = _add_c2c(logits, take_rows(tensors.c2c_q, 1, rows), tensors.c2c_k, in_place)
    extra = [take_rows(term, 2, rows) for term in tensors.extra]
    if in_place:
        for term in extra:
            logits = _backend.get().add_in_place(logits, term)
    else:
        logits = add_all(([] if logits is None else [logits]) + extra)
    attend_mask = take_rows(constants.attend, 2, rows) if step.masked else None
    return attend(logits, tensors.values, attend_mask, dropout, in_place)


def _add_c2c(logits, q, k, in_place):
    """`logits` (None: none yet) plus the c2c term `(batch, heads, rows, keys)`."""
    if logits is None:
        return ops.einsum("bqhd,bkhd->bhqk", q, k)
    if in_place:  # added by the matmul itself, into the same buffer
        return _backend.get().add_matmul_in_place(
            logits, ops.transpose(q, (0, 2, 1, 3)), ops.transpose(k, (0, 2, 3, 1)))
    return ops.einsum("bqhd,bkhd->bhqk", q, k) + logits


def banded_positions(step, rows, tensors, constants):
    """c2p + p2c of the queries `rows` against every key `(batch, heads,
    rows, keys)`: gathered over the keys of the band, a sum of edge scores
    outside it (see `Band`)."""
    band, terms = step.band, step.positions
    n_keys = ops.shape(tensors.values)[1]
    first = first_row(rows)
    if isinstance(rows, BlockRows):
        n_rows = rows.size
    else:
        n_rows = terms.n_queries if rows.stop is None else rows.stop - rows.start
    if isinstance(first, int):
        start = min(max(first + band.below + 1, 0), n_keys - band.width)
    else:  # traced (a loop's block)
        start = ops.clip(first + (band.below + 1), 0, n_keys - band.width)
    inside = terms.logits(tensors.positions, constants.positions, rows,
                          keys=BlockRows(start, band.width))
    offsets = (ops.expand_dims(ops.arange(n_keys, dtype="int32"), 0)
               - ops.expand_dims(ops.arange(n_rows, dtype="int32") + first, 1))
    left, right = offsets <= band.below, offsets >= band.above  # (rows, keys)
    outside = None
    if tensors.edges.c2p is not None:  # a query's score: (batch, heads, rows, 1)
        edge = take_rows(tensors.edges.c2p, 2, rows)
        low, high = edge[..., :1], edge[..., 1:]
        outside = ops.where(left, low, ops.where(right, high, ops.zeros_like(low)))
    if tensors.edges.p2c is not None:  # a key's score: (batch, heads, 1, keys)
        edge = tensors.edges.p2c
        low, high = edge[:, :, :1], edge[:, :, 1:]
        part = ops.where(left, low, ops.where(right, high, ops.zeros_like(low)))
        outside = part if outside is None else outside + part
    return _backend.get().place_keys(outside, ops.cast(inside, outside.dtype), start)


def band_in_parts(step, rows, tensors, constants, dropout=None):
    """A block of the banded path in three parts of keys: the far keys
    (before the band, after it), whose logits are a plain dot product of
    the queries plus an edge row of the position queries, shifted by each
    query's score against an edge row of the position keys (and the head
    bias); and the band, whose position logits are gathered. On the
    backend's fused kernel where it has one and the step plans it
    (`attend_in_parts`, `step.fused_band`: no dropout), else the parts'
    logits joined and the one attention step (`dropout`: a function of the
    weights, or None). None where that does not apply: a backend that
    builds the logits whole, no c2c term, or a mask that is not one of
    keys.

    A loop's block (`BlockRows`, its first row traced: TensorFlow's graphs)
    reads a band of `band.width` keys from a traced key, and far keys of
    traced sizes. Joined, the far keys cost a matmul and a broadcast add
    over their logits, where the whole-row form (`banded_positions`)
    selects each logit's edge row, twice: 1.7x less for a banded training
    step on eager TensorFlow (benchmarks/issue37_band.txt)."""
    if (not step.c2c or not step.keys_only_mask
            or not _backend.get().attends_in_parts()):
        return None
    terms, band, edges = step.positions, step.band, tensors.edges
    n_keys = terms.n_keys
    first = first_row(rows)
    if isinstance(rows, BlockRows):  # the band's keys: as `banded_positions` reads them
        start = ops.clip(first + (band.below + 1), 0, n_keys - band.width)
        stop, band_keys = start + band.width, BlockRows(start, band.width)
    else:
        last = terms.n_queries if rows.stop is None else rows.stop
        start = min(max(first + band.below + 1, 0), n_keys)
        stop = min(max(last - 1 + band.above, start), n_keys)
        band_keys = slice(start, stop)
    q, k = take_rows(tensors.c2c_q, 1, rows), tensors.c2c_k
    band_positions = terms.logits(tensors.positions, constants.positions, rows, keys=band_keys)
    bias = 0.0
    if step.n_extra:  # the head bias, (heads, 1, 1)
        band_positions = band_positions + tensors.extra[0]
        bias = ops.reshape(tensors.extra[0], (1, -1, 1))
    queries, shifts = [], []
    for edge in (0, 1):
        queries.append(q if edges.table_q is None else q + edges.table_q[edge])
        shift = (ops.zeros_like(ops.transpose(q[..., 0], (0, 2, 1))) if edges.c2p is None
                 else take_rows(edges.c2p, 2, rows)[..., edge])
        shifts.append(shift + bias)
    key_mask = None
    if constants.attend is not None:
        key_mask = ops.broadcast_to(constants.attend, (ops.shape(q)[0], 1, 1, n_keys))[:, 0, 0]
    if step.fused_band and isinstance(start, int):  # (planned only without dropout)
        fused = _backend.get().attend_in_parts(queries, shifts, k, tensors.values, q,
                                               band_positions, (start, stop), key_mask)
        if fused is not None:
            return fused
    logits = _logits_in_parts(queries, shifts, k, q, band_positions, (start, stop))
    return attend(logits, tensors.values,
                  None if key_mask is None else key_mask[:, None, None, :], dropout)


def band_whole(step, tensors, constants):
    """The banded path over every query at once, on the backend's fused
    kernel (`attend_band`): the far keys as two causal attentions, each
    query's window of keys between the band's edges explicitly. None where
    the backend has no such kernel, or it does not apply (no c2c term, a
    mask that is not one of keys)."""
    if not step.c2c or not step.keys_only_mask:
        return None
    band, positions, edges = step.band, tensors.positions, tensors.edges
    q, k = tensors.c2c_q, tensors.c2c_k
    if band.above - band.below < 2 or _cross_lengths(q, k):  # no window, or cross lengths
        return None
    rows = ops.convert_to_tensor(band.window_rows, "int32")
    bias = tensors.extra[0] if step.n_extra else None  # (heads, 1, 1)
    window_table = window_scores = None
    if edges.table_q is not None:  # p2c
        window_table = ops.take(positions.query_table[0], rows, axis=0)
    if positions.queries is not None:  # c2p: (batch, heads, n, window)
        window_scores = ops.einsum("bnhd,whd->bhnw", q,
                                   ops.take(positions.key_table[0], rows, axis=0))
    if bias is not None:
        window_scores = bias if window_scores is None else window_scores + bias
    far_queries = tuple(q if edges.table_q is None else q + edges.table_q[e] for e in (0, 1))
    far_constants = []
    for e in (0, 1):
        constant = (ops.zeros_like(ops.transpose(q[..., 0], (0, 2, 1))) if edges.c2p is None
                    else edges.c2p[..., e])
        far_constants.append(constant if bias is None
                             else constant + ops.reshape(bias, (1, -1, 1)))
    key_mask = None
    if constants.attend is not None:
        key_mask = ops.broadcast_to(constants.attend, (ops.shape(q)[0], 1, 1, ops.shape(k)[1]))
        key_mask = key_mask[:, 0, 0]
    return _backend.get().attend_band(far_queries, tuple(far_constants), k, tensors.values, q,
                                      window_table, window_scores, (band.below, band.above),
                                      key_mask)


def _cross_lengths(q, k):
    """Whether the queries and keys differ in length (or a length is not
    known): token `i` of each numbered `i`, the far keys are causal
    attentions only where the lengths are equal."""
    n_queries, n_keys = q.shape[1], k.shape[1]
    return not isinstance(n_queries, int) or n_queries != n_keys


def _logits_in_parts(queries, shifts, keys, band_queries, band_positions, band_keys):
    """A banded block's logits `(batch, heads, rows, keys)`, joined from its
    three parts (see `band_in_parts`); `band_keys`: Python ints, or traced
    (every part kept, the far ones maybe empty)."""
    start, stop = band_keys
    n_keys = keys.shape[1]
    traced = not isinstance(start, int)
    parts = [ops.einsum("bqhd,bkhd->bhqk", q, keys[:, first:last]) + added
             for q, added, first, last in (
                 (queries[0], ops.expand_dims(shifts[0], -1), 0, start),
                 (band_queries, band_positions, start, stop),
                 (queries[1], ops.expand_dims(shifts[1], -1), stop, n_keys),
             ) if traced or last > first]
    logits = parts[0] if len(parts) == 1 else ops.concatenate(parts, -1)
    if traced:  # parts of traced sizes: the keys' count is known
        logits = ops.reshape(logits, tuple(ops.shape(logits)[:3]) + (n_keys,))
    return logits


def pooled(step, tensors, constants, blocks, recompute, dropout=None):
    """The pooled output `(batch, queries, heads, dv)` of every block: the one
    place that chooses how blocks run.

    - one block: at once (`dropout`, the layer's own, if any);
    - inference the backend does in place (torch eager): block by block, in
      place;
    - `recompute`: each block recomputed in the backward pass, in the
      backend's loop (`recomputed_blocks`), else a checkpoint per block;
    - else block by block, each kept for the backward pass.
    """
    backend = _backend.get()
    if step.fused_band:
        whole = band_whole(step, tensors, constants)
        if whole is not None:
            return whole
    in_place = backend.works_in_place(flatten(tensors)[0])
    if len(blocks) == 1:
        return run_block(step, blocks[0], tensors, constants, dropout, in_place)
    if not in_place:  # the blocks as one traced function where the backend runs op by op
        loop = _BlockLoop(step, tuple((rows.start, rows.stop) for rows in blocks),
                          bool(recompute))
        done = backend.traced(loop, tensors, constants, loop)
        if done is not None:
            return done
    return _run_blocks(step, tensors, constants, blocks, recompute, in_place)


def _run_blocks(step, tensors, constants, blocks, recompute, in_place=False):
    """Every block, concatenated on the queries (see `pooled`)."""
    backend = _backend.get()
    if recompute and not in_place:
        block = _BlockFunction(step)
        done = backend.recomputed_blocks(block, blocks, tensors, constants, step)
        if done is not None:
            return done
        return ops.concatenate(
            [backend.checkpoint(block, rows, tensors, constants) for rows in blocks], 1)
    return ops.concatenate(
        [run_block(step, rows, tensors, constants, in_place=in_place) for rows in blocks], 1)


@dataclasses.dataclass(frozen=True)
class _BlockLoop:
    """`_run_blocks` of one step and its blocks, as a function of `(tensors,
    constants)` (hashable: what a backend traces once, `traced`)."""

    step: BlockStep
    blocks: tuple  # (start, stop) of each block's queries (slices hash from Python 3.12)
    recompute: bool

    def __call__(self, tensors, constants):
        blocks = [slice(start, stop) for start, stop in self.blocks]
        return _run_blocks(self.step, tensors, constants, blocks, self.recompute)


@dataclasses.dataclass(frozen=True)
class _BlockFunction:
    """`run_block` of one step, as a function of `(rows, tensors,
    constants)`: what the backends recompute."""

    step: BlockStep

    def __call__(self, rows, tensors, constants):
        return run_block(self.step, rows, tensors, constants)
