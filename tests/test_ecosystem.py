"""positions helpers, the sinusoidal table and the transformer layer."""

import keras
import numpy as np
import pytest
import torch

from helpers import to_numpy
from keras_relattn import (
    PositionTable, RelativeTransformerLayer, edspdf_state_dict, load_edspdf_state_dict,
    sinusoidal_table,
)
from keras_relattn.positions import (
    box_relative_positions, grid_relative_positions,
    sequence_relative_positions,
)
from keras_relattn.transformer import get_activation

# Compares with the real edspdf or DeBERTa: a skip here fails the run (conftest).
pytestmark = pytest.mark.reference


def test_sequence_positions():
    p = to_numpy(sequence_relative_positions(4, 6))
    assert p.shape == (1, 4, 6, 1) and p.dtype == np.int32
    np.testing.assert_array_equal(p[0, :, :, 0], np.arange(6)[None] - np.arange(4)[:, None])
    assert to_numpy(sequence_relative_positions(3)).shape == (1, 3, 3, 1)


def test_grid_positions():
    h, w = 3, 4
    p = to_numpy(grid_relative_positions(h, w))
    assert p.shape == (1, 12, 12, 2) and p.dtype == np.int32
    rows, cols = np.divmod(np.arange(12), w)
    np.testing.assert_array_equal(p[0, :, :, 0], cols[None] - cols[:, None])
    np.testing.assert_array_equal(p[0, :, :, 1], rows[None] - rows[:, None])


def random_pages(rng, pages=3, boxes=7):
    x0 = rng.uniform(0, 0.8, size=(pages, boxes)).astype("float32")
    y0 = rng.uniform(0, 0.9, size=(pages, boxes)).astype("float32")
    x1 = x0 + rng.uniform(0.01, 0.2, size=x0.shape).astype("float32")
    y1 = y0 + rng.uniform(0.005, 0.05, size=y0.shape).astype("float32")
    # Some boxes on the same line, some overlapping vertically.
    y0[:, 1], y1[:, 1] = y0[:, 0], y1[:, 0]
    y0[:, 2] = y0[:, 0] + 0.002
    return x0, y0, x1, y1


@pytest.mark.parametrize("seed", range(5))
def test_box_positions_equal_edspdf(seed):
    from edspdf.utils.torch import compute_pdf_relative_positions

    rng = np.random.default_rng(seed)
    x0, y0, x1, y1 = random_pages(rng)
    width, height = x1 - x0, y1 - y0
    want = compute_pdf_relative_positions(
        *(torch.as_tensor(a) for a in (x0, y0, x1, y1, width, height)),
        n_relative_positions=64,
    ).numpy()
    got = to_numpy(box_relative_positions(x0, y0, x1, y1, width, height, 64))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want)
    assert np.abs(want[..., 1]).max() > 1  # the layouts exercise the y rule


@pytest.mark.parametrize("n, size, temperature", [(16, 8, 10000.0), (50, 32, 100.0)])
def test_sinusoidal_table_equals_edspdf(n, size, temperature):
    from edspdf.layers.sinusoidal_embedding import SinusoidalEmbedding

    want = SinusoidalEmbedding(n, size, temperature).weight.numpy()
    got = sinusoidal_table(n, size, temperature)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-6)


def edspdf_layer(rng, size, heads, table, **kwargs):
    from edspdf.layers.box_transformer import BoxTransformerLayer

    module = BoxTransformerLayer(size, num_heads=heads, position_embedding=table, **kwargs)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.tensor(rng.normal(0, 0.3, size=p.shape)))
    return module.eval()


@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("trainable_table", [False, True])
def test_transformer_layer_matches_edspdf_both_ways(activation, trainable_table, rng):
    size, heads, b, n = 16, 2, 3, 6
    table = rng.normal(size=(9, 8)).astype("float32")
    t = torch.tensor(table)
    module = edspdf_layer(rng, size, heads, torch.nn.Parameter(t) if trainable_table else t,
                          activation=activation, init_resweight=0.3)
    x = rng.normal(size=(b, n, size)).astype("float32")
    mask = rng.random((b, n)) > 0.2
    rel = rng.integers(-6, 7, size=(b, n, n, 2))
    npm = rng.random((b, n, n)) > 0.7
    with torch.no_grad():
        want = module(torch.tensor(x), torch.tensor(mask), torch.tensor(rel), torch.tensor(npm))
    ours = RelativeTransformerLayer(size, heads, activation=activation,
                                    position_embedding_shape=(9, 8))
    load_edspdf_state_dict(ours, module.state_dict())
    got = ours(x, mask=mask, relative_positions=rel, no_position_mask=npm)
    for g, w in zip(got, want):
        np.testing.assert_allclose(to_numpy(g), w.numpy(), atol=1e-4)

    # And back: our random weights into edspdf.
    other = RelativeTransformerLayer(size, heads, activation=activation, init_resweight=0.5,
                                     position_embedding=table)
    mine = other(x, mask=mask, relative_positions=rel)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in edspdf_state_dict(other).items()},
                           strict=True)
    with torch.no_grad():
        back = module(torch.tensor(x), torch.tensor(mask), torch.tensor(rel))
    for g, w in zip(mine, back):
        np.testing.assert_allclose(to_numpy(g), w.numpy(), atol=1e-4)


