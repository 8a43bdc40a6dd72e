"""The position terms: score against the table once, then gather.

c2p(i, j) = sum_x q_i[x] . pos_k[idx(i, j, x), x] and p2c(i, j) = sum_x
pos_q[idx(i, j, x), x] . k_j[x]. Scoring every query (key) against the whole
table costs `n_positions` dot products per query (key) instead of one per
(query, key) pair; the pair terms are then *gathered* from those scores.
Where each block of queries reads a band of keys only (the banded path),
each block scores its own queries and band instead (`scored_per_block`):
no scores of the whole input are kept, nor their gradients.

`PositionTerms` is the static description of one call's terms (hashable:
what a compiled block is cached by); its tensors live apart, made by
`position_terms`: `PositionTensors` (what the gradient flows to: the
scores, or what each block scores) and `PositionConstants` (the offsets'
tensors, the no-position factor). Three gathers, chosen once from the backend and the
sizes:

- `"along_rows"`: along each row of `(batch, heads, rows, P)` scores, straight into
  the softmax's `(batch, heads, queries, keys)` layout (torch);
- `"flat"`: one gather of flat score numbers `(batch * rows + row) *
  n_positions + offset`, when they surely fit the index dtype (XLA's);
- `"per_row"`: `take_along_axis` along each row of `(batch, rows, heads, P)`
  scores, where flat numbers could pass 2**31 or sizes are unknown (a
  trace): nothing can wrap.
"""

import dataclasses
from typing import Any

from keras import ops

from keras_relattn import _backend, _checks, config
from keras_relattn._offsets import FormedOffsets, PairOffsets, PairTensors, table_index
from keras_relattn._records import Record
from keras_relattn._rows import first_row, take_rows
from keras_relattn.positions import log_bucket_positions

# Up to this many heads, "heads_minor" scores come from one plain matmul with
# a block-diagonal weight (see `_row_scores`); beyond it, the H-fold extra
# work of that matmul outweighs what it saves.
BLOCK_DIAGONAL_MAX_HEADS = 4

LAYOUTS = ("head_major", "heads_minor")
OUTPUTS = ("bqkh", "bhqk")


@dataclasses.dataclass(frozen=True)
class PositionTensors(Record):
    """The tensors of the position terms that the gradient flows to: the
    table scores made once, or (`PositionTerms.scored_per_block`) what each
    block scores its own rows from."""

    # Per coordinate, `(c2p, p2c)` scores laid out for the gather (None: the
    # term is off), made once for the whole input.
    scores: tuple = ()
    # `scored_per_block`: the scaled queries `(batch, queries, heads, d)`
    # (c2p) and the keys `(batch, keys, heads, d)` (p2c), None where that
    # term is off, and per coordinate the table parts `(P, heads, chunk)`:
    # `pos_k[:, x]` (c2p) and `pos_q[:, x]` (p2c).
    queries: Any = None
    keys: Any = None
    key_table: tuple = ()
    query_table: tuple = ()


@dataclasses.dataclass(frozen=True)
class PositionConstants(Record):
    """The read-only tensors of the position terms."""

    offsets: Any  # the offsets' form's tensors (`_offsets.PairTensors`, ...)
    # A 0/1 factor `(batch or 1, queries or 1, keys or 1)` (0: no terms), or None.
    position_factor: Any = None


def flat_index_fits(*sizes):
    """Whether `prod(sizes)` flat numbers surely stay below
    `config.BlockSettings.flat_index_limit` (2**31: int32), decided from
    sizes known as Python ints only. An unknown size (None, a TensorFlow
    graph tensor, a JAX or torch symbolic dimension) is not proved to fit,
    nor is any size a tracer would freeze (torch's `jit.trace`)."""
    if _backend.get().sizes_are_frozen():
        return False
    total = 1
    for size in sizes:  # a loop, not a generator: dynamo traces it without a break
        if not isinstance(size, int):
            return False
        total *= size
    return total < config.get_block_settings().flat_index_limit


