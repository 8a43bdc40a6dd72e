"""The position terms: score against the table once, then gather.

c2p(i, j) = sum_x q_i[x] . pos_k[idx(i, j, x), x] and p2c(i, j) = sum_x
pos_q[idx(i, j, x), x] . k_j[x]. Scoring every query (key) against the whole
table costs `n_positions` dot products per query (key) instead of one per
(query, key) pair; the pair terms are then *gathered* from those scores, one
flat score number per (query, key, coordinate), shared by all heads.

Two layouts of the scores:

- "head_major", `(heads, rows * n_positions)`: a plain per-head batched
  matmul, and a gather that reads one score per head. The default on JAX,
  TensorFlow and torch.
- "rows", `(rows * n_positions, heads)`: each gathered item is one contiguous
  row of `heads` scores (the generic path, plain `keras.ops`). With few
  heads, those scores come from one block-diagonal matmul whose output
  already has that layout.

Measured (the benchmark's W1-W3 workloads, README "Performance"): on XLA CPU
head-major was 15-20% faster overall than rows (the block-diagonal matmul
does `heads` times the needed work, and a per-head matmul transposed into
rows makes XLA fuse the transpose into the gather as strided reads). On torch
eager, head-major gathered straight into `(batch, heads, queries, keys)` (see
`default_output`) beat rows gathered with `F.embedding` (torch's fastest row
gather) and transposed: W1 4.4 vs 5.5 ms.
"""

import keras
from keras import ops

# Up to this many heads, "rows" scores come from one plain matmul with a
# block-diagonal weight (see `_row_scores`); beyond it, the H-fold extra work
# of that matmul outweighs what it saves.
BLOCK_DIAGONAL_MAX_HEADS = 4

LAYOUTS = ("head_major", "rows")
OUTPUTS = ("bqkh", "bhqk")

# The flat score numbers `(batch * rows + row) * n_positions + offset` are
# int32: past this many scores a number would wrap, and XLA's in-bounds
# gathers would silently read another score. Larger (or not statically
# known) sizes take the per-row gather, whose numbers stay below
# `n_positions`.
FLAT_INDEX_LIMIT = 2**31


def index_dtype():
    """The integer dtype of the table index: int64 on torch (`torch.gather`
    takes no other), int32 elsewhere (JAX without x64 has no int64)."""
    return "int64" if keras.backend.backend() == "torch" else "int32"


def pooling_block_elements():
    """Largest `(batch, heads, queries, keys)` block the pooled-only path
    holds at a time (see `RelativeAttention`'s `return_logits=False`).

    torch eager: 2**20 (4 MiB of float32). Fresh buffers larger than that
    cost page faults on every call on CPU (glibc hands them back to the
    system); measured W2 pooled, torch: 24 ms in one block, 17 ms in blocks
    of 2**20. XLA reuses its buffers: 2**23 (32 MiB), a bound on memory.
    """
    return 2**20 if keras.backend.backend() == "torch" else 2**23


def flat_index_fits(*sizes):
    """Whether `prod(sizes)` flat numbers surely fit int32.

    False unless that is proved: unknown sizes (None, a TensorFlow graph
    tensor, a jax symbolic dimension) cannot be, nor sizes under
    `torch.jit.trace` (ONNX export), which would freeze the answer. torch's
    symbolic sizes compare (`torch.compile` then guards on the answer).
    """
    if keras.backend.backend() == "torch":
        import torch

        if torch.jit.is_tracing():  # a traced answer would be frozen
            return False
    total = 1
    for size in sizes:
        if size is None:
            return False
        total = total * size
    try:
        return bool(total < FLAT_INDEX_LIMIT)
    except Exception:  # not decidable while tracing
        return False


def default_layout():
    """The score layout measured fastest on this backend."""
    backend = keras.backend.backend()
    return "head_major" if backend in ("jax", "tensorflow", "torch") else "rows"


def default_output():
    """Where the position logits go: `"bqkh"` or `"bhqk"`.

    On XLA the gather writes `(batch, queries, keys, heads)`, the returned
    logits' layout, and the c2c term is added transposed (XLA fuses that
    into the gather). Eagerly (torch), each op is one pass over memory: the
    gathered terms are added straight into the `(batch, heads, queries,
    keys)` c2c logits the softmax reads (W1: 4.4 ms, against 5.5 ms for
    gathering `(b, q, k, h)` and transposing for the softmax).
    """
    backend = keras.backend.backend()
    return "bqkh" if backend in ("jax", "tensorflow") else "bhqk"