def test_transformer_rejects_glu_and_unknown_activations():
    with pytest.raises(ValueError, match="activation"):
        RelativeTransformerLayer(8, activation="glu")
    with pytest.raises(ValueError, match="`activation`.*'no_such'"):
        RelativeTransformerLayer(8, activation="no_such")


@pytest.mark.parametrize("name, approximate", [("gelu", "none"), ("gelu_tanh", "tanh")])
def test_gelu_activations_equal_torch(name, approximate):
    """"gelu" is torch's exact erf form (edspdf's default, and ONNX has `Erf`,
    not the `Erfc` of Keras' TensorFlow gelu); "gelu_tanh" its approximation."""
    x = np.linspace(-12, 12, 2001).astype("float32")
    want = torch.nn.functional.gelu(torch.tensor(x), approximate=approximate).numpy()
    got = to_numpy(get_activation(name)(keras.ops.convert_to_tensor(x)))
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)


def test_any_keras_activation_runs_and_round_trips(rng, tmp_path):
    x = rng.normal(size=(2, 5, 16)).astype("float32")
    rel = rng.integers(-4, 5, size=(2, 5, 5, 2))
    outputs = {}
    for activation in ("gelu", "silu"):
        layer = RelativeTransformerLayer(16, 2, activation=activation, init_resweight=0.5,
                                         position_embedding_shape=(9, 8))
        layer.build()
        weights = np.random.default_rng(0)  # the same weights for both
        for weight in layer.weights:
            weight.assign(weights.normal(size=weight.shape).astype("float32"))
        outputs[activation] = to_numpy(layer(x, relative_positions=rel)[0])
        clone = RelativeTransformerLayer.from_config(layer.get_config())
        assert clone.get_config()["activation"] == activation
    assert np.abs(outputs["gelu"] - outputs["silu"]).max() > 1e-4


def test_stacked_layers_share_one_table_and_round_trip(rng, tmp_path):
    embeds = keras.Input((None, 16))
    positions = keras.Input((None, None, 2), dtype="int32")
    table = PositionTable(9, 8, name="table")(embeds)
    x = embeds
    for i in range(2):
        x, _ = RelativeTransformerLayer(16, 2, init_resweight=0.5,
                                        position_embedding_shape=(None, 8),
                                        name=f"layer_{i}")(
            x, relative_positions=positions, position_embedding=table)
    model = keras.Model([embeds, positions], x)
    assert sum(tuple(w.shape) == (9, 8) for w in model.weights) == 1
    data = [rng.normal(size=(2, 5, 16)).astype("float32"),
            rng.integers(-5, 6, size=(2, 5, 5, 2)).astype("int32")]
    path = str(tmp_path / "stack.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert sum(tuple(w.shape) == (9, 8) for w in loaded.weights) == 1
    np.testing.assert_allclose(to_numpy(loaded(data)), to_numpy(model(data)), atol=1e-6)


def test_transformer_config_round_trip(rng):
    layer = RelativeTransformerLayer(16, 4, head_size=6, activation="relu", n_coordinates=3,
                                     position_embedding=rng.normal(size=(5, 9)).astype("float32"),
                                     attention_mode=("c2p", "p2c"))
    config = layer.get_config()
    clone = RelativeTransformerLayer.from_config(config)
    assert clone.get_config() == config
    x = rng.normal(size=(1, 4, 16)).astype("float32")
    rel = rng.integers(-3, 4, size=(1, 4, 4, 3)).astype("int32")
    want = layer(x, relative_positions=rel)
    clone.build()
    clone.set_weights(layer.get_weights())
    for a, b in zip(clone(x, relative_positions=rel), want):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