@dataclasses.dataclass(frozen=True)
class PositionTerms:
    """What c2p + p2c are for one call, apart from their tensors."""

    offsets: Any  # the offsets' form (`_offsets.PairOffsets`, ...)
    n_positions: Any  # rows of the table (an int, or a traced size)
    coords: int
    heads: int
    terms: tuple  # ("c2p", "p2c") or a part: the terms computed
    gather: str  # "along_rows", "flat" or "per_row"
    layout: str  # of the flat gather's scores: "head_major" or "heads_minor"
    output: str  # "bqkh" or "bhqk"
    index_dtype: str
    batch: Any
    n_queries: Any
    n_keys: Any
    has_position_factor: bool  # `no_position_mask`'s 0/1 factor in the tensors
    buckets: Any = None  # DeBERTa's `(bucket_size, max_position)`: row P // 2 + bucket(-r)
    # Scores made by each block for its own queries and keys (the banded
    # path: a block reads a band of keys only), from the queries, keys and
    # table parts among the tensors, rather than once for the whole input:
    # no `(tokens, n_positions)` scores kept, nor their gradients.
    scored_per_block: bool = False
    block_diagonal: bool = False  # of the "heads_minor" scores (`_row_scores`)

    @property
    def heads_last(self):
        return self.output == "bqkh"

    def block_scores(self, tensors, rows, keys):
        """The table scores of the queries `rows` and of the keys `keys`
        alone (`scored_per_block`), laid out for the gather: per coordinate,
        `(c2p, p2c)`."""
        parts = {}
        for term, x, tables in (("c2p", tensors.queries, tensors.key_table),
                                ("p2c", tensors.keys, tensors.query_table)):
            if x is None:
                continue
            scored = take_rows(x, 1, rows if term == "c2p" else keys)
            chunk = scored.shape[-1] // self.coords
            parts[term] = [_scores(self, scored[..., c * chunk:(c + 1) * chunk], tables[c], term,
                                   self.block_diagonal) for c in range(self.coords)]
        return tuple((parts["c2p"][c] if "c2p" in parts else None,
                      parts["p2c"][c] if "p2c" in parts else None)
                     for c in range(self.coords))

    def logits(self, tensors, constants, rows=slice(None), in_place=False, keys=slice(None)):
        """c2p + p2c for the queries `rows` and the keys `keys` (a span of
        them, or all), in the `output` layout, from `PositionTensors` and
        `PositionConstants`.

        `in_place` (`_backend.works_in_place`): every term after the first
        gathered into one spare buffer and added in place; the pairs without
        position terms zeroed in place.
        """
        offsets = self.offsets.rows(constants.offsets, rows, keys)
        scored = (self.block_scores(tensors, rows, keys) if self.scored_per_block
                  else tensors.scores)
        if self.buckets is not None:  # DeBERTa's: the bucket of query - key
            offsets = -log_bucket_positions(offsets, *self.buckets)
        index = table_index(offsets, self.n_positions)
        backend = _backend.get()
        total = spare = None
        for x in range(self.coords):
            idx = index[..., x]
            for term in self.terms:
                scores = scored[x][0 if term == "c2p" else 1]
                if total is None:
                    total = self._gather(scores, idx, term, rows, keys)
                elif in_place and self.gather == "along_rows":
                    spare = self._gather(scores, idx, term, rows, keys, out=spare)
                    total = backend.add_in_place(total, spare)
                else:
                    total = total + self._gather(scores, idx, term, rows, keys)
        factor = (take_rows(take_rows(constants.position_factor, 1, rows), 2, keys)
                  if self.has_position_factor else None)
        pairs = self.offsets.position_factor(constants.offsets, rows)
        if pairs is not None:
            factor = pairs if factor is None else factor * pairs
        if factor is not None:
            factor = ops.expand_dims(factor, -1 if self.heads_last else 1)
            total = backend.multiply_in_place(total, factor) if in_place else total * factor
        return total

    def _gather(self, scores, idx, term, rows, keys, out=None):
        """The pair terms of `scores` (every query's and key's, or those of
        `rows` and `keys` alone: `scored_per_block`) at the table rows
        `idx` `(batch or 1, rows, keys)`."""
        local = self.scored_per_block
        if local:  # the scores are the block's: nothing to slice, rows count from 0
            rows = keys = slice(None)
        if self.gather == "along_rows":  # (b, h, q, P) or (b, h, P, k) -> (b, h, q, k)
            if term == "c2p":
                scores = take_rows(scores, 2, rows)
            else:
                scores = take_rows(scores, 3, keys)
            return _backend.get().take_along_rows(scores, idx, 3 if term == "c2p" else 2, out)
        if self.gather == "per_row":
            if term == "c2p":  # rows are queries: (b, q, h, P) -> (b, q, h, k)
                scores = take_rows(scores, 1, rows)
                taken = ops.take_along_axis(scores, ops.expand_dims(idx, 2), axis=3)
                return ops.transpose(taken, (0, 1, 3, 2) if self.heads_last else (0, 2, 1, 3))
            # rows are keys: (b, k, h, P) -> (b, k, h, q)
            scores = take_rows(scores, 1, keys)
            by_key = ops.transpose(idx, (0, 2, 1))
            taken = ops.take_along_axis(scores, ops.expand_dims(by_key, 2), axis=3)
            return ops.transpose(taken, (0, 3, 1, 2) if self.heads_last else (0, 2, 3, 1))
        # Flat score numbers: the base number of each (batch, query) or
        # (batch, key), broadcast to the pairs (the index may have a batch
        # of 1).
        dtype = self.index_dtype
        n_rows, n_cols = ops.shape(idx)[1], ops.shape(idx)[2]
        b = ops.arange(self.batch, dtype=dtype)[:, None, None]
        if term == "c2p":
            row = ops.arange(n_rows, dtype=dtype)[None, :, None] + first_row(rows)
            base = (b * (n_rows if local else self.n_queries) + row) * self.n_positions
        else:
            col = ops.arange(n_cols, dtype=dtype)[None, None, :] + first_row(keys)
            base = (b * (n_cols if local else self.n_keys) + col) * self.n_positions
        flat = ops.broadcast_to(base, (self.batch, n_rows, n_cols)) + ops.cast(idx, dtype)
        if self.layout == "head_major":
            return _backend.get().take_columns(scores, flat, self.heads_last)
        taken = ops.take(scores, flat, axis=0)
        return taken if self.heads_last else ops.transpose(taken, (0, 3, 1, 2))


