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

import functools
import math

import keras
import numpy as np
from keras import ops

from keras_relattn import _checks, config

try:  # the backend's own softmax, without `keras.ops.softmax`'s shape check
    from keras.src.backend import nn as _backend_nn

    _backend_softmax = _backend_nn.softmax
except (ImportError, AttributeError):  # pragma: no cover - other Keras layouts
    _backend_softmax = ops.softmax

# Up to this many heads, "rows" scores come from one plain matmul with a
# block-diagonal weight (see `_row_scores`); beyond it, the H-fold extra work
# of that matmul outweighs what it saves.
BLOCK_DIAGONAL_MAX_HEADS = 4

# Any offset beyond +-2**30 lies beyond any table: clamping there keeps the
# result and fits int32.
OFFSET_BOUND = 2**30

LAYOUTS = ("head_major", "rows")
OUTPUTS = ("bqkh", "bhqk")

def softmax(x, axis=-1):
    """The backend's fused softmax (torch's is 2x faster than max/exp/sum/
    divide as separate ops). Not `keras.ops.softmax`: it warns when the axis
    has length 1 (one key), a legitimate case here, and a Python test of the
    length would be frozen by tracers (ONNX export, symbolic shapes)."""
    return _backend_softmax(x, axis=axis)


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
    tensor (measured on JAX CPU: W2 27 ms all-bqkh, 12 ms this way). The
    position terms come in whichever layout `default_output()` makes best.
    """

    def __init__(self):
        self._terms = {"bqkh": [], "bhqk": []}
        self._sums = {}

    def add(self, term, layout):
        if layout not in OUTPUTS:
            raise ValueError(f"`layout` must be one of {OUTPUTS}, got {layout!r}")
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
        raise ValueError("`add_head_bias` needs a term to add the bias to.")

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


def exact_gelu(x):
    """The exact GELU, `x / 2 * (1 + erf(x / sqrt(2)))`, in a form every
    export of the backend can carry.

    Keras' TensorFlow GELU uses `Erfc`, an op ONNX lacks (tf2onnx fails):
    the `erf` form (torch's own formula) has `Erf`. On JAX, `lax.erf`
    lowers to a StableHLO composite that TensorFlow's SavedModel loader
    (2.21) cannot read, while Keras' GELU (`erfc`) exports: JAX keeps it.
    """
    if keras.backend.backend() == "jax":
        return keras.activations.gelu(x, approximate=False)
    return 0.5 * x * (1.0 + ops.erf(x * (1.0 / math.sqrt(2.0))))


def torch_layer_norm(x, gamma, beta, epsilon, size):
    """Keras' torch layer normalization over the last axis, of static `size`,
    or None on another backend (Keras' own then runs).

    Keras reads that size from the input's shape, which `torch.jit.trace`
    records as a traced value that the ONNX exporter cannot make constant;
    here it comes from the layer's configuration. The same kernel
    (`F.layer_norm`) in at least float32, as Keras computes it.
    """
    if keras.backend.backend() != "torch":
        return None
    import torch

    dtype = x.dtype
    compute = torch.promote_types(dtype, torch.float32)
    out = torch.nn.functional.layer_norm(
        x.to(compute), (size,), gamma.to(compute), beta.to(compute), epsilon
    )
    return out.to(dtype)


def table_index(relative_positions, n_positions):
    """`clip(n_positions // 2 + relative_positions, 0, n_positions - 1)`,
    right for every integer dtype, in the dtype the kernels gather with.

    Widen, then clamp: narrow offsets (8 and 16 bits) are cast to int32
    first, so that bounds beyond their range cannot wrap; 64-bit and
    unsigned 32-bit offsets are clamped in their own dtype first, so that
    none wraps when cast. The offset is clamped *before* the half table is
    added, so that the sum cannot pass the int32 range either.
    """
    dtype = keras.backend.standardize_dtype(relative_positions.dtype)
    if dtype in ("int64", "uint32", "uint64"):
        bound = ops.cast(OFFSET_BOUND, dtype)
        if dtype == "int64":
            relative_positions = ops.clip(relative_positions, -bound, bound)
        else:
            relative_positions = ops.minimum(relative_positions, bound)
    offsets = ops.cast(relative_positions, index_dtype())
    half = n_positions // 2
    return ops.clip(offsets, -half, n_positions - 1 - half) + half


def index_dtype():
    """The integer dtype of the table index: int64 on torch (`torch.gather`
    takes no other), int32 elsewhere (JAX without x64 has no int64)."""
    return "int64" if keras.backend.backend() == "torch" else "int32"


def pooling_block_elements():
    """Largest `(batch, heads, queries, keys)` block the pooled-only path
    holds at a time: `config.BlockSettings.block_elements`, by default
    2**20 on torch eager (larger fresh buffers cost page faults on every
    call on CPU) and 2**23 where XLA or inductor plan their buffers."""
    chosen = config.get_block_settings().block_elements
    if chosen is not None:
        return chosen
    if keras.backend.backend() == "torch":
        import torch

        if not torch.compiler.is_compiling():  # inductor plans its own buffers
            return 2**20
    return 2**23


def flat_index_fits(*sizes):
    """Whether `prod(sizes)` flat numbers surely fit int32: decided from
    sizes known as Python ints only. An unknown size (None, a TensorFlow
    graph tensor, a JAX or torch symbolic dimension) is not proved to fit,
    nor is any size under `torch.jit.trace` (ONNX export), which would
    freeze the answer: those take the gather that cannot wrap.
    """
    if keras.backend.backend() == "torch":
        import torch

        if torch.jit.is_tracing():  # a traced answer would be frozen
            return False
    total = 1
    for size in sizes:  # a loop, not a generator: dynamo traces it without a break
        if not isinstance(size, int):
            return False
        total *= size
    return total < config.get_block_settings().flat_index_limit


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
    """`table[:, columns]` for a 2-D `(heads, n)` table and integer column
    numbers (int32, or int64 on torch) known in range.

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
    q, k, pos_q, pos_k, relative_positions, layout=None, output=None,
    block_diagonal=None,
):
    """c2p + p2c as `(batch, queries, keys, heads)` or `(batch, heads,
    queries, keys)`: `PositionTerms(...).logits()`, for every query."""
    terms = PositionTerms(
        q, k, pos_q, pos_k, relative_positions, layout=layout, output=output,
        block_diagonal=block_diagonal,
    )
    return terms.logits()


class BlockRows:
    """The queries of one block in a loop over equal blocks (`recomputed_blocks`):
    `size` rows from `start`, a traced integer. Read wherever a `slice` of
    rows is (`take_rows`, `PositionTerms.logits`, `_blockwise.keep_mask`)."""

    def __init__(self, start, size):
        self.start = start
        self.size = size


def take_rows(x, axis, rows):
    """`x`'s queries axis (`axis`) sliced to `rows` (a `slice` or
    `BlockRows`), unless it has size 1 (it broadcasts).

    A size not known statically may be 1 at run time: the rows are then
    taken by number, each clamped to the axis (so a broadcast axis gives its
    one row, repeated), never a Python test of that size.
    """
    size = _checks.shape_of(x)[axis]
    if size == 1 or (not isinstance(rows, BlockRows) and rows == slice(None)):
        return x
    if size is None and not _checks.is_guarded_size(x.shape[axis]):
        start = 0 if rows.start is None else rows.start
        count = rows.size if isinstance(rows, BlockRows) else rows.stop - rows.start
        number = ops.arange(count, dtype="int32") + ops.cast(start, "int32")
        last = ops.cast(ops.shape(x)[axis], "int32") - 1
        return ops.take(x, ops.minimum(number, last), axis=axis)
    if isinstance(rows, BlockRows):
        start = [0] * len(x.shape)
        start[axis] = rows.start
        shape = list(x.shape)
        shape[axis] = rows.size
        return ops.slice(x, start, shape)
    return x[(slice(None),) * axis + (rows,)]


class BlockOffsets:
    """Relative positions formed one block of queries at a time (`rows`),
    so that no `(queries, keys)` offsets tensor exists for the whole input;
    `PositionTerms` reads them wherever it reads a `relative_positions`
    tensor."""

    def rows(self, rows=slice(None)):
        """`(batch or 1, rows, keys, coordinates)` int32 offsets."""
        raise NotImplementedError

    def keep(self, rows=slice(None)):
        """A 0/1 factor on the position terms of these rows, broadcastable
        to `(batch, rows, keys)`, or None (every pair has them)."""
        return None


class TokenOffsets(BlockOffsets):
    """Relative positions `key - query` formed from per-token coordinates.

    Args:
        query_positions: `(batch or 1, queries, coordinates)` integers.
        key_positions: `(batch or 1, keys, coordinates)` integers.

    Coordinates are taken as int32 (their low 32 bits) and subtracted in
    wrapping int32 arithmetic, which is exact whenever the offset itself
    fits int32 (coordinates of any integer dtype, within 2**31 of each
    other); `table_index` then clamps the offset to the table.
    """

    def __init__(self, query_positions, key_positions):
        self.query = ops.cast(query_positions, "int32")
        self.key = ops.cast(key_positions, "int32")

    def rows(self, rows=slice(None)):
        # `expand_dims`, not `x[:, None]`: LiteRT's converter makes that
        # index a `FlexStridedSlice`, which its builtin interpreter lacks.
        query = take_rows(self.query, 1, rows)
        return ops.expand_dims(self.key, 1) - ops.expand_dims(query, 2)


class BoxOffsets(BlockOffsets):
    """edspdf's box offsets (`positions.box_relative_positions`, whose
    formula `_box_pair_offsets` is) formed from the boxes, with a leading
    token (`BoxTransformer`'s CLS) that has no position terms: what edspdf's
    `BoxTransformerModule` gives its layers as a `(pages, lines + 1,
    lines + 1, 2)` offsets tensor and `(pages, lines + 1, lines + 1)`
    no-position mask, one block of queries at a time.

    Args:
        boxes: dict of `(pages, lines)` float tensors; `xmin`, `ymin`, `ymax`
            and `height` are read.
        n_relative_positions (int): the scale of the x offsets.
        dtype: dtype of the `keep` factor (the logits').
    """

    def __init__(self, boxes, n_relative_positions, dtype):
        columns = [
            ops.convert_to_tensor(boxes[key], "float32")
            for key in ("xmin", "ymin", "ymax", "height")
        ]
        # The leading token's box: finite offsets (height 1), which its
        # `keep` of 0 then removes from the terms.
        leading = [0.0, 0.0, 0.0, 1.0]
        self.boxes = [ops.pad(c, [[0, 0], [1, 0]], constant_values=v)
                      for c, v in zip(columns, leading)]
        self.n_relative_positions = n_relative_positions
        n_tokens = ops.shape(self.boxes[0])[1]
        self.has_terms = ops.cast(ops.arange(n_tokens) > 0, dtype)[None]  # (1, tokens)

    def rows(self, rows=slice(None)):
        from keras_relattn.positions import _box_pair_offsets

        return _box_pair_offsets(  # `expand_dims`: see `TokenOffsets.rows`
            [ops.expand_dims(take_rows(c, 1, rows), 2) for c in self.boxes],
            [ops.expand_dims(c, 1) for c in self.boxes],
            self.n_relative_positions,
        )

    def keep(self, rows=slice(None)):
        query = take_rows(self.has_terms, 1, rows)
        return ops.expand_dims(query, 2) * ops.expand_dims(self.has_terms, 1)


class PositionTerms:
    """The c2p + p2c terms of one call: table scores made once, gathered per
    block of queries (`logits(rows)`), in the layout the caller reads.

    Args:
        q: `(batch, queries, heads, head_size)`, scaled.
        k: `(batch, keys, heads, head_size)`.
        pos_q, pos_k: `(n_positions, coordinates, heads, chunk)` or None
            (term not computed); `pos_q` scaled.
        relative_positions: `(batch or 1, queries or 1, keys or 1,
            coordinates)` integer offsets, any dtype, or `BlockOffsets`
            (formed per block: `TokenOffsets`, `BoxOffsets`); turned into
            table rows (`table_index`) block by block, so that no
            whole-input index exists at once.
        no_position_mask: optional bool or 0/1 `(batch or 1, queries or 1,
            keys or 1)`: True zeroes both terms of that pair.
        layout: `"head_major"` or `"rows"` (see the module docstring); by
            default, the one measured fastest on the backend.
        output: `"bqkh"` or `"bhqk"`, the layout of the result; by default
            `default_output()`.
        block_diagonal: for `"rows"`, force or forbid the block-diagonal
            matmul (tests); by default chosen from the number of heads.

    The gather, chosen once from the backend and the sizes:

    - `"torch_rows"` (torch, `"bhqk"`): per-row `torch.gather` along the
      table axis of `(b, h, queries, P)` and `(b, h, P, keys)` scores; both
      come out contiguous in the softmax's layout. Measured W2 pooled: ~2.5x
      faster than `index_select` on flat numbers plus strided adds.
    - `"flat"`: one gather of flat score numbers `(batch * rows + row) *
      n_positions + offset` (the XLA default), when they surely fit int32
      (torch: int64 numbers otherwise).
    - `"per_row"`: `take_along_axis` along each row of scores, where the flat
      numbers could pass 2**31 or the sizes are not known while tracing:
      nothing can wrap.
    """

    def __init__(self, q, k, pos_q, pos_k, relative_positions,
                 no_position_mask=None, layout=None, output=None,
                 block_diagonal=None):
        table = pos_k if pos_k is not None else pos_q
        self.n_positions = ops.shape(table)[0]
        self.coords, self.heads = table.shape[1], table.shape[2]
        self.layout = default_layout() if layout is None else layout
        self.output = default_output() if output is None else output
        if self.layout not in LAYOUTS:
            raise ValueError(f"`layout` must be one of {LAYOUTS}, got {self.layout!r}")
        if self.output not in OUTPUTS:
            raise ValueError(f"`output` must be one of {OUTPUTS}, got {self.output!r}")
        self.heads_last = self.output == "bqkh"
        self.block_diagonal = (
            self.heads <= BLOCK_DIAGONAL_MAX_HEADS if block_diagonal is None
            else block_diagonal
        )
        self.batch, self.n_queries = ops.shape(q)[0], ops.shape(q)[1]
        self.n_keys = ops.shape(k)[1]
        if isinstance(relative_positions, BlockOffsets):
            self.offsets = relative_positions
        else:  # sizes of 1 broadcast over queries and keys (as in edspdf)
            self.offsets = ops.broadcast_to(
                relative_positions,
                (ops.shape(relative_positions)[0], self.n_queries, self.n_keys, self.coords),
            )
        backend = keras.backend.backend()
        fits = flat_index_fits(self.batch, self.n_queries, self.n_positions) and (
            flat_index_fits(self.batch, self.n_keys, self.n_positions)
        )
        if backend == "torch" and not self.heads_last and self.layout == "head_major":
            self.gather = "torch_rows"
        elif fits or backend == "torch":
            self.gather = "flat"
            self.index_dtype = "int32" if fits else "int64"
        else:
            self.gather = "per_row"
        # 0/1 factor on the terms, (batch or 1, queries or 1, keys or 1).
        self.keep = None
        if no_position_mask is not None:
            no_position_mask = _checks.as_bool(no_position_mask)
            self.keep = ops.cast(ops.logical_not(no_position_mask), q.dtype)
        chunk = q.shape[-1] // self.coords
        # Per coordinate: (c2p scores or None, p2c scores or None).
        self.scores = [
            (
                None if pos_k is None
                else self._scores(q[..., x * chunk:(x + 1) * chunk], pos_k[:, x], "c2p"),
                None if pos_q is None
                else self._scores(k[..., x * chunk:(x + 1) * chunk], pos_q[:, x], "p2c"),
            )
            for x in range(self.coords)
        ]

    def score_tensors(self):
        """The table scores, flat: what a recomputed block differentiates."""
        return [scores for pair in self.scores for scores in pair if scores is not None]

    def with_scores(self, tensors):
        """These terms, reading `tensors` (listed as `score_tensors()` lists
        them) as their table scores."""
        tensors = iter(tensors)
        copy = object.__new__(PositionTerms)
        copy.__dict__.update(self.__dict__)
        copy.scores = [
            tuple(None if scores is None else next(tensors) for scores in pair)
            for pair in self.scores
        ]
        return copy

    def _scores(self, x, table, term):
        """`x` `(batch, length, heads, chunk)` against `table` `(P, heads,
        chunk)`, laid out for this gather."""
        if self.gather == "torch_rows":
            equation = "bqhd,phd->bhqp" if term == "c2p" else "bkhd,phd->bhpk"
            return ops.einsum(equation, x, table)
        if self.gather == "per_row":  # (batch, length, heads, P)
            return ops.einsum("blhd,phd->blhp", x, table)
        rows = ops.reshape(x, (-1,) + tuple(x.shape[2:]))
        if self.layout == "head_major":
            return _head_major_scores(rows, table)
        return _row_scores(rows, table, self.block_diagonal)

    def logits(self, rows=slice(None), reuse=False):
        """c2p + p2c for the queries `rows`, in the `output` layout.

        `reuse` (torch, no autograd): gather every term after the first into
        one spare buffer and add it in place; zero the masked pairs in place.
        """
        block = isinstance(self.offsets, BlockOffsets)
        offsets = self.offsets.rows(rows) if block else take_rows(self.offsets, 1, rows)
        index = table_index(offsets, self.n_positions)
        total = spare = None
        for x, (c2p, p2c) in enumerate(self.scores):
            idx = index[..., x]
            for scores, term in ((c2p, "c2p"), (p2c, "p2c")):
                if scores is None:
                    continue
                if total is None:
                    total = self._gather(scores, idx, term, rows)
                elif reuse and self.gather == "torch_rows":
                    spare = self._gather(scores, idx, term, rows, out=spare)
                    total.add_(spare)
                else:
                    total = total + self._gather(scores, idx, term, rows)
        keep = None if self.keep is None else take_rows(self.keep, 1, rows)
        pairs = self.offsets.keep(rows) if block else None
        if pairs is not None:
            keep = pairs if keep is None else keep * pairs
        if keep is not None:
            keep = ops.expand_dims(keep, -1 if self.heads_last else 1)  # see `TokenOffsets.rows`
            total = total.mul_(keep) if reuse else total * keep
        return total

    def _gather(self, scores, idx, term, rows, out=None):
        if self.gather == "torch_rows":
            import torch

            if term == "c2p" and rows != slice(None):
                scores = scores[:, :, rows]
            batch, heads = scores.shape[0], scores.shape[1]
            idx = idx.to(torch.int64)[:, None].expand(batch, heads, *idx.shape[1:])
            return torch.gather(scores, 3 if term == "c2p" else 2, idx, out=out)
        if self.gather == "per_row":
            if term == "c2p":  # rows are queries: (b, q, h, P) -> (b, q, h, k)
                scores = take_rows(scores, 1, rows)
                taken = ops.take_along_axis(scores, ops.expand_dims(idx, 2), axis=3)
                return ops.transpose(taken, (0, 1, 3, 2) if self.heads_last else (0, 2, 1, 3))
            # rows are keys: (b, k, h, P) -> (b, k, h, q)
            by_key = ops.transpose(idx, (0, 2, 1))
            taken = ops.take_along_axis(scores, ops.expand_dims(by_key, 2), axis=3)
            return ops.transpose(taken, (0, 3, 1, 2) if self.heads_last else (0, 2, 3, 1))
        # Flat score numbers: the base number of each (batch, query) or
        # (batch, key), broadcast to the pairs (the index may have a batch
        # of 1).
        dtype = self.index_dtype
        n_rows = ops.shape(idx)[1]
        b = ops.arange(self.batch, dtype=dtype)[:, None, None]
        if term == "c2p":
            first = 0 if rows.start is None else rows.start  # traced in `recomputed_blocks`
            row = ops.arange(n_rows, dtype=dtype)[None, :, None] + first
            base = (b * self.n_queries + row) * self.n_positions
        else:
            col = ops.arange(self.n_keys, dtype=dtype)[None, None, :]
            base = (b * self.n_keys + col) * self.n_positions
        flat = ops.broadcast_to(base, (self.batch, n_rows, self.n_keys)) + ops.cast(idx, dtype)
        if self.layout == "head_major":
            return take_columns(scores, flat, self.heads_last)
        taken = ops.take(scores, flat, axis=0)
        return taken if self.heads_last else ops.transpose(taken, (0, 3, 1, 2))


def inference_pooling(c2c_q, c2c_k, positions, rows, extra, attend, values,
                      masked_logit):
    """One block of the pooled-only path in place (torch inference), or None.

    The same arithmetic as the layer's generic block (`keras.ops`), with one
    `(batch, heads, queries, keys)` buffer updated in place: on CPU every
    fresh buffer of that size costs page faults as well as a pass (measured
    W2 pooled: 28 ms with a fresh tensor per step, 15 ms when the allocator
    keeps its pages), and the generic autograd-friendly form needs one per
    step. Returns None where it does not apply (the generic path then runs):
    another backend, `torch.compile` (inductor fuses the generic form),
    gradients being recorded, or not float32.

    Args:
        c2c_q, c2c_k: `(batch, queries|keys, heads, d)` for the c2c matmul
            (head bias folded in), or None without c2c.
        positions: a `PositionTerms` ("bhqk", its `no_position_mask`
            included) or None, and `rows` the queries of this block.
        extra: terms added to the logits, each broadcastable to `(batch,
            heads, queries, keys)`.
        attend: bool, broadcastable to the logits, or None.
        values: `(batch, keys, heads, dv)`.
    """
    if keras.backend.backend() != "torch":
        return None
    import torch

    if torch.compiler.is_compiling():  # inductor fuses the generic form itself
        return None
    tensors = [t for t in (c2c_q, c2c_k, values) if t is not None]
    if positions is not None:
        tensors += [s for pair in positions.scores for s in pair if s is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    if any(t.dtype != torch.float32 for t in tensors):
        return None
    logits = None
    if positions is not None:
        logits = positions.logits(rows, reuse=True)
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


def checkpoint(fn, tensors):
    """`fn(*tensors)`, whose intermediates the backward pass recomputes
    instead of keeping: `jax.checkpoint` or `torch.utils.checkpoint`.

    Where `recomputed_blocks` has no loop (`torch.compile`), and for JAX's
    shorter last block, the pooled path runs each block of queries through
    it: autodiff then keeps the block's inputs and output, not its
    `(batch, heads, rows, keys)` logits and softmax. `fn` must compute the
    same numbers when called again (no stateful random draw inside: see
    `_blockwise.keep_mask`), and read every tensor it differentiates from
    its arguments. (TensorFlow never comes here: its `recomputed_blocks`
    always applies.)
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.checkpoint(fn)(*tensors)
    if backend == "torch":
        import torch

        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            from torch.utils.checkpoint import checkpoint as torch_checkpoint

            return torch_checkpoint(fn, *tensors, use_reentrant=False)
    return fn(*tensors)


def recomputed_blocks(fn, blocks, tensors):
    """`fn(rows, *tensors)` for each block of queries (`slice`s, in order),
    concatenated on axis 1, each block recomputed in the backward pass
    inside one loop: or None where the backend has no such loop (the caller
    then runs a Python loop of `checkpoint`s).

    - JAX: `lax.map` of `jax.checkpoint(fn)` over the equal blocks (their
      rows a traced `BlockRows`), the last one apart if shorter. A Python
      loop of checkpoints leaves XLA free to schedule every block's
      recomputation at once (4.1 GiB of temporaries at 8192 tokens under
      `jax.jit`); a loop's iterations run one after the other.
    - torch (eager, gradients recorded): one `autograd.Function` whose
      backward recomputes one block at a time and adds its gradients in
      place into buffers allocated once (`_recomputed_blocks_function`).
    - TensorFlow: one `tf.custom_gradient`, its blocks a `tf.while_loop` in
      a graph (`_tensorflow_recomputed_blocks`).

    None (a Python loop of `checkpoint`s) under `torch.compile`, and in
    torch without gradients recorded.
    """
    backend = keras.backend.backend()
    size = blocks[0].stop - blocks[0].start
    n_equal = sum(1 for rows in blocks if rows.stop - rows.start == size)
    if backend == "jax":
        import jax

        starts = ops.arange(n_equal, dtype="int32") * size
        looped = jax.lax.map(
            jax.checkpoint(lambda start: fn(BlockRows(start, size), *tensors)), starts
        )  # (blocks, batch, rows, ...)
        looped = ops.swapaxes(looped, 0, 1)
        shape = tuple(looped.shape)
        done = [ops.reshape(looped, (shape[0], n_equal * size) + shape[3:])]
        for rows in blocks[n_equal:]:
            done.append(checkpoint(lambda *t, rows=rows: fn(rows, *t), tensors))
        return done[0] if len(done) == 1 else ops.concatenate(done, 1)
    if backend == "torch":
        import torch

        if torch.compiler.is_compiling() or not (
            torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        ):
            return None
        return _recomputed_blocks_function().apply(fn, blocks, *tensors)
    if backend == "tensorflow":
        return _tensorflow_recomputed_blocks(fn, blocks, tensors, size, n_equal)
    return None


def _tensorflow_recomputed_blocks(fn, blocks, tensors, size, n_equal):
    """`recomputed_blocks` on TensorFlow: one `tf.custom_gradient` whose
    forward runs every block unrecorded and whose gradient recomputes one
    block at a time under its own tape, adding its gradients into one sum
    per input. Eagerly, a Python loop; in a graph (`tf.function`, XLA), a
    `tf.while_loop` over the first `n_equal` blocks (of `size` rows, their
    first row traced), so that one block's recomputation follows the
    previous one's gradient.

    Measured at 8192 tokens (one fwd+bwd, 4 heads): a Python loop of
    `tf.recompute_grad` per block was bounded in its temporaries but not in
    its gradients. Each block sends a whole-input gradient to every input
    (zeros outside its rows), and the eager tape sums a tensor's pending
    gradients only once they pass 128 MiB: 1.35 GiB eagerly, at 8192 tokens
    and at 16384. Under XLA, unrolled, every block's recomputation was
    scheduled together: 9.5 GiB.
    """
    import tensorflow as tf

    def looped(step, state):
        """`step(block's BlockRows, state)` over the equal blocks in one
        `tf.while_loop` (a graph), or None where the blocks are a Python
        loop (eagerly, or a single equal block)."""
        if tf.executing_eagerly() or n_equal < 2:
            return None

        def body(i, state):
            return i + 1, step(BlockRows(i * size, size), state)

        return tf.while_loop(
            lambda i, _: i < n_equal, body, (tf.constant(0), state),
            maximum_iterations=n_equal,
        )[1]

    def each_block(step, state):
        """`state = step(rows, state)` over the blocks in order."""
        done = looped(step, state)
        rest = blocks if done is None else blocks[n_equal:]
        state = state if done is None else done
        for rows in rest:
            state = step(rows, state)
        return state

    def forward(held):
        # Every float input is in the layer's compute dtype, as the output.
        written = looped(
            lambda rows, written: written.write(rows.start // size, fn(rows, *held)),
            tf.TensorArray(held[0].dtype, size=n_equal),
        )
        if written is None:
            return tf.concat([fn(rows, *held) for rows in blocks], axis=1)
        stacked = tf.experimental.numpy.swapaxes(written.stack(), 0, 1)  # (b, blocks, rows, ...)
        shape = tf.shape(stacked)
        done = [tf.reshape(stacked, tf.concat([shape[:1], [n_equal * size], shape[3:]], 0))]
        done += [fn(rows, *held) for rows in blocks[n_equal:]]
        return done[0] if len(done) == 1 else tf.concat(done, axis=1)

    @tf.custom_gradient
    def blockwise(*tensors):
        # Eagerly, the tape records what runs inside a custom gradient's
        # forward (keeping every block's intermediates): inputs that stop
        # the gradient leave nothing to record.
        pooled = forward([tf.stop_gradient(t) for t in tensors])

        def gradient(upstream):
            def add(rows, sums):
                with tf.GradientTape() as tape:
                    tape.watch(tensors)
                    block = fn(rows, *tensors)
                grads = tape.gradient(
                    block, tensors, output_gradients=take_rows(upstream, 1, rows),
                    unconnected_gradients=tf.UnconnectedGradients.ZERO,
                )
                return [a + b for a, b in zip(sums, grads)]

            return each_block(add, [tf.zeros_like(t) for t in tensors])

        return pooled, gradient

    return blockwise(*tensors)


@functools.cache
def _recomputed_blocks_function():
    """The torch `autograd.Function` of `recomputed_blocks` (made once, on
    first use: torch is imported only on that backend)."""
    import torch

    class RecomputedBlocks(torch.autograd.Function):
        """Forward: every block, nothing kept but the inputs. Backward: per
        block, its forward again and `autograd.grad`, the gradients added
        in place into one buffer per input (FlashAttention-2's order)."""

        @staticmethod
        def forward(ctx, fn, blocks, *tensors):
            ctx.fn, ctx.blocks = fn, blocks
            ctx.save_for_backward(*tensors)
            # Each block written into one output made once: a small block
            # output kept between the blocks' large temporaries would pin
            # glibc's heap, which then grows by a block at every block.
            first = fn(blocks[0], *tensors)
            n_queries = blocks[-1].stop
            pooled = first.new_empty((first.shape[0], n_queries) + tuple(first.shape[2:]))
            pooled[:, blocks[0]] = first
            del first
            for rows in blocks[1:]:
                pooled[:, rows] = fn(rows, *tensors)
            return pooled

        @staticmethod
        def backward(ctx, grad):
            tensors = ctx.saved_tensors
            wanted = [i for i in range(len(tensors)) if ctx.needs_input_grad[2 + i]]
            sums = {i: torch.zeros_like(tensors[i]) for i in wanted}
            for rows in ctx.blocks:
                with torch.enable_grad():
                    inputs = [t.detach().requires_grad_(i in sums) for i, t in enumerate(tensors)]
                    out = ctx.fn(rows, *inputs)
                    grads = torch.autograd.grad(
                        out, [inputs[i] for i in wanted], grad[:, rows], allow_unused=True
                    )
                for i, g in zip(wanted, grads):
                    if g is not None:
                        sums[i].add_(g)
                del out, inputs, grads
            return (None, None, *(sums.get(i) for i in range(len(tensors))))

    return RecomputedBlocks