def take_columns(table, columns, heads_last=True):
    """`table[:, columns]` for a 2-D `(heads, n)` table and int32 column
    numbers known in range.

    Returns `(*columns.shape, heads)` with `heads_last`, else
    `(columns.shape[0], heads, *columns.shape[1:])` (for `(batch, queries,
    keys)` columns: `(batch, heads, queries, keys)`).
    """
    backend = keras.backend.backend()
    if backend == "jax":
        from jax import lax

        # One gather whose output already has the heads where they go: XLA
        # then writes the logits once, in order.
        dims = lax.GatherDimensionNumbers(
            offset_dims=(columns.ndim if heads_last else 1,),
            collapsed_slice_dims=(1,),
            start_index_map=(1,),
        )
        return lax.gather(
            table, columns[..., None], dims, (table.shape[0], 1),
            mode="promise_in_bounds",
        )
    if backend == "tensorflow":
        import tensorflow as tf

        taken = tf.gather(table, columns, axis=1)
    elif backend == "torch":
        import torch

        # index_select takes int32 indices as they are (no int64 copy).
        taken = torch.index_select(table, 1, columns.reshape(-1))
        taken = taken.reshape((table.shape[0],) + tuple(columns.shape))
    else:
        taken = ops.take(table, columns, axis=1)
    if not heads_last:  # a view on torch, read in place by the add after it
        return ops.transpose(taken, (1, 0) + tuple(range(2, columns.ndim + 1)))
    return ops.transpose(taken, tuple(range(1, columns.ndim + 1)) + (0,))


def _row_scores(x, table, block_diagonal):
    """Scores of every row of `x` against every table position, per head.

    Args:
        x: `(rows, heads, chunk)`.
        table: `(n_positions, heads, chunk)`.

    Returns:
        `(rows * n_positions, heads)`: row `r * n_positions + p` holds the
        `heads` scores of `x[r]` against position `p`, contiguous.
    """
    n_rows, heads, chunk = ops.shape(x)[0], x.shape[1], x.shape[2]
    if block_diagonal:
        # One (rows, heads*chunk) @ (heads*chunk, positions*heads) matmul whose
        # output is already in the gather's row layout.
        eye = ops.eye(heads, dtype=table.dtype)
        weight = ops.reshape(
            ops.einsum("phd,hg->hdpg", table, eye), (heads * chunk, -1)
        )
        scores = ops.matmul(ops.reshape(x, (n_rows, heads * chunk)), weight)
    else:
        scores = ops.einsum("rhd,phd->rph", x, table)
    return ops.reshape(scores, (-1, heads))


def _head_major_scores(x, table):
    """As `_row_scores`, laid out `(heads, rows * n_positions)`."""
    scores = ops.einsum("rhd,phd->hrp", x, table)
    return ops.reshape(scores, (x.shape[1], -1))


