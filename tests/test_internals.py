"""The package's private names, tested where they live: the one test module
that imports them (the others test through the public API and
`keras_relattn.config`).

First each backend's fast path (`_backend.get()`) against the generic
`keras.ops` version (`_backend.generic()`), which is what a backend without a
fast path runs; then the private units whose own contract a test pins (the
flat gather's guard, the dropout mask's rate, the block plan, the box offsets
per block, the log buckets' edges).
"""

import dataclasses

import keras
import numpy as np
import pytest
from keras import ops

from helpers import BACKEND, to_numpy
from keras_relattn import RelativeAttention, _backend, _block_plan, config
from keras_relattn._logits import keep_mask
from keras_relattn._position_terms import flat_index_fits, position_terms
from keras_relattn._records import Record
from keras_relattn._rows import take_rows
from keras_relattn.positions import _bucket_edges

FAST, GENERIC = _backend.get(), _backend.reference()


def tensor(a):
    return ops.convert_to_tensor(a)


def test_the_backend_module_is_chosen_once():
    assert _backend.get() is FAST
    assert FAST.__name__.endswith(BACKEND if BACKEND in ("jax", "tensorflow", "torch")
                                  else "generic")
    missing = [name for name in GENERIC.__all__ if not hasattr(FAST, name)]
    assert not missing, missing


def test_the_interface_doc_lists_exactly_the_interface():
    """`_backend/__init__.py`'s list: every name a backend must define, and
    no other."""
    import re

    doc = _backend.__doc__
    listed = set(re.findall(r"`([A-Za-z_]+)(?:\(|`)", doc[doc.index("The interface"):]))
    listed -= {"generic", "b", "h", "q", "k", "P", "d"}  # the module, the axes' names
    assert listed == set(GENERIC.__all__), (listed ^ set(GENERIC.__all__))


def test_take_columns_equals_the_generic_gather(rng):
    table = rng.normal(size=(3, 50)).astype("float32")
    columns = rng.integers(0, 50, size=(2, 5, 7)).astype("int32")
    for heads_last in (True, False):
        fast = to_numpy(FAST.take_columns(tensor(table), tensor(columns), heads_last))
        generic = to_numpy(GENERIC.take_columns(tensor(table), tensor(columns), heads_last))
        np.testing.assert_array_equal(fast, generic)
    np.testing.assert_array_equal(
        to_numpy(FAST.take_columns(tensor(table), tensor(columns))),
        np.moveaxis(table[:, columns], 0, -1))


@pytest.mark.parametrize("axis", [2, 3])
@pytest.mark.parametrize("index_batch", [1, 2])
def test_take_along_rows_equals_the_generic_gather(axis, index_batch, rng):
    # (batch, heads, queries, P) along P, or (batch, heads, P, keys) along P.
    scores = rng.normal(size=(2, 3, 4, 6) if axis == 3 else (2, 3, 6, 5)).astype("float32")
    index = rng.integers(0, 6, size=(index_batch, 4, 5)).astype(FAST.INDEX_DTYPE)
    fast = to_numpy(FAST.take_along_rows(tensor(scores), tensor(index), axis))
    generic = to_numpy(GENERIC.take_along_rows(tensor(scores), tensor(index), axis))
    np.testing.assert_array_equal(fast, generic)
    want = np.take_along_axis(scores, np.broadcast_to(index[:, None], (2, 3, 4, 5)), axis=axis)
    np.testing.assert_array_equal(fast, want)


