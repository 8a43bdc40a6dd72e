"""The backend interface on TensorFlow: `tf.gather` of head-major scores, and
the recomputed blocks as one `tf.custom_gradient` (a `tf.while_loop` in a
graph)."""

import tensorflow as tf
from tensorflow.python.ops import control_flow_util

from keras_relattn._backend import generic
from keras_relattn._records import flatten, rebuild
from keras_relattn._rows import BlockRows, take_rows
from keras_relattn._backend.generic import (  # noqa: F401  (the interface)
    GATHERS_ALONG_ROWS,
    INDEX_DTYPE,
    _heads_to,
    add_in_place,
    attend_band,
    attend_in_parts,
    band_min_keys,
    fuses_band,
    add_matmul_in_place,
    checkpoint,
    default_block_elements,
    exact_gelu,
    layer_norm,
    masked_softmax_in_place,
    multiply_in_place,
    sizes_are_frozen,
    softmax,
    take_along_rows,
    works_in_place,
)

# As on JAX: XLA (and TF's own kernels) fuse head-major scores gathered
# `(batch, queries, keys, heads)` best.
SCORE_LAYOUT = "head_major"
LOGITS_LAYOUT = "bqkh"
# The banded path in parts (`attends_in_parts`): each op a kernel call
# eagerly, so tall blocks, few of them.
BAND_ROWS = 512


