"""Planning the pooled path (`return_logits=False`): the blocks of queries,
whether they are recomputed, the band, and the records the blocks read,
from the layer's projected heads; then `_blocks.pooled` runs them.

The queries are split in blocks (`query_blocks`) so that no `(batch, heads,
queries, keys)` tensor exists for the whole input; a long input
(`recomputes`) has each block recomputed in the backward pass instead of
kept, as FlashAttention-2's backward does. With token-index positions
(`sequence_positions`), a block reads the table over a band of keys only
(`band_for`): the banded path.
"""

import keras
import numpy as np
from keras import ops

from keras_relattn import _backend, _blocks, _checks, config
from keras_relattn._blocks import Band, BandEdges, BlockConstants, BlockStep, BlockTensors
from keras_relattn._position_terms import position_terms
from keras_relattn.positions import _buckets_in_numpy


def pool(q, k, values, position=None, base=None, head_bias=None, attend_mask=None,
         keys_only=True, c2c=True, banded=False, buckets=None, dropout=None):
    """The pooled output `(batch, queries, heads, dv)` of the pooling heads.

    Args:
        q: `(batch, queries, heads, d)` scaled; `k`: `(batch, keys, heads, d)`.
        values: `(batch, keys, heads, dv)`, projected.
        position: `((pos_q, pos_k), offsets, no_position_mask)` (see
            `_position_terms.position_terms`) or None.
        base: a term broadcastable to `(batch, heads, queries, keys)`, or None.
        head_bias: `(heads,)` or None.
        attend_mask: bool broadcastable to `(batch, heads, queries, keys)`
            (True: attend) or None; `keys_only`: the same for every query
            and head.
        c2c: whether the c2c term is on.
        banded: token-index positions (`sequence_positions`) that may take the
            banded path.
        buckets: DeBERTa's `(bucket_size, max_position)` or None.
        dropout: the layer's `keras.layers.Dropout` where it drops the
            weights in this call, else None.
    """
    extra = [] if base is None else [base]
    tensors = dict(values=values)
    if c2c:
        tensors.update(c2c_q=q, c2c_k=k)
    banded = (banded and position is not None and position[2] is None and base is None
              and takes_band(_checks.shape_of(k)[1]))
    # The far keys on the backend's fused kernel, which drops no weight:
    # with dropout, the band's blocks build their logits and drop them.
    fused_band = banded and dropout is None and _backend.get().fuses_band()
    if head_bias is not None:
        if c2c and not banded:  # in the c2c matmul: one pass less
            tensors.update(c2c_q=ops.concatenate([q, ops.zeros_like(q[..., :1]) + head_bias[:, None]],
                                                 -1),
                           c2c_k=ops.concatenate([k, ops.ones_like(k[..., :1])], -1))
        else:
            extra.append(head_bias[:, None, None])
    n_positions = None
    if position is not None:
        table = position[0][1] if position[0][1] is not None else position[0][0]
        n_positions = _checks.shape_of(table)[0]
    n_keys = _checks.shape_of(k)[1]
    rows = band_rows(n_positions, n_keys) if banded else None
    blocks = query_blocks(q, k, rows, fused_band)
    band = _band(n_positions, n_keys, q, blocks, buckets) if banded else None
    fused_band = fused_band and band is not None
    terms, constants = None, {}
    if position is not None:  # the table scores: once for every block, or each band's own
        (pos_q, pos_k), offsets, no_position_mask = position
        terms, tensors["positions"], constants["positions"] = position_terms(
            q, k, pos_q, pos_k, offsets, no_position_mask, output="bhqk", buckets=buckets,
            per_block=band is not None)
        if band is not None:
            tensors["edges"] = _edges(band, q, k, pos_q, pos_k)
    recompute = _recompute(q, k, blocks, band if fused_band else None)
    rate, layer_dropout = 0.0, None
    if dropout is not None and len(blocks) > 1:  # one draw per call, each block's mask of it
        rate, constants["seed"] = dropout.rate, draw_seed(dropout.seed_generator)
    elif dropout is not None:
        layer_dropout = lambda weights: dropout(weights, training=True)  # noqa: E731
    config._record(config.BlockPlan(_checks.shape_of(q)[1], len(blocks), recompute,
                                    None if band is None else band.width))
    step = BlockStep(c2c=c2c, positions=terms, n_extra=len(extra),
                     masked=attend_mask is not None, keys_only_mask=keys_only,
                     dropout_rate=rate, band=band, fused_band=fused_band)
    return _blocks.pooled(step, BlockTensors(**tensors, extra=tuple(extra)),
                          BlockConstants(attend=attend_mask, **constants), blocks, recompute,
                          layer_dropout)


def block_elements():
    """The largest `(batch, heads, rows, keys)` block held at a time: the
    setting, else the backend's default."""
    chosen = config.get_block_settings().block_elements
    return _backend.get().default_block_elements() if chosen is None else chosen


def _static_sizes(q, k):
    """`(batch, n_queries, heads, n_keys)`, or None unless all are statically
    known (a traced size is never tested in Python)."""
    batch, n_queries, heads = _checks.shape_of(q)[:3]
    n_keys = _checks.shape_of(k)[1]
    sizes = (batch, n_queries, heads, n_keys)
    return None if None in sizes else sizes