def position_logits(
    q, k, pos_q, pos_k, index, layout=None, output=None, block_diagonal=None
):
    """c2p + p2c as `(batch, queries, keys, heads)` or `(batch, heads,
    queries, keys)`.

    Args:
        q: `(batch, queries, heads, head_size)`, scaled.
        k: `(batch, keys, heads, head_size)`.
        pos_q, pos_k: `(n_positions, coordinates, heads, chunk)` or None
            (term not computed); `pos_q` scaled.
        index: `(batch or 1, queries, keys, coordinates)` int32 or int64 (see `index_dtype`), in
            `[0, n_positions)`.
        layout: `"head_major"` or `"rows"` (see the module docstring); by
            default, the one measured fastest on the backend.
        output: `"bqkh"` or `"bhqk"`, the layout of the result; by default
            `default_output()`.
        block_diagonal: for `"rows"`, force or forbid the block-diagonal
            matmul (tests); by default chosen from the number of heads.
    """
    table = pos_k if pos_k is not None else pos_q
    n_positions, coords, heads, chunk = (
        ops.shape(table)[0], table.shape[1], table.shape[2], table.shape[3]
    )
    layout = default_layout() if layout is None else layout
    output = default_output() if output is None else output
    if layout not in LAYOUTS:
        raise ValueError(f"`layout` must be one of {LAYOUTS}, got {layout!r}")
    if output not in OUTPUTS:
        raise ValueError(f"`output` must be one of {OUTPUTS}, got {output!r}")
    heads_last = output == "bqkh"
    if block_diagonal is None:
        block_diagonal = heads <= BLOCK_DIAGONAL_MAX_HEADS
    batch, n_queries = ops.shape(q)[0], ops.shape(q)[1]
    n_keys = ops.shape(k)[1]
    # Sizes of 1 in the index broadcast over queries and keys (as in edspdf).
    index = ops.broadcast_to(index, (ops.shape(index)[0], n_queries, n_keys, coords))
    if keras.backend.backend() == "torch" and not heads_last and layout == "head_major":
        return _torch_row_gathers(q, k, pos_q, pos_k, index)
    index_dtype = "int32"
    if not (
        flat_index_fits(batch, n_queries, n_positions)
        and flat_index_fits(batch, n_keys, n_positions)
    ):
        if keras.backend.backend() != "torch":
            return _per_row_position_logits(q, k, pos_q, pos_k, index, heads_last)
        index_dtype = "int64"  # torch gathers with int64 numbers as fast
    q = ops.reshape(q, (batch * n_queries, heads, coords, chunk))
    k = ops.reshape(k, (batch * n_keys, heads, coords, chunk))
    # Base score number of each (batch, query) and (batch, key), broadcast to
    # the pairs (the index may have a batch of 1).
    b = ops.arange(batch, dtype=index_dtype)[:, None, None]
    pairs = (batch, n_queries, n_keys)
    c2p_base = (b * n_queries + ops.arange(n_queries, dtype=index_dtype)[None, :, None]) * n_positions
    p2c_base = (b * n_keys + ops.arange(n_keys, dtype=index_dtype)[None, None, :]) * n_positions
    c2p_base = ops.broadcast_to(c2p_base, pairs)
    p2c_base = ops.broadcast_to(p2c_base, pairs)
    index = ops.cast(index, index_dtype)

    def term(x, pos, base, idx):
        if layout == "head_major":
            return take_columns(_head_major_scores(x, pos), base + idx, heads_last)
        taken = ops.take(_row_scores(x, pos, block_diagonal), base + idx, axis=0)
        return taken if heads_last else ops.transpose(taken, (0, 3, 1, 2))

    total = None
    for x in range(coords):
        idx = index[..., x]
        for rows, pos, base in ((q, pos_k, c2p_base), (k, pos_q, p2c_base)):
            if pos is not None:
                t = term(rows[:, :, x], pos[:, x], base, idx)
                total = t if total is None else total + t
    return total


def _torch_row_gathers(q, k, pos_q, pos_k, index, reuse=False):
    """torch eager, `(batch, heads, queries, keys)`: per-row `torch.gather`.

    c2p scores `(b, h, queries, P)` are gathered along P with the index as
    `(b, h, queries, keys)`; p2c scores laid out `(b, h, P, keys)` are
    gathered along P the same way, so both come out contiguous in the
    softmax's layout and add without strided reads. The gathered numbers are
    offsets in `[0, P)`: nothing can wrap. Measured on W2 (pooled only):
    ~2.5x faster than `index_select` on flat numbers plus strided adds.
    """
    import torch

    batch, n_queries, heads, _ = q.shape
    n_keys = k.shape[1]
    coords = (pos_k if pos_k is not None else pos_q).shape[1]
    chunk = q.shape[-1] // coords
    index = index.to(torch.int64)  # a no-op for the layer's own index
    total = spare = None
    for x in range(coords):
        idx = index[..., x][:, None].expand(batch, heads, n_queries, n_keys)
        part = slice(x * chunk, (x + 1) * chunk)
        for scores, axis in (
            (None if pos_k is None
             else torch.einsum("bqhd,phd->bhqp", q[..., part], pos_k[:, x]), 3),
            (None if pos_q is None
             else torch.einsum("bkhd,phd->bhpk", k[..., part], pos_q[:, x]), 2),
        ):
            if scores is None:
                continue
            if total is None:
                total = torch.gather(scores, axis, idx)
            elif reuse:  # no autograd: one spare buffer for every later term
                spare = torch.gather(scores, axis, idx, out=spare)
                total.add_(spare)
            else:
                total = total + torch.gather(scores, axis, idx)
    return total