def test_in_place_steps_equal_the_generic_ones(rng):
    logits = rng.normal(size=(2, 3, 4, 5)).astype("float32")
    attend = rng.random((2, 1, 4, 5)) > 0.3
    attend[0, 0, 1] = False  # a fully masked row
    want = to_numpy(GENERIC.masked_softmax_in_place(tensor(logits), tensor(attend), -10000.0))
    got = to_numpy(FAST.masked_softmax_in_place(tensor(logits.copy()), tensor(attend), -10000.0))
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(got[0, :, 1], 1 / 5, atol=1e-6)  # uniform over the keys
    a = rng.normal(size=(2, 3, 4, 7)).astype("float32")
    b = rng.normal(size=(2, 3, 7, 5)).astype("float32")
    for name, args in (("add_in_place", (logits,)), ("multiply_in_place", (logits,)),
                       ("add_matmul_in_place", (a, b))):
        want = to_numpy(getattr(GENERIC, name)(tensor(logits), *map(tensor, args)))
        got = to_numpy(getattr(FAST, name)(tensor(logits.copy()), *map(tensor, args)))
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=name)


def test_exact_gelu_and_layer_norm_equal_keras(rng):
    x = rng.normal(size=(2, 3, 8)).astype("float32") * 3
    np.testing.assert_allclose(
        to_numpy(FAST.exact_gelu(tensor(x))),
        to_numpy(keras.activations.gelu(tensor(x), approximate=False)), atol=1e-5)
    np.testing.assert_allclose(to_numpy(FAST.exact_gelu(tensor(x))),
                               to_numpy(GENERIC.exact_gelu(tensor(x))), atol=1e-5)
    norm = keras.layers.LayerNormalization(epsilon=1e-5)
    norm.build((None, None, 8))
    norm.gamma.assign(rng.normal(size=8).astype("float32"))
    norm.beta.assign(rng.normal(size=8).astype("float32"))
    fast = FAST.layer_norm(tensor(x), tensor(to_numpy(norm.gamma)), tensor(to_numpy(norm.beta)),
                           1e-5, 8)
    assert GENERIC.layer_norm(tensor(x), None, None, 1e-5, 8) is None  # Keras' own serves
    if fast is not None:
        np.testing.assert_allclose(to_numpy(fast), to_numpy(norm(x)), atol=1e-5)


def gradient(function, xs):
    """`function(*xs)` and the gradient of its sum w.r.t. `xs`, on any backend."""
    if BACKEND == "jax":
        import jax

        value, grads = jax.value_and_grad(lambda *a: ops.sum(function(*a)),
                                          argnums=tuple(range(len(xs))))(*xs)
        return value, grads
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(xs)
            value = ops.sum(function(*xs))
        return value, tape.gradient(value, xs)
    import torch

    xs = [torch.as_tensor(x).clone().requires_grad_(True) for x in xs]
    value = ops.sum(function(*xs))
    return value, torch.autograd.grad(value, xs)


@dataclasses.dataclass(frozen=True)
class Pair(Record):
    q: object
    k: object


@dataclasses.dataclass(frozen=True)
class Scale(Record):
    scale: object


def block_function(rows, tensors, constants):
    """A block of rows of a small attention-like function of its tensors."""
    q = take_rows(tensors.q, 1, rows)
    weights = GENERIC.softmax(ops.einsum("bqd,bkd->bqk", q, tensors.k) * constants.scale)
    return ops.einsum("bqk,bkd->bqd", weights, tensors.k)


def test_recomputed_blocks_and_checkpoints_equal_plain_blocks(rng):
    """The backend's loop of recomputed blocks (or a checkpoint per block
    where it has none): the same output and gradients as blocks kept."""
    q = tensor(rng.normal(size=(2, 7, 4)).astype("float32"))
    k = tensor(rng.normal(size=(2, 5, 4)).astype("float32"))
    constants = Scale(tensor(np.float32(0.5)))
    blocks = [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 7)]

    def plain(q, k):
        return ops.concatenate([block_function(rows, Pair(q, k), constants)
                                for rows in blocks], 1)

    def recomputed(q, k):
        tensors = Pair(q, k)
        done = FAST.recomputed_blocks(block_function, blocks, tensors, constants, "test")
        if done is None:
            done = ops.concatenate([FAST.checkpoint(block_function, rows, tensors, constants)
                                    for rows in blocks], 1)
        return done

    value, grads = gradient(plain, [q, k])
    again, regrads = gradient(recomputed, [q, k])
    np.testing.assert_allclose(to_numpy(again), to_numpy(value), atol=1e-5)
    for a, b in zip(regrads, grads):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), atol=1e-5)


