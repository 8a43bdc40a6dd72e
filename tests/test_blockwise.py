"""Training at length (issue 18): the pooled path's blocks recomputed in the
backward pass, and positions given per token.

The blocks are forced small here (`config.block_settings`), so that a few
queries already make several blocks, of lengths that do not divide the
queries; the benchmark (`benchmarks/long_training.py`) measures the memory.
"""

import keras
import numpy as np
import pytest

from helpers import (
    BACKEND,
    edspdf_module,
    edspdf_named_gradients,
    input_and_weight_gradients,
    to_numpy,
)
from keras_relattn import (
    RelativeAttention,
    RelativeTransformerLayer,
    config,
    load_edspdf_state_dict,
    positions,
)
from parity_cases import ALL_MODES
from test_adversarial import (
    FLOAT_INPUTS,
    assert_gradients_close,
    edspdf_gradients,
    edspdf_outputs,
    random_configuration,
)

# Compares with the real edspdf or DeBERTa: a skip here fails the run (conftest).
pytestmark = pytest.mark.reference

FLOAT = ("content_queries", "content_values", "base_attn")


@pytest.fixture
def small_blocks():
    """Blocks of two queries (of 7: blocks of 2, 2, 2 and 1), each recomputed
    in the backward pass: the log of what each pooled call planned."""
    with config.block_settings(block_elements=2 * 3 * 7 * 2, recompute_elements=0) as log:
        yield log.plans


def kept_blocks():
    """The same blocks, kept in the backward pass instead of recomputed."""
    return config.block_settings(recompute_elements=2**62)


def pooled_gradients(layer, inputs, probe, return_logits, compiled=False):
    def loss_fn(out):
        pooled = out[0] if return_logits else out
        return keras.ops.sum(pooled * keras.ops.convert_to_tensor(probe))

    wrt = [name for name in FLOAT if inputs.get(name) is not None]
    return input_and_weight_gradients(
        layer, loss_fn, dict(inputs, return_logits=return_logits), wrt, compiled
    )


def assert_same_gradients(a, b):
    (a_inputs, a_weights), (b_inputs, b_weights) = a, b
    assert a_inputs.keys() == b_inputs.keys()
    for name in a_inputs:
        np.testing.assert_allclose(a_inputs[name], b_inputs[name], atol=2e-5, err_msg=name)
    for i, (x, y) in enumerate(zip(a_weights, b_weights)):
        np.testing.assert_allclose(x, y, atol=2e-5, err_msg=f"weight {i}")


def case_inputs(rng, n_coordinates=2, mask="3d", base=True, npm=True, n_queries=7):
    """7 queries x 7 keys (blocks of 2 do not divide them), a fully masked row."""
    x = rng.normal(size=(3, n_queries, 12)).astype("float32")
    shape = {"2d": (3, n_queries), "3d": (3, n_queries, n_queries),
             "4d": (3, n_queries, n_queries, 2)}[mask]
    mask = rng.random(shape) > 0.3
    mask[0, 1] = False  # a query (or, 2-D, a key) that attends to nothing
    return dict(
        content_queries=x, content_keys=x, content_values=x, mask=mask,
        relative_positions=rng.integers(-6, 7, size=(3, n_queries, n_queries, n_coordinates)),
        no_position_mask=rng.random((1, n_queries, n_queries)) > 0.7 if npm else None,
        base_attn=rng.normal(size=(3, n_queries, n_queries, 3)).astype("float32")
        if base else None,
    )


def make_layer(rng, mode, n_coordinates=2, **ctor):
    layer = RelativeAttention(
        12, 2, n_coordinates=n_coordinates, mode=mode, n_additional_heads=1,
        position_embedding=rng.normal(size=(9, 6 * n_coordinates)).astype("float32"),
        position_embedding_trainable=True, bias_initializer="random_normal", **ctor,
    )
    layer.build()
    layer.head_bias.assign(rng.normal(size=layer.head_bias.shape).astype("float32"))
    return layer


@pytest.mark.parametrize("mode", ALL_MODES, ids="+".join)
def test_blockwise_gradients_equal_the_full_paths(mode, small_blocks, rng):
    layer = make_layer(rng, mode)
    inputs = case_inputs(rng)
    probe = rng.normal(size=(3, 7, 12)).astype("float32")
    full = pooled_gradients(layer, inputs, probe, return_logits=True)
    blockwise = pooled_gradients(layer, inputs, probe, return_logits=False)
    assert small_blocks == [config.BlockPlan(7, 4, True)]  # blocks of 2, 2, 2, 1 queries
    assert_same_gradients(blockwise, full)