def query_blocks(q, k, max_rows=None, fused_band=False):
    """Slices of the queries to pool one after the other: one (all queries)
    unless the sizes are known and a whole `(batch, heads, queries, keys)`
    tensor would pass `block_elements()`, or the queries pass `max_rows`
    (the banded path; `fused_band`: its far keys on the backend's fused
    kernel, with no `(rows, keys)` tensor to bound)."""
    sizes = _static_sizes(q, k)
    if sizes is None:
        return [slice(None)]
    batch, n_queries, heads, n_keys = sizes
    rows = max(1, block_elements() // max(1, batch * heads * n_keys))
    if max_rows is not None:  # the banded path
        rows = max_rows if fused_band else min(rows, max_rows)
    if rows >= n_queries:
        return [slice(None)]
    return [slice(s, min(s + rows, n_queries)) for s in range(0, n_queries, rows)]


def recomputes(q, k):
    """Whether the blocks are recomputed in the backward pass: sizes known
    and above `config.BlockSettings.recompute_elements` (2**23 by default:
    the long inputs; shorter ones split in blocks keep them, as the
    recomputation would cost a forward for memory the machine has)."""
    sizes = _static_sizes(q, k)
    if sizes is None:
        return False
    batch, n_queries, heads, n_keys = sizes
    return batch * heads * n_queries * n_keys > config.get_block_settings().recompute_elements


def _recompute(q, k, blocks, fused_band):
    """`recomputes`; `fused_band`: the `Band` of blocks whose far keys run on
    the backend's fused kernel (else None). Those keep no `(rows, keys)`
    tensor for the backward pass, only their band's `(rows, band width)`
    and a few of that size, so they are recomputed only where those pass
    four times the bound (DeBERTa's 1000-key band at 8192 tokens does; a
    64-row table's at 16384 does not)."""
    if len(blocks) == 1 or not recomputes(q, k):
        return False
    if fused_band is None:
        return True
    batch, n_queries, heads = _checks.shape_of(q)[:3]
    kept = batch * heads * n_queries * fused_band.width
    return kept > 4 * config.get_block_settings().recompute_elements


def takes_band(n_keys):
    """Whether `n_keys` keys (None: not known) are enough for the banded
    path: `BlockSettings.band_min_keys`, else the backend's measured
    `band_min_keys()`. Below it the per-token path computes the same
    numbers faster: the band's fixed cost outweighs what it saves when it
    covers most of the keys."""
    chosen = config.get_block_settings().band_min_keys
    if chosen is None:
        chosen = _backend.get().band_min_keys()
    return n_keys is None or n_keys >= chosen


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
    offsets_read = offsets if buckets is None else -_buckets_in_numpy(offsets, *buckets)
    index = np.clip(n_positions // 2 + offsets_read, 0, n_positions - 1)
    left, right = index[0], index[-1]
    # Settled: clamped to the table's first or last row at both ends (the
    # index is monotonic in the offset). Two equal neighbours are not proof:
    # DeBERTa's buckets grow without bound, slowly, past `max_position`,
    # and a table of more than `2 * bucket_size` rows clamps them far out.
    if not {left, right} <= {0, n_positions - 1}:
        return None
    if left == right:  # one row read by every pair (a 1-row table): a band of r = 0
        below, above = -1, 1
    else:
        below = offsets[np.argmax(index != left) - 1]
        above = offsets[len(index) - np.argmax(index[::-1] != right)]
    width = block_rows + int(above - below) - 2
    if not 0 < width < n_keys:
        return None
    inside = (offsets > below) & (offsets < above)
    return Band(int(below), int(above), width, int(left), int(right),
                tuple(int(row) for row in index[inside]))


def _band(n_positions, n_keys, q, blocks, buckets):
    """The `Band` of the blocks (None where it would cover every key, or a
    size is not known)."""
    rows = blocks[0].stop if blocks[0].stop is not None else _checks.shape_of(q)[1]
    if rows is None:
        return None
    return band_for(n_positions, rows - (blocks[0].start or 0), n_keys, buckets)


def _edges(band, q, k, pos_q, pos_k):
    """`BandEdges`: each query's and key's score against the table's edge
    rows (`band.row_below`, `band.row_above`)."""
    edges = (band.row_below, band.row_above)
    c2p = p2c = table_q = None
    if pos_k is not None:
        table = ops.stack([pos_k[e, 0] for e in edges], 0)
        c2p = ops.einsum("bqhd,ehd->bhqe", q, table)
    if pos_q is not None:
        table_q = ops.stack([pos_q[e, 0] for e in edges], 0)
        p2c = ops.einsum("ehd,bkhd->bhek", table_q, k)
    return BandEdges(c2p=c2p, p2c=p2c, table_q=table_q)


def pooling_heads(base, first, total_heads):
    """`base_attn` `(batch, queries, keys, heads or 1)` for the pooling
    heads (from `first` of `total_heads`) only, as `(batch, heads, queries,
    keys)`. A heads axis of 1 broadcasts; one of unknown size (a trace) may
    be 1 at run time, so it is broadcast to every head before the additional
    ones are dropped, never sliced blind."""
    heads = _checks.shape_of(base)[-1]
    if first and heads != 1:
        if heads is None:
            base = base + ops.zeros((total_heads,), base.dtype)
        base = base[..., first:]
    return ops.transpose(base, (0, 3, 1, 2))


def draw_seed(seed_generator):
    """One int32 seed per call, from which each block's dropout mask is
    hashed (`_logits.keep_mask`)."""
    return keras.random.randint((), 0, 2**31 - 1, dtype="int32", seed=seed_generator)