def position_terms(q, k, pos_q, pos_k, relative_positions, no_position_mask=None,
                   output=None, buckets=None, per_block=False):
    """The c2p + p2c terms of one call: `(PositionTerms, PositionTensors,
    PositionConstants)`, the table scores made once, to be gathered per
    block of queries (or, `per_block`, what each block makes its own from).

    Args:
        q: `(batch, queries, heads, head_size)`, scaled.
        k: `(batch, keys, heads, head_size)`.
        pos_q, pos_k: `(n_positions, coordinates, heads, chunk)` or None
            (term not computed); `pos_q` scaled.
        relative_positions: `(batch or 1, queries or 1, keys or 1,
            coordinates)` integer offsets, any dtype, or `FormedOffsets`;
            turned into table rows block by block.
        no_position_mask: optional bool or 0/1 `(batch or 1, queries or 1,
            keys or 1)`: True zeroes both terms of that pair.
        output: the logits' layout, `"bqkh"` or `"bhqk"` (the pooled path's);
            by default the backend's `LOGITS_LAYOUT` (the per-token path's).
        buckets: DeBERTa's `(bucket_size, max_position)`, or None.
        per_block: each block scores its own queries and keys (the banded
            path, whose blocks read a band of keys each): the tensors hold
            `q`, `k` and the table parts instead of scores.
    """
    backend = _backend.get()
    table = pos_k if pos_k is not None else pos_q
    coords, heads = table.shape[1], table.shape[2]
    layout = backend.SCORE_LAYOUT
    output = backend.LOGITS_LAYOUT if output is None else output
    if layout not in LAYOUTS:  # a backend's constant
        raise ValueError(f"the backend's SCORE_LAYOUT must be one of {LAYOUTS}, got {layout!r}")
    if output not in OUTPUTS:
        raise ValueError(f"`output` must be one of {OUTPUTS}, got {output!r}")
    constants = _constants(q, k, relative_positions, no_position_mask, coords)
    terms = PositionTerms(
        offsets=(relative_positions.form if isinstance(relative_positions, FormedOffsets)
                 else PairOffsets()),
        n_positions=ops.shape(table)[0], coords=coords, heads=heads,
        terms=tuple(t for t, table in (("c2p", pos_k), ("p2c", pos_q)) if table is not None),
        layout=layout, output=output,
        batch=ops.shape(q)[0], n_queries=ops.shape(q)[1], n_keys=ops.shape(k)[1],
        has_position_factor=constants.position_factor is not None, buckets=buckets,
        scored_per_block=per_block,
        block_diagonal=heads <= BLOCK_DIAGONAL_MAX_HEADS,
        **_gather_for(backend, layout, output, ops.shape(q)[0], ops.shape(q)[1],
                      ops.shape(k)[1], ops.shape(table)[0]),
    )
    if per_block:
        return terms, PositionTensors(
            queries=None if pos_k is None else q, keys=None if pos_q is None else k,
            key_table=() if pos_k is None else tuple(pos_k[:, x] for x in range(coords)),
            query_table=() if pos_q is None else tuple(pos_q[:, x] for x in range(coords)),
        ), constants
    chunk = q.shape[-1] // coords
    scores = []
    for x in range(coords):
        part = slice(x * chunk, (x + 1) * chunk)
        scores.append((
            None if pos_k is None else _scores(terms, q[..., part], pos_k[:, x], "c2p",
                                               terms.block_diagonal),
            None if pos_q is None else _scores(terms, k[..., part], pos_q[:, x], "p2c",
                                               terms.block_diagonal),
        ))
    return terms, PositionTensors(scores=tuple(scores)), constants