@pytest.mark.parametrize("mask", ["2d", "3d", "4d"])
@pytest.mark.parametrize("coordinates", [1, 3])
def test_blockwise_gradients_over_masks_and_coordinates(mask, coordinates, small_blocks, rng):
    layer = make_layer(rng, ("c2c", "c2p", "p2c"), n_coordinates=coordinates)
    inputs = case_inputs(rng, n_coordinates=coordinates, mask=mask, base=mask != "2d",
                         npm=mask == "3d")
    probe = rng.normal(size=(3, 7, 12)).astype("float32")
    full = pooled_gradients(layer, inputs, probe, return_logits=True)
    assert_same_gradients(pooled_gradients(layer, inputs, probe, return_logits=False), full)
    assert small_blocks


def test_blockwise_gradients_compiled(small_blocks, rng):
    layer = make_layer(rng, ("c2c", "c2p", "p2c"))
    inputs = case_inputs(rng)
    probe = rng.normal(size=(3, 7, 12)).astype("float32")
    full = pooled_gradients(layer, inputs, probe, return_logits=True)
    assert_same_gradients(
        pooled_gradients(layer, inputs, probe, return_logits=False, compiled=True), full
    )


def split_configuration(seed):
    """A random configuration (every constructor argument, mask shape,
    `no_position_mask`, `base_attn`) with at least 3 queries, and a trainable
    table half the time: each query is its own recomputed block."""
    rng = np.random.default_rng([20261203, seed])
    while True:
        size, n_heads, table, ctor, inputs = random_configuration(rng)
        if inputs["content_queries"].shape[1] >= 3:
            return rng, size, n_heads, table, ctor, inputs


SPLIT_SEEDS = range(10)


@pytest.mark.parametrize("seed", SPLIT_SEEDS)
def test_blockwise_gradients_match_edspdf_autograd(seed):
    """The recomputed blocks (one query each: really split, as the plan
    shows) against edspdf's autograd: every float input and parameter."""
    rng, size, n_heads, table, ctor, inputs = split_configuration(seed)
    trainable = table is not None and bool(rng.random() < 0.5)
    module = edspdf_module(rng, size, n_heads, table=table, trainable_table=trainable, **ctor)
    layer = RelativeAttention(size, n_heads, position_embedding=table,
                              position_embedding_trainable=trainable, **ctor)
    load_edspdf_state_dict(layer, module.state_dict())
    wrt = [name for name in FLOAT_INPUTS if inputs[name] is not None]
    probe = rng.normal(size=edspdf_outputs(module, inputs)[0].shape).astype("float32")
    theirs_inputs, theirs_parameters = edspdf_gradients(module, inputs, wrt, [probe])
    with config.block_settings(block_elements=1, recompute_elements=0) as log:
        ours_inputs, ours_weights = input_and_weight_gradients(
            layer, lambda out: keras.ops.sum(out * keras.ops.convert_to_tensor(probe)),
            dict(inputs, return_logits=False), wrt,
        )
    n_queries = inputs["content_queries"].shape[1]
    assert log.plans == [config.BlockPlan(n_queries, n_queries, True)]
    for name in wrt:
        assert_gradients_close(ours_inputs[name], theirs_inputs[name], name)
    compared = 0
    for name, grad in edspdf_named_gradients(layer, ours_weights).trainable.items():
        assert_gradients_close(grad, theirs_parameters[name], name)
        compared += 1
    assert compared >= 2


def test_split_configurations_cover_the_modes_heads_and_masks():
    """The seeds above reach every term, additional heads, every mask shape
    and `no_position_mask`, with positions (so position terms are on)."""
    seen = set()
    for seed in SPLIT_SEEDS:
        _, _, _, table, ctor, inputs = split_configuration(seed)
        if table is not None and inputs["relative_positions"] is not None:
            seen.update(ctor["mode"])
            if inputs["no_position_mask"] is not None:
                seen.add("no_position_mask")
        seen.add(f"mask {inputs['mask'].ndim}-D")
        if ctor["n_additional_heads"]:
            seen.add("additional heads")
        if inputs["base_attn"] is not None:
            seen.add("base_attn")
    assert seen >= {"c2c", "c2p", "p2c", "no_position_mask", "mask 2-D", "mask 3-D",
                    "mask 4-D", "additional heads", "base_attn"}, seen


