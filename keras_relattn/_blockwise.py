"""The pooled path (`return_logits=False`): one entry point, `pooled`, that
runs a `BlockStep` over blocks of queries.

The queries are split in blocks (`query_blocks`) so that no `(batch, heads,
queries, keys)` tensor exists for the whole input; a long input
(`recomputes`) has each block recomputed in the backward pass instead of
kept, as FlashAttention-2's backward does. A block is a pure function of its
named inputs (`run_block(step, rows, tensors, constants)`): the step is
static and hashable, `tensors` are what the gradient flows to, `constants`
are read only (masks, offsets, the dropout seed). So a block computed again
computes the same numbers, and a backend can compile the loop once per step
and shape. Dropout in a split input is `_logits.keep_mask` of a per-call
seed and each weight's coordinates: the same mask wherever the block runs.
"""

import dataclasses
from typing import Optional

import keras
import numpy as np
from keras import ops

from keras_relattn import _backend, _checks, config
from keras_relattn._logits import MASKED_LOGIT, add_all, attend, seeded_dropout
from keras_relattn._offsets import BlockRows, first_row, take_rows
from keras_relattn._position_terms import PositionTerms


def _static_sizes(q, k):
    """`(batch, n_queries, n_keys)`, or None unless all are statically known
    (a traced size is never tested in Python)."""
    batch, n_queries = _checks.shape_of(q)[:2]
    n_keys = _checks.shape_of(k)[1]
    return None if None in (batch, n_queries, n_keys) else (batch, n_queries, n_keys)


def block_elements():
    """The largest `(batch, heads, rows, keys)` block held at a time: the
    setting, else the backend's default."""
    chosen = config.get_block_settings().block_elements
    return _backend.get().default_block_elements() if chosen is None else chosen


