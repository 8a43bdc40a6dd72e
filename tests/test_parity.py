"""Numerical parity with the real edspdf 0.10.0 RelativeAttention, both ways."""

import numpy as np
import pytest
import torch

from helpers import edspdf_module, run_edspdf, to_numpy
from keras_relattn import RelativeAttention, edspdf_state_dict, load_edspdf_state_dict
from parity_cases import CASES, ParityCase, make_case

# Compares with the real edspdf or DeBERTa: a skip here fails the run (conftest).
pytestmark = pytest.mark.reference

ATOL = 1e-4


def torch_inputs(inputs):
    out = dict(inputs)
    if out["mask"] is not None and out["mask"].dtype != bool:
        out["mask"] = out["mask"].astype(bool)  # edspdf needs a BoolTensor
    return out


def assert_close(ours, theirs):
    if isinstance(theirs, tuple):
        assert isinstance(ours, tuple) and len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            assert_close(a, b)
        return
    ours = to_numpy(ours)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_edspdf(case, rng):
    size, n_heads, table, ctor, inputs = make_case(rng, CASES[case])
    trainable = ctor.get("position_embedding_trainable", False)
    module = edspdf_module(rng, size, n_heads, table=table, trainable_table=trainable, **{
        k: v for k, v in ctor.items() if k != "position_embedding_trainable"
    })
    expected = run_edspdf(module, torch_inputs(inputs))

    layer = RelativeAttention(size, n_heads, position_embedding=table, **ctor)
    load_edspdf_state_dict(layer, module.state_dict())
    ours = layer(**inputs, training=False)
    assert_close(ours, expected)


@pytest.mark.parametrize(
    "case", ["default_1d", "cross_attention_sizes", "same_key_query_proj",
             "same_positional_proj", "additional_heads", "logits_only",
             "no_table_c2c", "three_coordinates", "mode_c2c", "mode_c2p", "mode_p2c",
             "shared_position_proj_p2c"]
)
def test_exported_weights_load_into_edspdf(case, rng):
    """Our own random weights, exported, give edspdf our outputs."""
    size, n_heads, table, ctor, inputs = make_case(rng, CASES[case])
    layer = RelativeAttention(
        size, n_heads, position_embedding=table, bias_initializer="random_normal",
        **ctor,
    )
    layer.build()
    if layer.use_head_bias:  # zeros by default: make the bias count
        layer.head_bias.assign(rng.normal(size=layer.head_bias.shape).astype("float32"))
    ours = layer(**inputs)

    module = edspdf_module(rng, size, n_heads, table=table, **ctor)
    state = {k: torch.from_numpy(v) for k, v in edspdf_state_dict(layer).items()}
    module.load_state_dict(state, strict=True)
    assert_close(ours, run_edspdf(module, torch_inputs(inputs)))


def test_mask_none_with_values_attends_to_all_keys(rng):
    """edspdf crashes on mask=None with values; we attend to every key."""
    size, n_heads, table, ctor, inputs = make_case(rng, ParityCase(n_coordinates=2))
    module = edspdf_module(rng, size, n_heads, table=table, **ctor)
    layer = load_edspdf_state_dict(
        RelativeAttention(size, n_heads, position_embedding=table, **ctor),
        module.state_dict(),
    )
    all_keys = np.ones(inputs["mask"].shape, bool)
    expected = run_edspdf(module, {**inputs, "mask": all_keys})
    assert_close(layer(**{**inputs, "mask": None}), expected)


def test_fully_masked_row_matches_edspdf(rng):
    """A query that may attend to nothing averages all values, like edspdf."""
    size, n_heads, table, ctor, inputs = make_case(rng, ParityCase(mask="3d"))
    inputs["mask"][0, 1, :] = False
    module = edspdf_module(rng, size, n_heads, table=table, **ctor)
    layer = load_edspdf_state_dict(
        RelativeAttention(size, n_heads, position_embedding=table, **ctor),
        module.state_dict(),
    )
    expected = run_edspdf(module, inputs)
    pooled, logits = layer(**inputs)
    assert np.isfinite(to_numpy(pooled)).all()
    assert_close((pooled, logits), expected)


def test_dropout_is_active_only_in_training(rng):
    size, n_heads, table, ctor, inputs = make_case(rng, ParityCase(ctor=dict(dropout_p=0.5)))
    layer = RelativeAttention(size, n_heads, position_embedding=table, seed=3, **ctor)
    inference = to_numpy(layer(**inputs, training=False)[0])
    np.testing.assert_array_equal(inference, to_numpy(layer(**inputs)[0]))
    trained = to_numpy(layer(**inputs, training=True)[0])
    assert np.isfinite(trained).all()
    assert np.abs(trained - inference).max() > 1e-3


@pytest.mark.parametrize("mode, shared, made, unused", [
    (("c2c",), False, set(), "position_key_proj"),
    (("c2c", "c2p"), False, {"position_key"}, "position_query_proj"),
    (("c2c", "p2c"), False, {"position_query"}, "position_key_proj"),
    (("c2c", "p2c"), True, {"position_key"}, None),
    (("c2p", "p2c"), False, {"position_key", "position_query"}, None),
])
def test_only_the_position_projections_a_term_reads_exist(mode, shared, made, unused, rng):
    """edspdf makes both whenever it has a table; one that no term reads
    would get no gradient. Its tensors in an edspdf state dict still load
    (shapes checked), and export writes zeros that edspdf loads strictly."""
    table = rng.normal(size=(9, 12)).astype("float32")
    ctor = dict(mode=mode, n_coordinates=2, same_positional_key_query_proj=shared)
    layer = RelativeAttention(12, 2, position_embedding=table, **ctor)
    layer.build()
    names = {v.path.split("/")[1] for v in layer.weights if "position_" in v.path}
    assert names - {"position_embedding"} == made
    module = edspdf_module(rng, 12, 2, table=table, **ctor)
    load_edspdf_state_dict(layer, module.state_dict())
    state = edspdf_state_dict(layer)
    assert set(state) == set(module.state_dict())
    module.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    if unused is not None:
        assert not state[unused + ".weight"].any()
        wrong = {**module.state_dict(), unused + ".weight": torch.zeros(1, 2, 3)}
        with pytest.raises(ValueError, match=unused + r"\.weight' has shape"):
            load_edspdf_state_dict(layer, wrong)