# Compiled where the blocks are a loop with a traced first row (JAX, TensorFlow);
# torch.compile checkpoints each block, as `test_blockwise_gradients_compiled` checks.
@pytest.mark.parametrize("compiled", [False, True] if BACKEND != "torch" else [False])
def test_recomputed_dropout_draws_the_same_mask(compiled, small_blocks, rng):
    """The gradient through recomputed blocks equals the one through blocks
    kept whole, from the same seed state: the mask drawn again in the
    backward is the forward's (compiled: the block's first row traced, in
    JAX's `lax.map` and TensorFlow's `tf.while_loop`)."""
    layer = make_layer(rng, ("c2c", "c2p", "p2c"), dropout_p=0.4, seed=3)
    inputs = dict(case_inputs(rng), training=True)
    probe = rng.normal(size=(3, 7, 12)).astype("float32")
    generators = [g for g in layer._flatten_layers() if hasattr(g, "seed_generator")]
    states = [keras.ops.convert_to_numpy(g.seed_generator.state) for g in generators]
    recomputed = pooled_gradients(layer, inputs, probe, return_logits=False, compiled=compiled)
    for g, state in zip(generators, states):
        g.seed_generator.state.assign(state)
    with kept_blocks():
        kept = pooled_gradients(layer, inputs, probe, return_logits=False, compiled=compiled)
    assert [p.recomputed for p in small_blocks] == [True, False]
    assert_same_gradients(recomputed, kept)
    assert np.abs(recomputed[1][0]).max() > 0


# Positions per token ---------------------------------------------------------


def test_position_helpers_give_the_relative_positions():
    seq = to_numpy(positions.sequence_positions(5))
    np.testing.assert_array_equal(
        seq[:, None, :, :] - seq[:, :, None, :],
        to_numpy(positions.sequence_relative_positions(5)),
    )
    grid = to_numpy(positions.grid_positions(3, 4))
    np.testing.assert_array_equal(
        grid[:, None, :, :] - grid[:, :, None, :],
        to_numpy(positions.grid_relative_positions(3, 4)),
    )


def token_case(rng, batch, n_queries, n_keys, coordinates, position_batch):
    q_pos = rng.integers(-20, 20, size=(position_batch, n_queries, coordinates))
    k_pos = rng.integers(-20, 20, size=(position_batch, n_keys, coordinates))
    offsets = k_pos[:, None, :, :] - q_pos[:, :, None, :]
    return q_pos, k_pos, offsets


@pytest.mark.parametrize("coordinates", [1, 2, 3])
@pytest.mark.parametrize("position_batch", [1, 2])
def test_token_positions_equal_relative_positions(coordinates, position_batch, rng):
    layer = RelativeAttention(
        12, 2, n_coordinates=coordinates, n_additional_heads=1,
        position_embedding=rng.normal(size=(11, 6 * coordinates)).astype("float32"),
    )
    q = rng.normal(size=(2, 5, 12)).astype("float32")
    k = rng.normal(size=(2, 7, 12)).astype("float32")
    q_pos, k_pos, offsets = token_case(rng, 2, 5, 7, coordinates, position_batch)
    common = dict(content_queries=q, content_keys=k, content_values=k,
                  mask=rng.random((2, 7)) > 0.2)
    want = layer(**common, relative_positions=offsets)
    got = layer(**common, query_positions=q_pos, key_positions=k_pos)
    for a, b in zip(got, want):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), atol=1e-5)
    want_pooled = to_numpy(want[0])
    for elements in (None, 2 * 2 * 7):
        with config.block_settings(block_elements=elements) as log:
            pooled = layer(**common, query_positions=q_pos, key_positions=k_pos,
                           return_logits=False)
        assert log.plans[0].n_blocks == (1 if elements is None else 5)  # a query a block
        np.testing.assert_allclose(to_numpy(pooled), want_pooled, atol=1e-5)


def test_token_positions_default_to_the_queries_in_self_attention(rng):
    layer = RelativeAttention(8, 2, position_embedding=rng.normal(size=(9, 8)).astype("float32"))
    x = rng.normal(size=(2, 6, 8)).astype("float32")
    want = layer(x, x, x, relative_positions=positions.sequence_relative_positions(6))
    got = layer(x, x, x, query_positions=positions.sequence_positions(6))
    for a, b in zip(got, want):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), atol=1e-5)


