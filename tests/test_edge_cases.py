"""Edge inputs get correct answers; files and checkpoints from elsewhere fail clearly."""

import json
import zipfile

import keras
import numpy as np
import pytest

from helpers import gradients, to_numpy
from keras_relattn import RelativeAttention, edspdf_state_dict, load_edspdf_state_dict
from reference import reference_attention, weights_of


def random_layer(rng, **kwargs):
    kwargs.setdefault("position_embedding", rng.normal(size=(9, 8)).astype("float32"))
    layer = RelativeAttention(8, 2, n_coordinates=2, **kwargs)
    layer.build()
    if layer.use_head_bias:
        layer.head_bias.assign(rng.normal(size=layer.head_bias.shape).astype("float32"))
    return layer


def test_fully_masked_rows_are_finite_in_forward_and_backward(rng):
    layer = random_layer(rng)
    x = rng.normal(size=(2, 4, 8)).astype("float32")
    mask = np.ones((2, 4, 4), bool)
    mask[0, 2] = False  # query 2 of sample 0 may attend to nothing
    mask[1] = False  # sample 1 may attend to nothing at all
    rp = rng.integers(-5, 6, size=(2, 4, 4, 2)).astype("int32")
    pooled, _ = layer(x, x, x, mask=mask, relative_positions=rp)
    pooled = to_numpy(pooled)
    assert np.isfinite(pooled).all()
    # Documented: such a query averages every value uniformly (edspdf's rule).
    values = to_numpy(layer.value_projection(x)).reshape(2, 4, 8)
    np.testing.assert_allclose(pooled[0, 2], values[0].mean(0), atol=1e-5)
    np.testing.assert_allclose(pooled[1], np.broadcast_to(values[1].mean(0), (4, 8)), atol=1e-5)
    grads = gradients(
        layer, lambda out: keras.ops.sum(out[0]) + keras.ops.sum(out[1]),
        dict(content_queries=x, content_keys=x, content_values=x, mask=mask,
             relative_positions=rp),
    )
    assert all(np.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("shape", [(0, 3, 3), (2, 0, 3), (2, 3, 0), (2, 0, 0)])
def test_empty_batch_queries_or_keys(shape, rng):
    b, nq, nk = shape
    layer = random_layer(rng)
    q = np.zeros((b, nq, 8), "float32")
    k = np.zeros((b, nk, 8), "float32")
    rp = np.zeros((b, nq, nk, 2), "int32")
    pooled, logits = layer(q, k, k, relative_positions=rp, mask=np.ones((b, nk), bool))
    assert tuple(pooled.shape) == (b, nq, 8)
    assert tuple(logits.shape) == (b, nq, nk, 2)
    assert np.all(to_numpy(pooled) == 0)  # no key: nothing to pool


def test_batch_one_positions_and_no_position_mask_broadcast(rng):
    layer = random_layer(rng)
    x = rng.normal(size=(3, 5, 8)).astype("float32")
    rp = rng.integers(-6, 7, size=(1, 5, 5, 2)).astype("int32")
    npm = rng.random((1, 5, 5)) > 0.5
    pooled, logits = layer(x, x, x, relative_positions=rp, no_position_mask=npm)
    tiled = layer(
        x, x, x, relative_positions=np.repeat(rp, 3, 0), no_position_mask=np.repeat(npm, 3, 0)
    )
    np.testing.assert_array_equal(to_numpy(logits), to_numpy(tiled[1]))
    np.testing.assert_array_equal(to_numpy(pooled), to_numpy(tiled[0]))


@pytest.mark.parametrize("dtype", ["int32", "int64", "uint8", "int16"])
def test_position_dtypes(dtype, rng):
    layer = random_layer(rng)
    x = rng.normal(size=(2, 4, 8)).astype("float32")
    rp = rng.integers(0, 4, size=(2, 4, 4, 2))
    want = layer(x, relative_positions=rp.astype("int32"))
    got = layer(x, relative_positions=rp.astype(dtype))
    np.testing.assert_array_equal(to_numpy(got), to_numpy(want))


@pytest.mark.parametrize("dtype", ["bool", "int32", "int64", "float32"])
def test_mask_dtypes(dtype, rng):
    layer = random_layer(rng)
    x = rng.normal(size=(2, 4, 8)).astype("float32")
    mask = rng.random((2, 4)) > 0.4
    want = to_numpy(layer(x, x, x, mask=mask)[0])
    got = to_numpy(layer(x, x, x, mask=mask.astype(dtype))[0])
    np.testing.assert_array_equal(got, want)


def test_far_out_of_range_positions_clamp(rng):
    """Offsets beyond the table, int64 beyond int32 included, use its ends."""
    layer = random_layer(rng)
    x = rng.normal(size=(1, 3, 8)).astype("float32")
    far = np.full((1, 3, 3, 2), 2**40, "int64")
    far[..., 1] = -(2**40)
    edge = np.zeros_like(far, dtype="int32")
    edge[..., 0], edge[..., 1] = 4, -4  # table of 9: offsets -4..4
    np.testing.assert_array_equal(
        to_numpy(layer(x, relative_positions=far)), to_numpy(layer(x, relative_positions=edge))
    )
    expected = reference_attention(weights_of(layer), layer.get_config(), x,
                                   relative_positions=far)
    np.testing.assert_allclose(to_numpy(layer(x, relative_positions=far)), expected, atol=1e-4)


def test_head_size_one_with_length_equal_to_heads(rng):
    """Regression: Keras' TF `ops.add` misroutes a (heads, 1) bias (see _Projection)."""
    layer = RelativeAttention(3, 3, head_size=1, n_additional_heads=2,
                              bias_initializer="random_normal")
    layer.build()
    x = rng.normal(size=(1, 5, 3)).astype("float32")  # 5 = 3 + 2 heads
    expected = reference_attention(weights_of(layer), layer.get_config(), x)
    np.testing.assert_allclose(to_numpy(layer(x)), expected, atol=1e-5)


def tampered_file(tmp_path, edit):
    inputs = keras.Input((None, 8))
    model = keras.Model(inputs, RelativeAttention(8, 2, name="attention")(inputs, inputs, inputs)[0])
    path = str(tmp_path / "model.keras")
    model.save(path)
    with zipfile.ZipFile(path) as z:
        files = {name: z.read(name) for name in z.namelist()}
    config = json.loads(files["config.json"])
    for layer in config["config"]["layers"]:
        if layer["config"].get("name") == "attention":
            edit(layer["config"])
    files["config.json"] = json.dumps(config).encode()
    bad = str(tmp_path / "tampered.keras")
    with zipfile.ZipFile(bad, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return bad


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda c: c.update(size=9), "`size` (9) must be divisible by `n_heads`"),
        (lambda c: c.update(mode=["c2c", "c3p"]), "unknown term"),
        (lambda c: c.update(n_coordinates=0), "`n_coordinates` must be >= 1"),
    ],
)
def test_tampered_keras_file_fails_with_the_layers_error(edit, words, tmp_path):
    path = tampered_file(tmp_path, edit)
    with pytest.raises(Exception) as info:
        keras.saving.load_model(path)  # safe mode
    assert words in str(info.value)