def query_blocks(q, k, n_heads, max_rows=None):
    """Slices of the queries to pool one after the other: one (all queries)
    unless the sizes are known and a whole `(batch, heads, queries, keys)`
    tensor would pass `block_elements()`, or the queries pass `max_rows`."""
    sizes = _static_sizes(q, k)
    if sizes is None:
        return [slice(None)]
    batch, n_queries, n_keys = sizes
    per_query = max(1, batch * n_heads * n_keys)
    rows = max(1, block_elements() // per_query)
    if max_rows is not None:  # the banded path: fused, no (rows, keys) tensor to bound
        rows = max_rows if _backend.get().fuses_band() else min(rows, max_rows)
    if rows >= n_queries:
        return [slice(None)]
    return [slice(s, min(s + rows, n_queries)) for s in range(0, n_queries, rows)]


def recomputes(q, k, n_heads):
    """Whether the blocks are recomputed in the backward pass: sizes known
    and above `config.BlockSettings.recompute_elements` (2**23 by default:
    the long inputs; shorter ones split in blocks keep them, as the
    recomputation would cost a forward for memory the machine has)."""
    sizes = _static_sizes(q, k)
    if sizes is None:
        return False
    batch, n_queries, n_keys = sizes
    return batch * n_heads * n_queries * n_keys > config.get_block_settings().recompute_elements


@dataclasses.dataclass(frozen=True)
class BlockStep:
    """What a block of queries computes, apart from its tensors.

    The tensors it reads, by name: `values` `(batch, keys, heads, dv)`;
    with `c2c`, `c2c_q` `(batch, queries, heads, d)` and `c2c_k`; with
    `positions`, their table scores (`PositionTerms.score_names`) and, as
    constants, their offsets and no-position factor; `extra0`, `extra1`, ...
    (`n_extra` terms broadcastable to `(batch, heads, queries, keys)`); the
    constants `attend` (bool, broadcastable to the logits) when `masked`
    (`keys_only_mask`: the same for every query and head), and `seed`
    (int32) when `dropout_rate` is drawn from it.
    """

    c2c: bool
    positions: Optional[PositionTerms]
    n_extra: int
    masked: bool
    dropout_rate: float
    band: Optional["Band"] = None
    keys_only_mask: bool = True


@dataclasses.dataclass(frozen=True)
class Band:
    """Where the position terms vary, for token-index positions (`key -
    query` offsets `r` of tokens numbered 0, 1, ...): every pair with `r <=
    below` reads the table row of the left edge, every pair with `r >=
    above` the row of the right edge. A block of queries needs gathers over
    `width` keys only (`width < n_keys`); elsewhere its terms are a query's
    score plus a key's score against an edge row (`edge_c2p` `(batch, heads,
    queries, 2)`, `edge_p2c` `(batch, heads, 2, keys)`)."""

    below: int
    above: int
    width: int
    row_below: int
    row_above: int


def band_rows(n_positions, n_keys=None):
    """Queries per block on the banded path: the band's gathers cost `rows +
    n_positions` keys per query, the edge terms a pass over all keys per
    block (the backend's `BAND_ROWS`, at least the table's size); None: a
    table size not known here."""
    if not isinstance(n_positions, int):
        return None
    chosen = config.get_block_settings().band_rows
    if chosen is not None:
        return chosen
    rows = _backend.get().BAND_ROWS
    if isinstance(n_keys, int):  # short inputs: a band narrower than their keys
        rows = min(rows, max(64, n_keys // 4))
    return max(rows, n_positions)


def band_for(n_positions, block_rows, n_keys, buckets=None):
    """The `Band` of the table index (edspdf's clamped offsets, or DeBERTa's
    buckets) for blocks of `block_rows` queries over `n_keys` keys, or None
    where it would cover every key (or the index never settles)."""
    if not all(isinstance(n, int) for n in (n_positions, block_rows, n_keys)):
        return None
    reach = 4 * max(n_positions, 2 if buckets is None else buckets[1])
    offsets = np.arange(-reach, reach + 1)
    if buckets is not None:
        from keras_relattn.positions import _buckets_in_numpy

        offsets_read = -_buckets_in_numpy(offsets, *buckets)
    else:
        offsets_read = offsets
    index = np.clip(n_positions // 2 + offsets_read, 0, n_positions - 1)
    left, right = index[0], index[-1]
    if index[1] != left or index[-2] != right:
        return None  # not settled within reach
    if left == right:  # one row read by every pair (a 1-row table): a band of r = 0
        below, above = -1, 1
    else:
        below = offsets[np.argmax(index != left) - 1]
        above = offsets[len(index) - np.argmax(index[::-1] != right)]
    width = block_rows + int(above - below) - 2
    if not 0 < width < n_keys:
        return None
    return Band(int(below), int(above), width, int(left), int(right))


def banded_positions(step, rows, tensors):
    """c2p + p2c of the queries `rows` against every key `(batch, heads,
    rows, keys)`: gathered over the keys of the band, a sum of edge scores
    outside it (see `Band`)."""
    band, terms = step.band, step.positions
    n_keys = ops.shape(tensors["values"])[1]
    first = first_row(rows)
    if isinstance(rows, BlockRows):
        n_rows = rows.size
    else:
        n_rows = terms.n_queries if rows.stop is None else rows.stop - rows.start
    if isinstance(first, int):
        start = min(max(first + band.below + 1, 0), n_keys - band.width)
    else:  # traced (a loop's block)
        start = ops.clip(first + (band.below + 1), 0, n_keys - band.width)
    inside = terms.logits(tensors, rows, keys=BlockRows(start, band.width))
    offsets = (ops.expand_dims(ops.arange(n_keys, dtype="int32"), 0)
               - ops.expand_dims(ops.arange(n_rows, dtype="int32") + first, 1))
    left, right = offsets <= band.below, offsets >= band.above  # (rows, keys)
    outside = None
    for term, scores in (("c2p", "edge_c2p"), ("p2c", "edge_p2c")):
        if term not in terms.terms:
            continue
        if term == "c2p":  # a query's score: (batch, heads, rows, 1)
            edge = take_rows(tensors[scores], 2, rows)
            low, high = edge[..., :1], edge[..., 1:]
        else:  # a key's score: (batch, heads, 1, keys)
            edge = tensors[scores]
            low, high = edge[:, :, :1], edge[:, :, 1:]
        part = ops.where(left, low, ops.where(right, high, ops.zeros_like(low)))
        outside = part if outside is None else outside + part
    return _backend.get().place_keys(outside, ops.cast(inside, outside.dtype), start)


def fused_band(step, rows, tensors, constants):
    """A block of the banded path on the backend's fused attention kernel
    (`attend_in_parts`): the far keys as a plain dot-product attention of
    the queries plus an edge row of the position queries, shifted by each
    query's score against an edge row of the position keys (and the head
    bias); the band's logits built here. None where that does not apply: a
    backend without the kernel, a traced block, no c2c term, dropout, or a
    mask that is not one of keys."""
    if (not step.c2c or isinstance(rows, BlockRows) or step.dropout_rate
            or not step.keys_only_mask or not _backend.get().attends_in_parts()):
        return None
    terms, band = step.positions, step.band
    n_keys = terms.n_keys
    first = first_row(rows)
    last = terms.n_queries if rows.stop is None else rows.stop
    start = min(max(first + band.below + 1, 0), n_keys)
    stop = min(max(last - 1 + band.above, start), n_keys)
    q, k = take_rows(tensors["c2c_q"], 1, rows), tensors["c2c_k"]
    band_positions = terms.logits({**tensors, **constants}, rows, keys=slice(start, stop))
    bias = 0.0
    if step.n_extra:  # the head bias, (heads, 1, 1)
        band_positions = band_positions + tensors["extra0"]
        bias = ops.reshape(tensors["extra0"], (1, -1, 1))
    queries, shifts = [], []
    for edge in (0, 1):
        queries.append(q + tensors["edge_qp"][edge] if "p2c" in terms.terms else q)
        shift = take_rows(tensors["edge_c2p"], 2, rows)[..., edge] if "c2p" in terms.terms \
            else ops.zeros_like(ops.transpose(q[..., 0], (0, 2, 1)))
        shifts.append(shift + bias)
    key_mask, attend_mask = None, constants.get("attend")
    if attend_mask is not None:
        batch = ops.shape(q)[0]
        key_mask = ops.broadcast_to(attend_mask, (batch, 1, 1, n_keys))[:, 0, 0]
    return _backend.get().attend_in_parts(queries, shifts, k, tensors["values"], q,
                                          band_positions, (start, stop), key_mask)


def run_block(step, rows, tensors, constants, dropout=None, in_place=False):
    """One block of queries (`rows`): its logits, then the attention step
    (`_logits.attend`): `(batch, rows, heads, dv)`."""
    logits = None
    if step.band is not None and dropout is None:
        fused = fused_band(step, rows, tensors, constants)
        if fused is not None:
            return fused
    if step.band is not None:
        logits = banded_positions(step, rows, {**tensors, **constants})
    elif step.positions is not None:
        logits = step.positions.logits({**tensors, **constants}, rows, in_place)
    if step.c2c:
        q, k = take_rows(tensors["c2c_q"], 1, rows), tensors["c2c_k"]
        if logits is None:
            logits = ops.einsum("bqhd,bkhd->bhqk", q, k)
        elif in_place:  # added by the matmul itself, into the same buffer
            logits = _backend.get().add_matmul_in_place(
                logits, ops.transpose(q, (0, 2, 1, 3)), ops.transpose(k, (0, 2, 3, 1)))
        else:
            logits = ops.einsum("bqhd,bkhd->bhqk", q, k) + logits
    extra = [take_rows(tensors[f"extra{i}"], 2, rows) for i in range(step.n_extra)]
    if in_place:
        for term in extra:
            logits = _backend.get().add_in_place(logits, term)
    else:
        logits = add_all(([] if logits is None else [logits]) + extra)
    attend_mask = take_rows(constants["attend"], 2, rows) if step.masked else None
    if dropout is None and step.dropout_rate:
        dropout = seeded_dropout(constants["seed"], first_row(rows), step.dropout_rate)
    return attend(logits, tensors["values"], attend_mask, dropout, in_place)


def pooled(step, tensors, constants, blocks, recompute, dropout=None):
    """The pooled output `(batch, queries, heads, dv)` of every block: the one
    place that chooses how blocks run.

    - one block: at once (`dropout`, the layer's own, if any);
    - inference the backend does in place (torch eager): block by block, in
      place;
    - a long input: each block recomputed in the backward pass, in the
      backend's loop (`recomputed_blocks`), else a checkpoint per block;
    - else block by block, each kept for the backward pass.

    Split inputs draw their dropout from `constants["seed"]` (in `step`).
    """
    backend = _backend.get()
    in_place = backend.works_in_place(list(tensors.values()))
    if len(blocks) == 1:
        return run_block(step, blocks[0], tensors, constants, dropout, in_place)
    block = _BlockFunction(step)
    if step.band is not None and backend.fuses_band() and recompute:
        # A fused block keeps no (rows, keys) tensor for its backward, only its
        # band's (rows, band width) and a few of their size: recomputed only
        # where those pass four times the bound (DeBERTa's 1000-key band at
        # 8192 tokens does; a 64-row table's at 16384 does not).
        batch, heads = ops.shape(tensors["values"])[0], ops.shape(tensors["values"])[2]
        kept = batch * heads * step.positions.n_queries * step.band.width
        recompute = kept > 4 * config.get_block_settings().recompute_elements
    if recompute and not in_place:
        done = backend.recomputed_blocks(block, blocks, tensors, constants, step)
        if done is not None:
            return done
        return ops.concatenate(
            [backend.checkpoint(block, rows, tensors, constants) for rows in blocks], 1)
    return ops.concatenate(
        [run_block(step, rows, tensors, constants, in_place=in_place) for rows in blocks], 1)


@dataclasses.dataclass(frozen=True)
class _BlockFunction:
    """`run_block` of one step, as a function of `(rows, tensors,
    constants)`: what the backends recompute."""

    step: BlockStep

    def __call__(self, rows, tensors, constants):
        return run_block(self.step, rows, tensors, constants)


def draw_seed(seed_generator):
    """One int32 seed per call, from which each block's dropout mask is
    hashed (`_logits.keep_mask`)."""
    return keras.random.randint((), 0, 2**31 - 1, dtype="int32", seed=seed_generator)


__all__ = ["BlockStep", "draw_seed", "pooled", "query_blocks", "recomputes", "run_block",
           "MASKED_LOGIT"]
