"""Numerical parity with the real edspdf 0.10.0 RelativeAttention, both ways."""

import itertools

import numpy as np
import pytest

from conftest import edspdf_module, run_edspdf, to_numpy
from keras_relattn import RelativeAttention, edspdf_state_dict, load_edspdf_state_dict

torch = pytest.importorskip("torch")

ATOL = 1e-4
ALL_MODES = [
    modes
    for r in (1, 2, 3)
    for modes in itertools.combinations(("c2c", "c2p", "p2c"), r)
]

BASE = dict(
    size=16, n_heads=2, n_positions=9, n_coordinates=1, batch=3, n_queries=5,
    n_keys=5, cross=False, query_size=None, key_size=None, value_size=None,
    table=True, positions=True, position_batch=None, position_range=6,
    mask="keys", no_position_mask=False, base_attn=False, values=True,
    ctor={},
)

CASES = {
    "default_1d": {},
    "two_coordinates": dict(n_coordinates=2),
    "three_coordinates": dict(n_coordinates=3, size=24, n_heads=2),
    "cross_attention_sizes": dict(
        cross=True, n_queries=4, n_keys=7, query_size=12, key_size=20,
        value_size=10, size=16,
    ),
    "cross_2d": dict(cross=True, n_queries=6, n_keys=3, n_coordinates=2),
    "head_size_not_default": dict(ctor=dict(head_size=6), n_coordinates=2),
    "head_size_3coords": dict(ctor=dict(head_size=12), n_coordinates=3),
    "same_key_query_proj": dict(ctor=dict(same_key_query_proj=True)),
    "same_positional_proj": dict(
        ctor=dict(same_positional_key_query_proj=True), n_coordinates=2
    ),
    "additional_heads": dict(ctor=dict(n_additional_heads=2), n_coordinates=2),
    "no_head_bias": dict(ctor=dict(head_bias=False)),
    "mask_3d": dict(mask="3d"),
    "mask_4d": dict(mask="4d", ctor=dict(n_additional_heads=1)),
    "mask_int": dict(mask="int"),
    "no_position_mask": dict(no_position_mask=True, n_coordinates=2),
    "base_attn": dict(base_attn=True, ctor=dict(n_additional_heads=1)),
    "clamped_positions": dict(position_range=40),
    "even_table": dict(n_positions=8, position_range=12),
    "one_position": dict(n_positions=1),
    "positions_batch_1": dict(position_batch=1, n_coordinates=2),
    "logits_only": dict(values=False, ctor=dict(do_pooling=False)),
    "logits_only_with_pooling_layer": dict(values=False),
    "positions_not_given": dict(positions=False),
    "no_table_c2c": dict(table=False, positions=False, ctor=dict(mode=("c2c",))),
    "dropout_inference": dict(ctor=dict(dropout_p=0.3)),
    "trainable_table": dict(n_coordinates=2, ctor=dict(position_embedding_trainable=True)),
    "batch_1": dict(batch=1, n_queries=1, n_keys=1),
    "shared_position_proj_p2c": dict(
        ctor=dict(mode=("c2c", "p2c"), same_positional_key_query_proj=True),
        n_coordinates=2,
    ),
}
for modes in ALL_MODES:
    CASES["mode_" + "_".join(modes)] = dict(ctor=dict(mode=modes), n_coordinates=2)


def make_case(rng, **overrides):
    spec = {**BASE, **overrides}
    size, n_heads = spec["size"], spec["n_heads"]
    query_size = spec["query_size"] or size
    key_size = spec["key_size"] or size
    value_size = spec["value_size"] or key_size
    b, nq = spec["batch"], spec["n_queries"]
    nk = spec["n_keys"] if spec["cross"] else nq
    x = spec["n_coordinates"]
    ctor = dict(spec["ctor"])
    ctor.update(
        query_size=spec["query_size"], key_size=spec["key_size"],
        value_size=spec["value_size"], n_coordinates=x,
    )
    n_add = ctor.get("n_additional_heads", 0)
    table = None
    if spec["table"]:
        table = rng.normal(size=(spec["n_positions"], 2 * 3 * x)).astype("float32")
    f32 = lambda *shape: rng.normal(size=shape).astype("float32")  # noqa: E731
    inputs = dict(content_queries=f32(b, nq, query_size))
    inputs["content_keys"] = f32(b, nk, key_size) if spec["cross"] else None
    inputs["content_values"] = f32(b, nk, value_size) if spec["values"] else None
    mask = {
        "keys": lambda: rng.random((b, nk)) > 0.3,
        "int": lambda: (rng.random((b, nk)) > 0.3).astype("int32"),
        "3d": lambda: rng.random((b, nq, nk)) > 0.3,
        "4d": lambda: rng.random((b, nq, nk, n_heads)) > 0.3,
    }[spec["mask"]]()
    inputs["mask"] = mask
    if spec["positions"]:
        pb = spec["position_batch"] or b
        r = spec["position_range"]
        inputs["relative_positions"] = rng.integers(-r, r + 1, size=(pb, nq, nk, x))
    else:
        inputs["relative_positions"] = None
    inputs["no_position_mask"] = (
        rng.random((b, nq, nk)) > 0.6 if spec["no_position_mask"] else None
    )
    inputs["base_attn"] = (
        f32(b, nq, nk, n_heads + n_add) if spec["base_attn"] else None
    )
    return size, n_heads, table, ctor, inputs


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
    size, n_heads, table, ctor, inputs = make_case(rng, **CASES[case])
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
    size, n_heads, table, ctor, inputs = make_case(rng, **CASES[case])
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
    size, n_heads, table, ctor, inputs = make_case(rng, n_coordinates=2)
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
    size, n_heads, table, ctor, inputs = make_case(rng, mask="3d")
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
    size, n_heads, table, ctor, inputs = make_case(rng, ctor=dict(dropout_p=0.5))
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