def test_untampered_file_loads_in_safe_mode(tmp_path):
    path = tampered_file(tmp_path, lambda c: None)
    model = keras.saving.load_model(path, safe_mode=True)
    assert model.get_layer("attention").size == 8


def test_porting_lists_every_problem(rng):
    layer = random_layer(rng)
    state = edspdf_state_dict(layer)
    del state["content_key_proj.bias"]
    state["unexpected.weight"] = np.zeros(3)
    state["position_key_proj.weight"] = np.zeros((2, 4, 5))
    with pytest.raises(ValueError) as info:
        load_edspdf_state_dict(random_layer(rng), state)
    message = str(info.value)
    assert "missing key 'content_key_proj.bias' of shape (8,)" in message
    assert "unexpected key 'unexpected.weight'" in message
    assert "'position_key_proj.weight' has shape (2, 4, 5), expected (2, 4, 4)" in message


def test_porting_rejects_shared_copies_that_differ(rng):
    layer = random_layer(rng, same_key_query_proj=True)
    state = edspdf_state_dict(layer)
    state["content_query_proj.bias"] = state["content_query_proj.bias"] + 1
    with pytest.raises(ValueError, match="differs from 'content_key_proj.bias'"):
        load_edspdf_state_dict(random_layer(rng, same_key_query_proj=True), state)


def test_porting_an_unsupported_layer_names_the_ones_it_takes():
    with pytest.raises(TypeError, match="RelativeAttention, RelativeTransformerLayer or BoxTransformer"):
        edspdf_state_dict(keras.layers.Dense(2))