def inference_pooling(c2c_q, c2c_k, q, k, pos_q, pos_k, index, keep,
                      extra, attend, values, masked_logit):
    """One block of the pooled-only path in place (torch inference), or None.

    The same arithmetic as the layer's generic block (`keras.ops`), with one
    `(batch, heads, queries, keys)` buffer updated in place: on CPU every
    fresh buffer of that size costs page faults as well as a pass (measured
    W2 pooled: 28 ms with a fresh tensor per step, 15 ms when the allocator
    keeps its pages), and the generic autograd-friendly form needs one per
    step. Returns None where it does not apply (the generic path then runs):
    another backend, gradients being recorded, or not float32.

    Args:
        c2c_q, c2c_k: `(batch, queries|keys, heads, d)` for the c2c matmul
            (head bias folded in), or None without c2c.
        q, k, pos_q, pos_k, index: as in `position_logits` (index None:
            no position terms).
        keep: `(batch or 1, 1, queries, keys)` 0/1 factor on the position
            terms, or None.
        extra: terms added to the logits, each broadcastable to `(batch,
            heads, queries, keys)`.
        attend: bool, broadcastable to the logits, or None.
        values: `(batch, keys, heads, dv)`.
    """
    if keras.backend.backend() != "torch":
        return None
    import torch

    tensors = [t for t in (c2c_q, c2c_k, q, k, pos_q, pos_k, values) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    if any(t.dtype != torch.float32 for t in tensors):
        return None
    logits = None
    if index is not None:
        logits = _torch_row_gathers(q, k, pos_q, pos_k, index, reuse=True)
        if keep is not None:
            logits.mul_(keep)
    if c2c_q is not None:
        c2c_q, c2c_k = c2c_q.transpose(1, 2), c2c_k.permute(0, 2, 3, 1)
        if logits is None:
            logits = torch.matmul(c2c_q, c2c_k)
        else:  # added by the matmul itself, into the same buffer
            batch, heads, n_queries, n_keys = logits.shape
            logits.view(-1, n_queries, n_keys).baddbmm_(
                c2c_q.reshape(batch * heads, n_queries, -1),
                c2c_k.reshape(batch * heads, -1, n_keys),
            )
    for term in extra:
        logits.add_(term)
    if attend is not None:
        logits.masked_fill_(torch.logical_not(attend), masked_logit)
    logits.sub_(logits.amax(-1, keepdim=True)).exp_()
    logits.div_(logits.sum(-1, keepdim=True))
    return torch.matmul(logits, values.transpose(1, 2)).transpose(1, 2)


def _per_row_position_logits(q, k, pos_q, pos_k, index, heads_last):
    """As `position_logits`, gathering along each row of scores.

    Every gathered number is an offset in `[0, n_positions)`, so nothing can
    wrap whatever the sizes (the flat path's limit, `FLAT_INDEX_LIMIT`).
    Plain `keras.ops`; slower than the flat gather, used only where that one
    cannot be proved safe.
    """
    batch, n_queries, n_keys = ops.shape(q)[0], ops.shape(q)[1], ops.shape(k)[1]
    index = ops.broadcast_to(index, (batch, n_queries, n_keys, ops.shape(index)[3]))
    coords = (pos_k if pos_k is not None else pos_q).shape[1]
    chunk = q.shape[-1] // coords
    total = None
    for x in range(coords):
        idx = index[..., x]
        if pos_k is not None:  # rows are queries: (b, q, h, P) -> (b, q, h, k)
            scores = ops.einsum("bqhd,phd->bqhp", q[..., x * chunk:(x + 1) * chunk], pos_k[:, x])
            taken = ops.take_along_axis(scores, idx[:, :, None, :], axis=3)
            t = ops.transpose(taken, (0, 1, 3, 2) if heads_last else (0, 2, 1, 3))
            total = t if total is None else total + t
        if pos_q is not None:  # rows are keys: (b, k, h, P) -> (b, k, h, q)
            scores = ops.einsum("bkhd,phd->bkhp", k[..., x * chunk:(x + 1) * chunk], pos_q[:, x])
            by_key = ops.transpose(idx, (0, 2, 1))
            taken = ops.take_along_axis(scores, by_key[:, :, None, :], axis=3)
            t = ops.transpose(taken, (0, 3, 1, 2) if heads_last else (0, 2, 3, 1))
            total = t if total is None else total + t
    return total
