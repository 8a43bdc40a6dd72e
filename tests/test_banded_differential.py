"""The banded path (`sequence_positions=True`, `return_logits=False`)
against edspdf's layer and against the per-token path, on random
configurations: outputs, and the gradients of the queries, keys, values and
every weight.

Each configuration draws every mode subset, with and without DeBERTa's
options (`position_buckets`, tied projections: compared with the per-token
path only, edspdf has neither), tables from 1 row to longer than the input,
key, query and value widths (a head size of 1, a key width equal to the
number of heads), masks of every shape with empty rows, lengths below, at
and above one block (blocks set through `config.block_settings`), and cross
attention. The per-token path is a twin layer with the same weights, given
each token's index (`query_positions`), which forms the offsets block by
block without a band.

The suite runs every `BANDED_SHARE`-th of the 120 configurations (every
8th on JAX, which compiles each; their indices differ per backend, so the
three runs cover 75 of them);
`KERAS_RELATTN_BANDED_CASES=all` runs all 120 on each, and any integer runs
that many, with `KERAS_RELATTN_BANDED_SEED` for a fresh sequence.

Tolerances, from float32 rounding: outputs and gradients agree to a few ulps
of their largest magnitude. Measured over all 120 configurations on each
backend (2026-12-07): outputs at most 5.7e-7, gradients 6.1e-6 (of the
scale), against edspdf 1.1e-5; the bars (`OUT_TOL`, `GRAD_TOL`) are about 9x
those, and far below the bugs this test found on the main of that day
(torch, a head size of 1: outputs 0.11 and gradients 0.80 off; a 1-row
table: IndexError on every backend; TensorFlow, a fully masked row: 2.4e-4).
On JAX each configuration runs compiled (`jax.jit`, 3.5 s a case; eager JAX
compiles every op of every new shape, 15 s); its eager banded path is
compared with its traces in `test_traced.py`.
"""

import os

import keras
import numpy as np
import pytest

from helpers import BACKEND, edspdf_module, input_and_weight_gradients, to_numpy
from keras_relattn import RelativeAttention, config, edspdf_state_dict, load_edspdf_state_dict
from keras_relattn.positions import sequence_positions, sequence_relative_positions
from test_adversarial import edspdf_gradients, edspdf_outputs

pytestmark = pytest.mark.reference

N_CASES = 120
BANDED_SHARE = 4
SEED = int(os.environ.get("KERAS_RELATTN_BANDED_SEED", "20261207"))
OUT_TOL = 5e-6  # times max(1, largest |output|)
GRAD_TOL = 5e-5  # times max(1, largest |gradient|) of that tensor
# edspdf computes in another order (its own einsums and softmax): its bar is
# the project's edspdf bar (tests/test_adversarial.py).
EDSPDF_OUT_TOL, EDSPDF_GRAD_TOL = 1e-4, 2e-4
MODES = [("c2c", "c2p", "p2c"), ("c2p", "p2c"), ("c2c", "c2p"), ("c2c", "p2c"), ("c2p",),
         ("p2c",), ("c2c",)]


def chosen_cases():
    wanted = os.environ.get("KERAS_RELATTN_BANDED_CASES", "")
    if wanted == "all":
        return list(range(N_CASES))
    if wanted:
        return list(range(int(wanted)))
    offset = {"tensorflow": 0, "jax": 1, "torch": 2}.get(BACKEND, 0)
    # JAX compiles each configuration (3.5 s): half its share, for CI's time.
    share = 2 * BANDED_SHARE if BACKEND == "jax" else BANDED_SHARE
    return list(range(offset, N_CASES, share))