@pytest.mark.parametrize("layout", ["head_major", "heads_minor"])
@pytest.mark.parametrize("output", ["bqkh", "bhqk"])
@pytest.mark.parametrize("index_batch", [1, 2])
@pytest.mark.parametrize("flat_limit", [None, 16], ids=["flat", "past the flat limit"])
@pytest.mark.parametrize("per_block", [False, True], ids=["scored once", "scored per block"])
def test_position_logits_equal_a_direct_gather(layout, output, index_batch, flat_limit,
                                               per_block, rng, monkeypatch):
    """The score-then-gather terms against gathering table rows per pair,
    whole, by blocks of queries and by a block's span of keys, with each
    gather strategy (each backend's score layout, set on this backend's
    module) and logits layout, the scores made once or by each block for its own
    queries and keys."""
    monkeypatch.setattr(_backend.get(), "SCORE_LAYOUT", layout)
    b, nq, nk, h, x, chunk, p = 2, 3, 4, 3, 2, 2, 7
    q = rng.normal(size=(b, nq, h, x * chunk)).astype("float32")
    k = rng.normal(size=(b, nk, h, x * chunk)).astype("float32")
    pos_q = rng.normal(size=(p, x, h, chunk)).astype("float32")
    pos_k = rng.normal(size=(p, x, h, chunk)).astype("float32")
    index = rng.integers(0, p, size=(index_batch, nq, nk, x)).astype("int32")
    offsets = index - p // 2  # the table rows `index`
    with config.block_settings(flat_index_limit=flat_limit):
        terms, tensors, constants = position_terms(
            *(tensor(a) for a in (q, k, pos_q, pos_k, offsets)), output=output,
            per_block=per_block)
    assert terms.scored_per_block == per_block
    assert (tensors.scores == ()) == per_block  # per block: no whole-input scores made
    if flat_limit is not None:  # no flat int32 numbers past the limit
        assert terms.gather != "flat" or terms.index_dtype == "int64"
    got = to_numpy(terms.logits(tensors, constants))
    axis = 1 if output == "bqkh" else 2
    by_blocks = np.concatenate([to_numpy(terms.logits(tensors, constants, slice(0, 2))),
                                to_numpy(terms.logits(tensors, constants, slice(2, 3)))],
                               axis=axis)
    np.testing.assert_allclose(by_blocks, got, atol=1e-6)
    span = to_numpy(terms.logits(tensors, constants, slice(1, 3), keys=slice(1, 3)))
    whole_span = got[:, 1:3, 1:3] if output == "bqkh" else got[:, :, 1:3, 1:3]
    np.testing.assert_allclose(span, whole_span, atol=1e-6)
    qx, kx = q.reshape(b, nq, h, x, chunk), k.reshape(b, nk, h, x, chunk)
    want = np.zeros((b, nq, nk, h), "float64")
    for c in range(x):
        rows_k = pos_k[index[..., c], c]  # (b or 1, q, k, h, chunk)
        rows_q = pos_q[index[..., c], c]
        want = want + np.einsum("bqhd,bqkhd->bqkh", qx[:, :, :, c], rows_k)
        want = want + np.einsum("bqkhd,bkhd->bqkh", rows_q, kx[:, :, :, c])
    if output == "bhqk":
        want = want.transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, want, atol=1e-5)


# torch's `attend_in_parts` (the banded path's blocks): pure torch, so it is
# tested in every backend's run.


