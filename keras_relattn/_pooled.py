"""The pooled path's inputs (`return_logits=False`): what `RelativeAttention`
hands to `_blockwise.pooled`, named, for the pooling heads only.

Functions of the layer (`self`), kept apart from its class so that the layer
file holds the layer: constructor, call, specs and config.
"""

from keras import ops

from keras_relattn import _blockwise, _checks, config
from keras_relattn._position_terms import position_terms


def pooled_only(self, q, k, values, position, base_attn, attend_mask, keys_only, training):
    """The pooled output alone (`return_logits=False`): the pooling heads
    only, in `(batch, heads, queries, keys)`, through `_blockwise.pooled`
    (blocks of queries for long inputs, recomputed in training; with
    `sequence_positions`, the banded path where it applies). `keys_only`:
    `attend_mask` masks keys only (`_logits.combine_masks`)."""
    first = self.n_additional_heads
    q, k = q[:, :, first:], k[:, :, first:]
    dropout_in_training = bool(training) and self._dropout_layer is not None
    banded = (position is not None and self.sequence_positions and position[2] is None
              and base_attn is None and not dropout_in_training)
    tensors = {"values": self.value_projection(self._input_dropout(values, training))}
    constants = {} if attend_mask is None else {"attend": attend_mask}
    extra = []  # terms broadcastable to (batch, heads, queries, keys)
    if base_attn is not None:
        base = _pooling_heads(self, ops.cast(base_attn, self.compute_dtype))
        extra.append(ops.transpose(base, (0, 3, 1, 2)))
    if "c2c" in self.mode:
        tensors["c2c_q"], tensors["c2c_k"] = q, k
    if self.use_head_bias:
        bias = ops.cast(self.head_bias[first:], self.compute_dtype)
        if "c2c" in self.mode and not banded:  # in the c2c matmul: one pass less
            tensors["c2c_q"] = ops.concatenate([q, ops.zeros_like(q[..., :1]) + bias[:, None]],
                                               -1)
            tensors["c2c_k"] = ops.concatenate([k, ops.ones_like(k[..., :1])], -1)
        else:
            extra.append(bias[:, None, None])
    tensors.update((f"extra{i}", term) for i, term in enumerate(extra))
    terms = band = n_positions = None
    n_keys = _checks.shape_of(k)[1]
    if position is not None:
        tables, offsets, no_position_mask = position
        pos_q, pos_k = (None if t is None else t[:, :, first:] for t in tables)
        n_positions = _checks.shape_of(pos_k if pos_k is not None else pos_q)[0]
    rows = _blockwise.band_rows(n_positions, n_keys) if banded else None
    blocks = _blockwise.query_blocks(q, k, self.n_heads, rows)
    recompute = len(blocks) > 1 and _blockwise.recomputes(q, k, self.n_heads)
    if banded:
        band = _band(self, n_positions, n_keys, q, k, pos_q, pos_k, blocks, tensors)
    if position is not None:  # the table scores: once for every block, or each band's own
        terms, found = position_terms(q, k, pos_q, pos_k, offsets, no_position_mask,
                                      output="bhqk", buckets=self.position_buckets,
                                      per_block=band is not None)
        scores = terms.score_names()
        tensors.update((name, found[name]) for name in scores)
        constants.update((name, t) for name, t in found.items() if name not in scores)
    rate, dropout = 0.0, None
    if dropout_in_training:
        if len(blocks) > 1:  # one draw per call, each block's mask a function of it
            rate, constants["seed"] = self.dropout_p, _blockwise.draw_seed(
                self._dropout_layer.seed_generator)
        else:
            dropout = lambda weights: self._dropout(weights, training)  # noqa: E731
    config._record(config.BlockPlan(_checks.shape_of(q)[1], len(blocks), recompute,
                                    None if band is None else band.width))
    step = _blockwise.BlockStep(c2c="c2c" in self.mode, positions=terms,
                                n_extra=len(extra), masked=attend_mask is not None,
                                keys_only_mask=keys_only,
                                dropout_rate=rate, band=band)
    pooled = _blockwise.pooled(step, tensors, constants, blocks, recompute, dropout)
    return self._merge_heads(pooled)


def _band(self, n_positions, n_keys, q, k, pos_q, pos_k, blocks, tensors):
    """The `_blockwise.Band` of token-index positions (None where it would
    cover every key, or a size is not known), and its edge scores added to
    `tensors`: each query's and key's score against the table's first and
    last rows."""
    rows = blocks[0].stop if blocks[0].stop is not None else _checks.shape_of(q)[1]
    if rows is None:
        return None
    band = _blockwise.band_for(n_positions, rows - (blocks[0].start or 0), n_keys,
                               self.position_buckets)
    if band is None:
        return None
    edges = (band.row_below, band.row_above)
    if pos_k is not None:  # (batch, heads, queries, 2)
        table = ops.stack([pos_k[e, 0] for e in edges], 0)
        tensors["edge_c2p"] = ops.einsum("bqhd,ehd->bhqe", q, table)
    if pos_q is not None:  # (batch, heads, 2, keys), and the rows (2, heads, d)
        table = ops.stack([pos_q[e, 0] for e in edges], 0)
        tensors["edge_p2c"] = ops.einsum("ehd,bkhd->bhek", table, k)
        tensors["edge_qp"] = table
    return band


def _pooling_heads(self, base):
    """`base_attn` `(batch, queries, keys, heads or 1)` for the pooling
    heads only. A heads axis of 1 broadcasts; one of unknown size (a
    trace) may be 1 at run time, so it is broadcast to every head before
    the additional ones are dropped, never sliced blind."""
    first = self.n_additional_heads
    heads = _checks.shape_of(base)[-1]
    if first == 0 or heads == 1:
        return base
    if heads is None:
        base = base + ops.zeros((self.total_heads,), base.dtype)
    return base[..., first:]