def random_case(index):
    """`(ctor, inputs, block_rows, deberta)` of configuration `index`."""
    rng = np.random.default_rng([SEED, index])
    mode = MODES[index % len(MODES)]
    deberta = index % 3 == 0 and mode != ("c2c",)
    n_heads = int(rng.integers(1, 5))
    head_size = int(rng.choice([1, 1, 2, 3, 4]))
    key_size = n_heads * head_size if rng.random() < 0.5 else n_heads  # width = heads
    block_rows = int(rng.choice([3, 4, 8]))
    short = rng.random() < 0.25  # below, at or just above one block: no band
    n_queries = int(rng.choice([block_rows - 1, block_rows, block_rows + 1] if short
                               else [3 * block_rows + 2, 7 * block_rows, 9 * block_rows + 1]))
    cross = rng.random() < 0.3
    n_keys = int(rng.integers(max(1, n_queries // 2), 2 * n_queries + 2)) if cross else n_queries
    n_positions = int(rng.choice([1, 2, 3, int(rng.integers(4, 11))]) if rng.random() < 0.8
                      else rng.choice([n_keys + 3, 2 * n_keys + 1]))
    query_size = key_size
    ctor = dict(n_heads=n_heads, mode=mode, n_coordinates=1,
                head_bias=bool(rng.random() < 0.6),
                n_additional_heads=int(rng.integers(0, 3)))
    if deberta:
        table_size = query_size = key_size = n_heads * max(head_size, 2)
        ctor.update(head_size=max(head_size, 2), tied_position_projections=bool(rng.random() < 0.7),
                    position_buckets=[(4, 8), (4, 16), (6, 16), (8, 64)][int(rng.integers(0, 4))])
        if rng.random() < 0.2:  # DeBERTa's own table, 2 * bucket_size rows
            n_positions = 2 * ctor["position_buckets"][0]
    else:
        table_size = int(rng.choice([key_size, n_heads * 2, 6]))
        ctor.update(head_size=head_size if rng.random() < 0.5 else None,
                    same_positional_key_query_proj=bool(rng.random() < 0.2))
    value_size = int(rng.choice([key_size, n_heads, 2 * n_heads]))
    ctor.update(size=value_size, query_size=query_size, key_size=key_size, value_size=value_size)
    batch = int(rng.integers(1, 4))
    f32 = lambda *shape: rng.normal(size=shape).astype("float32")  # noqa: E731
    kind = rng.choice(["keys", "keys", "queries", "heads", "none"])
    total = n_heads  # pooling heads (a 4-D mask covers these)
    mask = {"keys": (batch, n_keys), "queries": (batch, n_queries, n_keys),
            "heads": (batch, n_queries, n_keys, total), "none": None}[kind]
    if mask is not None:
        mask = rng.random(mask) > 0.3
        if rng.random() < 0.5:
            mask[-1] = False  # a batch row that attends to nothing
        elif mask.ndim > 2:
            mask[0, 0] = False  # one query that attends to nothing
    queries = f32(batch, n_queries, query_size)
    keys = f32(batch, n_keys, key_size) if cross else queries
    inputs = dict(content_queries=queries, content_keys=keys,
                  content_values=f32(batch, n_keys, value_size), mask=mask)
    table = f32(n_positions, table_size)
    return ctor, table, inputs, block_rows, deberta, rng


def gradients_and_output(layer, inputs, probe, **call):
    """The pooled output and the gradients of `sum(output * probe)`. On
    JAX, compiled (`jax.jit`): one compilation a configuration, where eager
    JAX compiles each op of each new shape (15 s a case)."""
    wrt = ["content_queries", "content_keys", "content_values"]
    call = dict(call, return_logits=False)

    def loss(out):
        return keras.ops.sum(out * keras.ops.convert_to_tensor(probe))

    compiled = BACKEND == "jax"
    of_inputs, of_weights = input_and_weight_gradients(
        layer, loss, dict(inputs, **call), wrt, compiled=compiled)
    if compiled:
        import jax

        def run(trainable, non_trainable):
            return layer.stateless_call(trainable, non_trainable, **inputs, **call)[0]

        output = jax.jit(run)([v.value for v in layer.trainable_variables],
                              [v.value for v in layer.non_trainable_variables])
    else:
        output = layer(**inputs, **call)
    return to_numpy(output), of_inputs, of_weights


def assert_close(got, want, tol, name):
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    np.testing.assert_allclose(got, want, atol=tol * scale, rtol=0, err_msg=name)


def as_edspdf_names(layer, weight_gradients):
    """The weights' gradients under edspdf's names: a twin layer holding them
    as its weights, exported (the export maps weights linearly)."""
    twin = RelativeAttention.from_config(layer.get_config())
    twin.build()
    by_path = {w.path: g for w, g in zip(layer.trainable_weights, weight_gradients)}
    for ours, theirs in zip(layer.weights, twin.weights):
        theirs.assign(by_path.get(ours.path, np.zeros(ours.shape, "float32")))
    return edspdf_state_dict(twin)


@pytest.mark.parametrize("index", chosen_cases())
def test_banded_path_equals_the_per_token_path_and_edspdf(index):
    ctor, table, inputs, block_rows, deberta, rng = random_case(index)
    layer = RelativeAttention(position_embedding=table, position_embedding_trainable=True,
                              sequence_positions=True, **ctor)
    layer.build()
    layer.set_weights([rng.normal(0.0, 0.5, size=w.shape).astype("float32")
                       for w in layer.weights])
    twin = RelativeAttention(position_embedding=table, position_embedding_trainable=True,
                             **ctor)
    twin.build()
    twin.set_weights(layer.get_weights())
    n_queries, n_keys = inputs["content_queries"].shape[1], inputs["content_keys"].shape[1]
    batch = inputs["content_queries"].shape[0]
    probe = rng.normal(size=(batch, n_queries, ctor["size"])).astype("float32")
    with config.block_settings(block_elements=batch * (ctor["n_heads"] + 1) * n_keys * block_rows,
                               band_rows=block_rows) as log:
        banded, banded_inputs, banded_weights = gradients_and_output(layer, inputs, probe)
    token = dict(query_positions=to_numpy(sequence_positions(n_queries)),
                 key_positions=to_numpy(sequence_positions(n_keys)))
    per_token, token_inputs, token_weights = gradients_and_output(twin, inputs, probe, **token)
    assert log.plans and all(p.band_width is None or p.band_width < n_keys for p in log.plans)
    assert np.isfinite(banded).all()
    assert_close(banded, per_token, OUT_TOL, "output")
    for name in banded_inputs:
        assert_close(banded_inputs[name], token_inputs[name], GRAD_TOL, name)
    for weight, got, want in zip(layer.trainable_weights, banded_weights, token_weights):
        assert_close(got, want, GRAD_TOL, weight.path)
    if deberta:
        return
    module = edspdf_module(rng, ctor["size"], ctor["n_heads"], table=table,
                           trainable_table=True,
                           **{k: v for k, v in ctor.items() if k not in ("size", "n_heads")})
    load_edspdf_state_dict(layer, module.state_dict())  # edspdf's random weights, ours
    banded, banded_inputs, banded_weights = gradients_and_output(layer, inputs, probe)
    theirs = dict(inputs, relative_positions=to_numpy(sequence_relative_positions(
        n_queries, n_keys)), base_attn=None, no_position_mask=None)
    if theirs["mask"] is None:
        theirs["mask"] = np.ones((batch, n_keys), bool)
    want = edspdf_outputs(module, theirs)[0]
    theirs_inputs, theirs_parameters = edspdf_gradients(module, theirs, list(banded_inputs),
                                                        [probe])
    assert_close(banded, want, EDSPDF_OUT_TOL, "output against edspdf")
    for name in banded_inputs:
        assert_close(banded_inputs[name], theirs_inputs[name], EDSPDF_GRAD_TOL, name)
    ours = as_edspdf_names(layer, banded_weights)
    for name, grad in theirs_parameters.items():
        assert_close(ours[name], np.zeros_like(ours[name]) if grad is None else grad,
                     EDSPDF_GRAD_TOL, name)


def test_the_cases_cover_what_the_band_must_take():
    """Every mode subset with and without DeBERTa's options, 1- to 3-row and
    longer-than-input tables, head size 1 with key width = heads, empty mask
    rows, lengths around a block, cross attention: over the 120 cases."""
    seen = set()
    for index in range(N_CASES):
        ctor, table, inputs, block_rows, deberta, _ = random_case(index)
        n_queries, n_keys = inputs["content_queries"].shape[1], inputs["content_keys"].shape[1]
        seen.add(("mode", ctor["mode"], deberta))
        seen.add(("rows", min(len(table), 4)))
        seen.add(("longer table", len(table) > n_keys))
        seen.add(("width = heads", ctor["key_size"] == ctor["n_heads"]
                  and (ctor["head_size"] or 1) == 1))
        mask = inputs["mask"]
        seen.add(("empty row", mask is not None and not mask.reshape(len(mask), -1)[-1].any()))
        seen.add(("length", int(np.sign(n_queries - block_rows))))
        seen.add(("cross", n_keys != n_queries))
    for mode in MODES:
        assert ("mode", mode, False) in seen, mode
        if mode != ("c2c",):
            assert ("mode", mode, True) in seen, mode
    for fact in [("rows", 1), ("rows", 2), ("rows", 3), ("rows", 4), ("longer table", True),
                 ("width = heads", True), ("empty row", True), ("length", -1), ("length", 0),
                 ("length", 1), ("cross", True)]:
        assert fact in seen, fact