def torch_parts_inputs(rng, d, dv, strided=False, masked=True):
    """A block of 6 queries over 20 keys, band [7, 13), as the layer makes it;
    `strided`: a head size of 1 laid out as a Keras projection leaves it
    (heads with stride 1, the size-1 head axis with stride `heads`)."""
    import torch

    batch, rows, heads, n_keys = 2, 6, 3, 20

    def f32(*shape):
        return torch.as_tensor(rng.normal(size=shape).astype("float32"))

    def projected(length):
        if not strided:
            return f32(batch, length, heads, d)
        return f32(batch, length, d, heads).permute(0, 1, 3, 2)  # strides (.., 1, heads)

    queries = (projected(rows), projected(rows))
    constants = (f32(batch, heads, rows), f32(batch, heads, rows))
    keys, values = projected(n_keys), f32(batch, n_keys, heads, dv)
    band_q, band_positions = projected(rows), f32(batch, heads, rows, 6)
    key_mask = None
    if masked:
        key_mask = torch.as_tensor(rng.random((batch, n_keys)) > 0.3)
        key_mask[1] = False  # a batch row that attends to nothing
    return queries, constants, keys, values, band_q, band_positions, (7, 13), key_mask


def torch_parts_reference(queries, constants, keys, values, band_q, band_positions, band_keys,
                          key_mask):
    """The same attention with every logit built whole, masked logits
    replaced by -10000 (edspdf's rule), in float64."""
    import torch

    start, stop = band_keys
    parts = []
    for first, last, query, added in ((0, start, queries[0], constants[0][..., None]),
                                      (start, stop, band_q, band_positions),
                                      (stop, keys.shape[1], queries[1], constants[1][..., None])):
        parts.append(torch.einsum("bqhd,bkhd->bhqk", query.double(),
                                  keys[:, first:last].double()) + added.double())
    logits = torch.cat(parts, -1)
    if key_mask is not None:
        logits = torch.where(key_mask[:, None, None], logits, torch.tensor(-10000.0).double())
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(logits, -1), values.double())


@pytest.mark.parametrize("d, dv, strided", [(4, 4, False), (3, 5, False), (1, 2, True),
                                            (1, 1, True), (2, 4, True)])
def test_torch_attend_in_parts_equals_whole_logits(d, dv, strided, rng):
    """Outputs and gradients against the whole logits (float64 autograd). A
    head size of 1 with a Keras projection's strides read the heads as the
    head dimension (0.9 off, silently) before its inputs were made
    row-major for the kernel."""
    import torch

    from keras_relattn._backend import torch_fused as torch_backend

    inputs = torch_parts_inputs(rng, d, dv, strided)
    floats = [t for t in (*inputs[0], *inputs[1], *inputs[2:6])]
    # `clone` keeps the strides of a dense tensor: the leaves are laid out as made.
    leaves = [t.detach().clone().requires_grad_(True) for t in floats]
    assert [t.stride() for t in leaves] == [t.stride() for t in floats]
    got = torch_backend.attend_in_parts((leaves[0], leaves[1]), (leaves[2], leaves[3]),
                                        *leaves[4:], *inputs[6:])
    probe = torch.as_tensor(rng.normal(size=got.shape).astype("float32"))
    got_grads = torch.autograd.grad((got * probe).sum(), leaves)
    twins = [t.detach().clone().double().requires_grad_(True) for t in floats]
    want = torch_parts_reference((twins[0], twins[1]), (twins[2], twins[3]), *twins[4:],
                                 *inputs[6:])
    want_grads = torch.autograd.grad((want * probe.double()).sum(), twins)
    np.testing.assert_allclose(got.detach().numpy(), want.detach().numpy(), atol=2e-6)
    for a, b in zip(got_grads, want_grads):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=2e-5)