def _in_xla():
    """Whether the ops being traced are compiled by XLA (`jit_compile`)."""
    return (not tf.executing_eagerly()
            and control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


def attends_in_parts():
    """Eagerly and in a graph, where TensorFlow runs one kernel an op (a
    loop's block slicing the keys at its traced first row): the far keys'
    plain matmul beats selecting each logit's edge row (1.7x for a banded
    training step). XLA fuses the selects, and wants static sizes: there
    the logits are built whole."""
    return not _in_xla()


def take_columns(table, columns, heads_last=True):
    return _heads_to(tf.gather(table, columns, axis=1), columns, heads_last)


def place_keys(outside, inside, start):
    """TensorFlow has no gradient for `XlaDynamicUpdateSlice`: a traced
    `start` pads `inside` to every key, rolls it there (`start + width <=
    keys`: nothing wraps) and selects it over `outside`."""
    if isinstance(start, int):
        return generic.place_keys(outside, inside, start)
    n_keys, width = outside.shape[-1], inside.shape[-1]
    padding = [[0, 0]] * (len(inside.shape) - 1) + [[0, n_keys - width]]
    rolled = tf.roll(tf.pad(inside, padding), start, axis=-1)
    key = tf.range(n_keys)
    return tf.where((key >= start) & (key < start + width), rolled, outside)


def traced(fn, tensors, constants, key):
    """Eagerly, the blocks as one `tf.function` (a graph, not XLA: traced
    once per `key` and input signature, no compilation): eager TensorFlow
    pays a Python dispatch for each of the few hundred small ops of a
    banded call, a graph none. Its gradient is the graph's. None in a graph
    already (`tf.function`, `model.fit`)."""
    if not tf.executing_eagerly():
        return None
    return generic._traced_by_key(_TRACED, lambda run: tf.function(run, autograph=False), fn,
                                  tensors, constants, key)


_TRACED = {}  # traced blocks by key (`generic._traced_by_key`)


def recomputed_blocks(fn, blocks, tensors, constants, key):
    """One `tf.custom_gradient` whose forward runs every block unrecorded and
    whose gradient recomputes one block at a time under its own tape, adding
    its gradients into one sum per input. Eagerly, a Python loop; in a graph
    (`tf.function`, XLA), a `tf.while_loop` over the equal blocks (their
    first row traced), so that one block's recomputation follows the
    previous one's gradient.

    Each block sends a whole-input gradient to every input (zeros outside its
    rows), and the eager tape sums a tensor's pending gradients only once
    they pass 128 MiB: one sum per input, made here, keeps that bounded. A
    Python loop under XLA, unrolled, would schedule every block's
    recomputation at once.
    """
    loop = _BlockLoop(blocks)
    # Each tensor once (one may go by two names: the queries of c2c and of
    # the position terms): a tape asked for the gradient of a tensor listed
    # twice gives each its whole gradient, which the caller would add twice.
    leaves, skeleton = flatten(tensors)
    place, unique = {}, []  # each tensor's id -> its place in `unique`
    for tensor in leaves:
        if id(tensor) not in place:
            place[id(tensor)] = len(unique)
            unique.append(tensor)
    where = [place[id(tensor)] for tensor in leaves]

    def run(rows, values):
        return fn(rows, rebuild(skeleton, [values[i] for i in where]), constants)

    @tf.custom_gradient
    def blockwise(*values):
        # Eagerly, the tape records what runs inside a custom gradient's
        # forward (keeping every block's intermediates): inputs that stop
        # the gradient leave nothing to record.
        pooled = loop.forward(run, [tf.stop_gradient(t) for t in values])

        def gradient(upstream):
            def add(rows, sums):
                with tf.GradientTape() as tape:
                    tape.watch(values)
                    block = run(rows, values)
                grads = tape.gradient(
                    block, values, output_gradients=take_rows(upstream, 1, rows),
                    unconnected_gradients=tf.UnconnectedGradients.ZERO,
                )
                # (each sum keeps its static shape: a graph's loop requires it)
                return [tf.ensure_shape(a + b, a.shape) for a, b in zip(sums, grads)]

            return loop.each_block(add, [tf.zeros_like(t) for t in values])

        return pooled, gradient

    return blockwise(*unique)


class _BlockLoop:
    """The blocks of `recomputed_blocks`: the equal ones in a `tf.while_loop`
    in a graph, then the shorter last one; a Python loop eagerly."""

    def __init__(self, blocks):
        self.blocks = blocks
        self.size = blocks[0].stop - blocks[0].start
        self.n_equal = sum(1 for rows in blocks if rows.stop - rows.start == self.size)

    def looped(self, step, state):
        """`step(block's BlockRows, state)` over the equal blocks in one
        `tf.while_loop` (a graph), or None where the blocks are a Python
        loop (eagerly, or a single equal block)."""
        if tf.executing_eagerly() or self.n_equal < 2:
            return None

        def body(i, state):
            return i + 1, step(BlockRows(i * self.size, self.size), state)

        return tf.while_loop(
            lambda i, _: i < self.n_equal, body, (tf.constant(0), state),
            maximum_iterations=self.n_equal,
            # One block at a time: a graph's executor (tf.function without
            # XLA, what `fit` runs on a CPU-only machine) otherwise runs up
            # to 10 iterations at once, each holding a block's intermediates.
            parallel_iterations=1,
        )[1]

    def each_block(self, step, state):
        """`state = step(rows, state)` over the blocks in order."""
        done = self.looped(step, state)
        rest = self.blocks if done is None else self.blocks[self.n_equal:]
        state = state if done is None else done
        for rows in rest:
            state = step(rows, state)
        return state

    def forward(self, run, held):
        """Every block's `run(rows, held)`, concatenated on the queries."""
        # Every float input is in the layer's compute dtype, as the output.
        size, n_equal = self.size, self.n_equal
        written = self.looped(
            lambda rows, written: written.write(rows.start // size, run(rows, held)),
            tf.TensorArray(held[0].dtype, size=n_equal),
        )
        if written is None:
            return tf.concat([run(rows, held) for rows in self.blocks], axis=1)
        stacked = tf.experimental.numpy.swapaxes(written.stack(), 0, 1)  # (b, blocks, rows, ...)
        shape = tf.shape(stacked)
        done = [tf.reshape(stacked, tf.concat([shape[:1], [n_equal * size], shape[3:]], 0))]
        done += [run(rows, held) for rows in self.blocks[n_equal:]]
        return done[0] if len(done) == 1 else tf.concat(done, axis=1)