def test_token_positions_gradients_equal_relative_positions(small_blocks, rng):
    layer = make_layer(rng, ("c2c", "c2p", "p2c"))
    inputs = case_inputs(rng)
    grid = positions.grid_positions(1, 7)
    offsets = to_numpy(positions.grid_relative_positions(1, 7))
    probe = rng.normal(size=(3, 7, 12)).astype("float32")
    by_offsets = pooled_gradients(layer, dict(inputs, content_keys=None,
                                              relative_positions=offsets), probe,
                                  return_logits=False)
    by_tokens = pooled_gradients(
        layer, dict(inputs, content_keys=None, relative_positions=None,
                    query_positions=to_numpy(grid)), probe,
        return_logits=False,
    )
    assert_same_gradients(by_tokens, by_offsets)


def test_transformer_layer_takes_token_positions(rng):
    layer = RelativeTransformerLayer(16, 2, position_embedding_shape=(9, 8), init_resweight=0.3)
    layer.build()
    for w in layer.weights:
        w.assign(rng.normal(0, 0.3, size=w.shape).astype("float32"))
    x = rng.normal(size=(2, 6, 16)).astype("float32")
    want = layer(x, relative_positions=positions.grid_relative_positions(2, 3))
    got = layer(x, positions=positions.grid_positions(2, 3))
    for a, b in zip(got, want):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), atol=1e-5)
    alone = layer(x, positions=positions.grid_positions(2, 3), return_logits=False)
    np.testing.assert_allclose(to_numpy(alone), to_numpy(want[0]), atol=1e-5)


def test_token_positions_in_a_functional_model_and_a_keras_file(rng, tmp_path):
    tokens = keras.Input((None, 8))
    coords = keras.Input((None, 2), dtype="int32")
    layer = RelativeAttention(8, 2, n_coordinates=2,
                              position_embedding=rng.normal(size=(9, 8)).astype("float32"))
    out = layer(tokens, tokens, tokens, query_positions=coords, return_logits=False)
    model = keras.Model([tokens, coords], out)
    x = rng.normal(size=(2, 6, 8)).astype("float32")
    grid = np.broadcast_to(to_numpy(positions.grid_positions(2, 3)), (2, 6, 2)).copy()
    want = to_numpy(model([x, grid]))
    np.testing.assert_allclose(
        want, to_numpy(layer(x, x, x, relative_positions=positions.grid_relative_positions(2, 3))[0]),
        atol=1e-5,
    )
    path = str(tmp_path / "tokens.keras")
    model.save(path)
    again = keras.saving.load_model(path)
    np.testing.assert_allclose(to_numpy(again([x, grid])), want, atol=1e-6)


@pytest.mark.parametrize("call, error, match", [
    (dict(relative_positions=np.zeros((1, 4, 4, 1), "int32"),
          query_positions=np.zeros((1, 4, 1), "int32")), ValueError, "one form"),
    (dict(key_positions=np.zeros((1, 4, 1), "int32")), ValueError,
     "got only `key_positions`"),
    (dict(query_positions=np.zeros((1, 5, 1), "int32")), ValueError,
     r"`query_positions` has shape \(1, 5, 1\)"),
    (dict(query_positions=np.zeros((1, 4, 1), "int32"),
          key_positions=np.zeros((1, 4, 2), "int32")), ValueError,
     r"`key_positions` has shape \(1, 4, 2\)"),
    (dict(query_positions=np.zeros((1, 4, 1), "float32")), TypeError,
     "`query_positions` must have an integer dtype"),
])
def test_token_position_errors_name_the_argument(call, error, match):
    layer = RelativeAttention(8, 2, position_embedding=np.zeros((9, 8), "float32"))
    x = np.ones((2, 4, 8), "float32")
    with pytest.raises(error, match=match):
        layer(x, x, x, **call)


def test_cross_attention_needs_both_token_positions():
    layer = RelativeAttention(8, 2, position_embedding=np.zeros((9, 8), "float32"))
    q, k = np.ones((2, 4, 8), "float32"), np.ones((2, 3, 8), "float32")
    with pytest.raises(ValueError, match="got only `query_positions`"):
        layer(q, k, k, query_positions=np.zeros((1, 4, 1), "int32"))