def test_torch_far_kernel_is_chosen_by_device():
    """The CPU flash op on CPU, CUDA's memory-efficient op (it returns the
    log-sum-exp) on CUDA, the public fallback anywhere else."""
    import torch

    from keras_relattn._backend import torch_fused as torch_backend

    assert torch_backend.far_kernel(torch.device("cpu")).name == "cpu_flash"
    assert torch_backend.far_kernel("cuda").name == "cuda_efficient"
    assert torch_backend.far_kernel(torch.device("cuda", 1)).name == "cuda_efficient"
    assert torch_backend.far_kernel("meta").name == "public"
    assert torch_backend.far_kernel("mps").name == "public"


def test_torch_cuda_kernel_shapes_on_the_meta_device():
    """Without a GPU: CUDA's kernel wrapper traced on meta tensors (its ops'
    shape functions) gives the shapes the merge expects: the log-sum-exp
    cut from its padded rows, and padded back for the backward."""
    import torch

    from keras_relattn._backend import torch_fused as torch_backend

    kernel = torch_backend.far_kernel("cuda")
    q = torch.empty(2, 3, 33, 8, device="meta")
    k = v = torch.empty(2, 3, 50, 8, device="meta")
    mask = torch.zeros(2, 1, 1, 50, device="meta")
    for m in (None, mask):
        for causal in (False, True):  # causal: the banded path's far keys
            out, lse, state = kernel.forward(q, k, v, m, causal=causal)
            assert out.shape == (2, 3, 33, 8) and lse.shape == (2, 3, 33)
            grads = kernel.backward(out, q, k, v, m, out, lse, state, causal=causal)
            assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


@pytest.mark.parametrize("masked", [True, False])
def test_torch_public_kernel_equals_the_cpu_op(masked, rng):
    """The fallback (public `scaled_dot_product_attention`, its log-sum-exp
    and its backward written out) against the CPU flash op, on CPU tensors:
    the output, the log-sum-exp and the backward given a merged output and
    log-sum-exp (as `attend_in_parts` calls it)."""
    import torch

    from keras_relattn._backend import torch_fused as torch_backend

    cpu, public = torch_backend.far_kernel("cpu"), torch_backend.far_kernel("meta")

    def f32(*shape):
        return torch.as_tensor(rng.normal(size=shape).astype("float32"))

    q, k, v = f32(2, 3, 9, 4), f32(2, 3, 14, 4), f32(2, 3, 14, 4)
    mask = None
    if masked:
        keep = torch.as_tensor(rng.random((2, 14)) > 0.3)
        keep[0, :3] = True
        mask = torch.zeros(2, 14).masked_fill(~keep, float("-inf"))[:, None, None]
    (out_a, lse_a, state_a), (out_b, lse_b, state_b) = (
        kernel.forward(q, k, v, mask) for kernel in (cpu, public))
    np.testing.assert_allclose(out_b.numpy(), out_a.numpy(), atol=2e-6)
    np.testing.assert_allclose(lse_b.numpy(), lse_a.numpy(), atol=2e-6)
    grad = f32(2, 3, 9, 4)
    merged_out = out_a * 0.7  # a part of a larger softmax: weight 0.7
    merged_lse = lse_a - np.log(0.7).astype("float32")
    got = public.backward(grad, q, k, v, mask, merged_out, merged_lse, state_b)
    want = cpu.backward(grad, q, k, v, mask, merged_out, merged_lse, state_a)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=2e-5)


def torch_band_reference(far_queries, far_constants, keys, values, band_q, table, scores,
                         window, key_mask):
    """Every logit built whole, in float64: far left `j <= i + below`, far
    right `j >= i + above`, the window between; masked keys replaced by
    -10000 (edspdf's rule)."""
    import torch

    below, above = window
    n = keys.shape[1]
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    r = j - i
    k, v = keys.double(), values.double()
    left = torch.einsum("bqhd,bkhd->bhqk", far_queries[0].double(), k) + far_constants[0].double()[..., None]
    right = torch.einsum("bqhd,bkhd->bhqk", far_queries[1].double(), k) + far_constants[1].double()[..., None]
    band = torch.einsum("bqhd,bkhd->bhqk", band_q.double(), k)
    t = (r - below - 1).clamp(0, above - below - 2)
    if table is not None:  # (w, h, d): table[t(i, j)] . k_j
        band = band + torch.einsum("qkhd,bkhd->bhqk", table.double()[t], k)
    if scores is not None:
        s = scores.double().expand(keys.shape[0], keys.shape[2], n, above - below - 1)
        band = band + torch.gather(s, 3, t[None, None].expand(s.shape[0], s.shape[1], n, n))
    logits = torch.where(r <= below, left, torch.where(r >= above, right, band))
    if key_mask is not None:
        logits = torch.where(key_mask[:, None, None], logits, torch.tensor(-10000.0).double())
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(logits, -1), v)


