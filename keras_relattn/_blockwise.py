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
from keras import ops

from keras_relattn import _backend, _checks, config
from keras_relattn._logits import MASKED_LOGIT, add_all, attend, seeded_dropout
from keras_relattn._offsets import first_row, take_rows
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


def query_blocks(q, k, n_heads):
    """Slices of the queries to pool one after the other: one (all queries)
    unless the sizes are known and a whole `(batch, heads, queries, keys)`
    tensor would pass `block_elements()`."""
    sizes = _static_sizes(q, k)
    if sizes is None:
        return [slice(None)]
    batch, n_queries, n_keys = sizes
    per_query = max(1, batch * n_heads * n_keys)
    rows = max(1, block_elements() // per_query)
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
    constants `attend` (bool, broadcastable to the logits) when `masked`,
    and `seed` (int32) when `dropout_rate` is drawn from it.
    """

    c2c: bool
    positions: Optional[PositionTerms]
    n_extra: int
    masked: bool
    dropout_rate: float


def run_block(step, rows, tensors, constants, dropout=None, in_place=False):
    """One block of queries (`rows`): its logits, then the attention step
    (`_logits.attend`): `(batch, rows, heads, dv)`."""
    logits = None
    if step.positions is not None:
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