def _gather_for(backend, layout, output, batch, n_queries, n_keys, n_positions):
    """The gather (`PositionTerms.gather`) and its index dtype."""
    fits = flat_index_fits(batch, n_queries, n_positions) and (
        flat_index_fits(batch, n_keys, n_positions)
    )
    if backend.GATHERS_ALONG_ROWS and output == "bhqk" and layout == "head_major":
        return dict(gather="along_rows", index_dtype=backend.INDEX_DTYPE)
    if fits or backend.INDEX_DTYPE == "int64":
        return dict(gather="flat", index_dtype="int32" if fits else "int64")
    return dict(gather="per_row", index_dtype=backend.INDEX_DTYPE)


def _constants(q, k, relative_positions, no_position_mask, coords):
    """The `PositionConstants`: the offsets' tensors (offsets given whole,
    with sizes of 1 broadcast over queries and keys, as in edspdf) and the
    no-position factor."""
    if isinstance(relative_positions, FormedOffsets):
        offsets = relative_positions.tensors
    else:
        offsets = PairTensors(ops.broadcast_to(
            relative_positions,
            (ops.shape(relative_positions)[0], ops.shape(q)[1], ops.shape(k)[1], coords),
        ))
    factor = None
    if no_position_mask is not None:  # a 0/1 factor, (batch or 1, queries or 1, keys or 1)
        factor = ops.cast(ops.logical_not(_checks.as_bool(no_position_mask)), q.dtype)
    return PositionConstants(offsets=offsets, position_factor=factor)


def _scores(terms, x, table, term, block_diagonal):
    """`x` `(batch, length, heads, chunk)` against `table` `(P, heads,
    chunk)`, laid out for the gather."""
    if terms.gather == "along_rows":
        equation = "bqhd,phd->bhqp" if term == "c2p" else "bkhd,phd->bhpk"
        return ops.einsum(equation, x, table)
    if terms.gather == "per_row":  # (batch, length, heads, P)
        return ops.einsum("blhd,phd->blhp", x, table)
    rows = ops.reshape(x, (-1,) + tuple(x.shape[2:]))
    if terms.layout == "head_major":
        scores = ops.einsum("rhd,phd->hrp", rows, table)
        return ops.reshape(scores, (x.shape[2], -1))
    return _row_scores(rows, table, block_diagonal)


def _row_scores(x, table, block_diagonal):
    """Scores of every row of `x` `(rows, heads, chunk)` against every table
    position `(n_positions, heads, chunk)`: `(rows * n_positions, heads)`,
    row `r * n_positions + p` holding the `heads` scores of `x[r]` against
    position `p`, contiguous."""
    n_rows, heads, chunk = ops.shape(x)[0], x.shape[1], x.shape[2]
    if block_diagonal:
        # One (rows, heads*chunk) @ (heads*chunk, positions*heads) matmul whose
        # output is already in the gather's row layout.
        eye = ops.eye(heads, dtype=table.dtype)
        weight = ops.reshape(ops.einsum("phd,hg->hdpg", table, eye), (heads * chunk, -1))
        scores = ops.matmul(ops.reshape(x, (n_rows, heads * chunk)), weight)
    else:
        scores = ops.einsum("rhd,phd->rph", x, table)
    return ops.reshape(scores, (-1, heads))