@pytest.mark.parametrize("n, window, d, dv", [(40, (-5, 4), 4, 4), (37, (-1, 1), 3, 5),
                                              (9, (-6, 7), 2, 2), (30, (-2, 0), 4, 4),
                                              (300, (-33, 31), 4, 3)])
@pytest.mark.parametrize("masked", [False, True])
def test_torch_attend_band_equals_whole_logits(n, window, d, dv, masked, rng):
    """torch's whole-sequence banded kernel (two causal far attentions, the
    window skewed into place) against every logit built whole in float64:
    output and the gradient of every input, narrow and wide windows, a
    window touching the diagonal, a batch row that attends to nothing."""
    import torch
    from keras_relattn._backend import torch_fused as torch_backend

    batch, heads = 2, 3
    w = window[1] - window[0] - 1

    def f32(*shape):
        return torch.as_tensor(rng.normal(size=shape).astype("float32"))

    floats = [f32(batch, n, heads, d), f32(batch, n, heads, d), f32(batch, heads, n),
              f32(batch, heads, n), f32(batch, n, heads, d), f32(batch, n, heads, dv),
              f32(batch, n, heads, d), f32(w, heads, d), f32(batch, heads, n, w)]
    key_mask = None
    if masked:
        key_mask = torch.as_tensor(rng.random((batch, n)) > 0.3)
        key_mask[1] = False  # attends to nothing
    leaves = [t.clone().requires_grad_(True) for t in floats]
    got = torch_backend.attend_band((leaves[0], leaves[1]), (leaves[2], leaves[3]), *leaves[4:],
                                    window, key_mask)
    assert got is not None
    probe = torch.as_tensor(rng.normal(size=got.shape).astype("float32"))
    got_grads = torch.autograd.grad((got * probe).sum(), leaves)
    twins = [t.clone().double().requires_grad_(True) for t in floats]
    want = torch_band_reference((twins[0], twins[1]), (twins[2], twins[3]), *twins[4:], window,
                                key_mask)
    want_grads = torch.autograd.grad((want * probe.double()).sum(), twins)
    np.testing.assert_allclose(got.detach().numpy(), want.detach().numpy(), atol=3e-6)
    for a, b in zip(got_grads, want_grads):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=2e-5, atol=3e-5)


# Private units whose contract a test pins ------------------------------------
#
# Moved here from the modules that test through the public API; those from
# modules marked `reference` keep the marker.


@pytest.mark.reference
def test_flat_gather_guard_is_exact_at_the_int32_limit():
    """`(batch * rows + row) * n_positions + offset` must stay below 2**31."""
    assert not flat_index_fits(65, 4096, 8192)  # the reported case
    assert flat_index_fits(64, 4096, 8191)
    assert not flat_index_fits(2, 2**30, 1)
    assert not flat_index_fits(None, 4, 4)  # unknown: not proved


@pytest.mark.reference
def test_the_int8_bar_catches_the_bias_on_the_length_axis(monkeypatch):
    """The bug simulated (the projections' bias added along the length axis
    in int8): every seed of test_adversarial.py's
    `test_int8_model_with_length_equal_to_heads_stays_close` fails the bar."""
    from keras_relattn._projection import Projection
    from test_adversarial import INT8_BAR, INT8_SEEDS, int8_error

    safe = Projection._add_bias

    def length_axis_bias(self, x):
        if self.bias is None or getattr(self, "quantization_mode", None) != "int8" or (
                x.shape[1] != self.bias.shape[0]):  # the bug needs length == heads
            return safe(self, x)
        bias = keras.ops.cast(self.bias, x.dtype)
        return x + keras.ops.reshape(bias, (1, bias.shape[0], 1, bias.shape[1]))

    monkeypatch.setattr(Projection, "_add_bias", length_axis_bias)
    errors = [int8_error(seed) for seed in INT8_SEEDS]
    assert min(errors) > INT8_BAR, errors


@pytest.mark.reference
def test_blockwise_dropout_statistics_match_the_full_path(rng):
    layer = RelativeAttention(8, 2, position_embedding=rng.normal(size=(9, 8)).astype("float32"),
                              dropout_p=0.3, seed=5)
    x = rng.normal(size=(1, 6, 8)).astype("float32")
    rp = rng.integers(-4, 5, size=(1, 6, 6, 1))
    draws = 120  # JAX traces each long call anew: 300 took a minute

    def run(return_logits):
        out = layer(x, x, x, relative_positions=rp, training=True, return_logits=return_logits)
        return to_numpy(out[0] if return_logits else out)

    with config.block_settings(block_elements=2 * 6 * 2, recompute_elements=0) as log:  # 2 queries
        blockwise = np.stack([run(False) for _ in range(draws)])
    full = np.stack([run(True) for _ in range(draws)])
    assert log.plans[0] == config.BlockPlan(6, 3, True)
    scale = full.std(0).mean()
    assert scale > 0.05
    np.testing.assert_allclose(blockwise.std(0).mean(), scale, rtol=0.15)
    assert np.abs(blockwise.mean(0) - full.mean(0)).mean() < 4 * scale * np.sqrt(2 / draws)
    # The rate is the configured one: the mean of kept weights.
    seed = keras.ops.convert_to_tensor(np.int32(11))
    kept = to_numpy(keep_mask(seed, (4, 8, 64, 64), 0, 0.3)).mean()
    assert abs(kept - 0.7) < 0.01


@pytest.mark.reference
def test_only_long_inputs_recompute_their_blocks():
    """Short inputs split in blocks (torch eager's 2**20) keep them: W2's
    `(4, 4, 512, 512)` does not recompute; 8192 tokens do."""
    short = np.zeros((4, 512, 4, 2), "float32")  # (batch, tokens, heads, head size)
    long = np.zeros((1, 8192, 4, 2), "float32")
    assert not _block_plan.recomputes(short, short)
    assert _block_plan.recomputes(long, long)


def test_long_inputs_are_pooled_in_blocks():
    """Length 8192, batch 1, 4 heads: no whole (1, 4, 8192, 8192) tensor."""
    q = np.zeros((1, 8192, 4, 1), "float32")  # (batch, tokens, heads, head size)
    blocks = _block_plan.query_blocks(q, q)
    assert len(blocks) > 1
    rows = blocks[0].stop - blocks[0].start
    assert 4 * rows * 8192 <= _block_plan.block_elements()


def whole_page_inputs(boxes, n_relative_positions):
    """What edspdf's `BoxTransformerModule` gives its layers: `(pages, lines
    + 1, lines + 1, 2)` offsets (0 on the CLS row and column) and the
    no-position mask of that row and column."""
    import torch
    from edspdf.utils.torch import compute_pdf_relative_positions

    t = {k: torch.from_numpy(np.asarray(v)) for k, v in boxes.items()}
    inner = compute_pdf_relative_positions(
        t["xmin"], t["ymin"], t["xmax"], t["ymax"], t["width"], t["height"],
        n_relative_positions=n_relative_positions,
    ).numpy()
    pages, lines = inner.shape[:2]
    offsets = np.zeros((pages, lines + 1, lines + 1, 2), "int64")
    offsets[:, 1:, 1:] = inner
    no_position = np.ones((pages, lines + 1, lines + 1), bool)
    no_position[:, 1:, 1:] = False
    return offsets, no_position


@pytest.mark.reference
@pytest.mark.parametrize("rows", [slice(None), slice(0, 2), slice(2, 5), slice(5, 6)])
def test_box_offsets_per_block_equal_edspdfs_whole_page_tensors(rows, rng):
    from keras_relattn._offsets import box_offsets
    from test_box_transformer import pages

    _, ours = pages(rng)
    offsets, no_position = whole_page_inputs(ours["boxes"], 32)
    block = box_offsets(ours["boxes"], 32, "float32")
    keep = to_numpy(block.form.position_factor(block.tensors, rows))
    keep = np.broadcast_to(keep, no_position[:, rows].shape)
    np.testing.assert_array_equal(keep, ~no_position[:, rows])
    # Pairs without position terms may hold any offset (edspdf's are 0);
    # padded lines (height 0) give both the most negative integer.
    real = np.pad(ours["mask"], [[0, 0], [1, 0]])
    pairs = (keep > 0) & real[:, rows, None] & real[:, None, :]
    got = to_numpy(block.form.rows(block.tensors, rows))
    np.testing.assert_array_equal(got[pairs], offsets[:, rows][pairs])


@pytest.mark.reference
def test_only_degenerate_pairs_leave_offsets_to_the_float_formula():
    """The edges cover every offset up to 2**30 unless `max_position` is
    within a few percent of `mid` (then: the first 65536 buckets past it).
    test_buckets.py's sweep checks the offsets these edges determine
    (`exact_region`, from the exact formula and `EDGES_FOUND`): the same."""
    from test_buckets import EDGES_FOUND, OFFSETS, PAIRS, exact_region

    partial = [p for p in PAIRS if not _bucket_edges(*p)[1]]
    assert partial == [(128, 66), (200, 102), (256, 130), (512, 258)]
    for bucket_size, max_position in partial:
        assert max_position == bucket_size // 2 + 2
        assert _bucket_edges(bucket_size, max_position)[0][-1] > 600
    for pair in PAIRS:
        edges, complete = _bucket_edges(*pair)
        assert complete or len(edges) == EDGES_FOUND
        np.testing.assert_array_equal(
            exact_region(*pair), np.abs(OFFSETS) < (np.inf if complete else edges[-1]),
            err_msg=str(pair))


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's graph loop over the blocks")
def test_tensorflow_graph_loops_run_one_block_at_a_time(rng):
    """In a `tf.function` without XLA (what `fit` runs on a CPU-only
    machine) the block loops, forward and gradient, must run one iteration
    at a time: the executor's default, 10 at once, each holding a block's
    intermediates, took 2.4 GiB at 8192 tokens where one at a time takes
    0.4 (benchmarks/issue37_band.txt)."""
    import tensorflow as tf

    layer = RelativeAttention(8, 2, position_embedding=rng.normal(size=(9, 8)).astype("float32"),
                              sequence_positions=True)
    x = tf.constant(rng.normal(size=(1, 12, 8)).astype("float32"))

    @tf.function(autograph=False)
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, x, x, return_logits=False))
        return tape.gradient(loss, x)

    with config.block_settings(block_elements=1 * 2 * 3 * 12, recompute_elements=0) as log:
        graph = step.get_concrete_function(x).graph
    assert log.plans[0].n_blocks == 4 and log.plans[0].recomputed
    graph_def = graph.as_graph_def()
    nodes = list(graph_def.node) + [node for function in graph_def.library.function
                                    for node in function.node_def]
    loops = [node.attr["parallel_iterations"].i for node in nodes
             if node.op in ("While", "StatelessWhile")]
    assert len(loops) >= 2, loops  # the forward's loop and the gradient's
    assert set(loops) == {1}, loops
