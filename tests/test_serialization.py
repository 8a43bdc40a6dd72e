"""Config round trips, `.keras` files, functional and subclassed models."""

import json

import keras
import numpy as np

from helpers import to_numpy
from keras_relattn import RelativeAttention


def full_layer(rng, **kwargs):
    table = rng.normal(size=(11, 8)).astype("float32")
    kwargs = dict(
        position_embedding=table, n_coordinates=2, n_additional_heads=1,
        head_size=6, dropout_p=0.1, mode=("c2p", "c2c", "p2c"), **kwargs,
    )
    return RelativeAttention(16, 2, query_size=12, key_size=16, value_size=10, **kwargs)


def inputs(rng, batch=2, nq=5, nk=6):
    return dict(
        content_queries=rng.normal(size=(batch, nq, 12)).astype("float32"),
        content_keys=rng.normal(size=(batch, nk, 16)).astype("float32"),
        content_values=rng.normal(size=(batch, nk, 10)).astype("float32"),
        mask=rng.random((batch, nk)) > 0.2,
        relative_positions=rng.integers(-7, 8, size=(batch, nq, nk, 2)).astype("int32"),
    )


def test_config_round_trip_is_json_and_equal(rng):
    layer = full_layer(rng)
    data = inputs(rng)
    expected = layer(**data)
    config = layer.get_config()
    text = json.dumps(config)  # no arrays may hide in the config
    assert len(text) < 4000
    assert config["position_embedding"] is None
    assert config["position_embedding_shape"] == [11, 8]

    clone = RelativeAttention.from_config(json.loads(text))
    assert clone.get_config() == config
    clone.build()
    clone.set_weights(layer.get_weights())
    for a, b in zip(clone(**data), expected):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))

    revived = keras.saving.deserialize_keras_object(
        json.loads(json.dumps(keras.saving.serialize_keras_object(layer)))
    )
    assert isinstance(revived, RelativeAttention)
    assert revived.get_config() == config


def test_weights_are_created_by_build_with_stable_names(rng):
    layer = full_layer(rng, same_positional_key_query_proj=True)
    layer.build()
    names = sorted(v.path.split("/", 1)[1] for v in layer.weights)
    assert names == sorted([
        "head_bias", "position_embedding",
        "key/kernel", "key/bias", "query/kernel", "query/bias",
        "value/kernel", "value/bias",
        "position_key/kernel", "position_key/bias",
    ])
    assert layer.key_projection.kernel.shape == (16, 3, 6)
    assert layer.position_key_projection.kernel.shape == (2, 4, 3, 3)
    assert not layer.position_embedding.trainable
    assert len(layer.trainable_weights) == len(layer.weights) - 1


def functional_model(rng):
    q = keras.Input((None, 12), name="queries")
    k = keras.Input((None, 16), name="keys")
    v = keras.Input((None, 10), name="values")
    m = keras.Input((None,), dtype="bool", name="mask")
    rp = keras.Input((None, None, 2), dtype="int32", name="positions")
    pooled, logits = full_layer(rng)(
        q, content_keys=k, content_values=v, mask=m, relative_positions=rp
    )
    return keras.Model(
        {"queries": q, "keys": k, "values": v, "mask": m, "positions": rp},
        {"pooled": pooled, "logits": logits},
    )


def model_inputs(data):
    return {
        "queries": data["content_queries"], "keys": data["content_keys"],
        "values": data["content_values"], "mask": data["mask"],
        "positions": data["relative_positions"],
    }


def test_functional_model_saves_and_loads(rng, tmp_path):
    model = functional_model(rng)
    data = model_inputs(inputs(rng))
    expected = model(data)
    assert tuple(expected["pooled"].shape) == (2, 5, 16)
    assert tuple(expected["logits"].shape) == (2, 5, 6, 3)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)  # safe_mode=True by default
    # Other lengths than the ones seen before saving: lengths are None.
    other = model_inputs(inputs(rng, batch=3, nq=4, nk=9))
    for data_ in (data, other):
        got, want = loaded(data_), model(data_)
        for key in ("pooled", "logits"):
            np.testing.assert_array_equal(to_numpy(got[key]), to_numpy(want[key]))
    table = loaded.layers[-1].position_embedding
    np.testing.assert_array_equal(
        to_numpy(table), to_numpy(model.layers[-1].position_embedding)
    )


class Encoder(keras.Model):
    def __init__(self, n_positions=9, **kwargs):
        super().__init__(**kwargs)
        self.n_positions = n_positions
        self.embed = keras.layers.Dense(16)
        self.attention = RelativeAttention(
            16, 4, position_embedding_shape=(n_positions, 8),
            position_embedding_trainable=True,
        )
        self.head = keras.layers.Dense(3)

    def build(self, input_shape):
        self.embed.build(input_shape[0])
        self.attention.build()  # every size is known from the constructor
        self.head.build((None, None, 16))

    def call(self, inputs):
        tokens, positions = inputs
        x = self.embed(tokens)
        pooled, _ = self.attention(x, x, x, relative_positions=positions)
        return self.head(pooled)

    def get_config(self):
        return {**super().get_config(), "n_positions": self.n_positions}


def test_inside_subclassed_model_trains_and_reloads(rng, tmp_path):
    model = Encoder()
    tokens = rng.normal(size=(4, 7, 5)).astype("float32")
    positions = (np.arange(7)[None, :] - np.arange(7)[:, None])[None, :, :, None]
    positions = np.repeat(positions, 4, axis=0).astype("int32")
    targets = rng.normal(size=(4, 7, 3)).astype("float32")
    model.compile("adam", "mse")
    model((tokens, positions))  # builds the weights
    before = to_numpy(model.attention.position_embedding).copy()
    model.fit((tokens, positions), targets, epochs=2, batch_size=2, verbose=0)
    after = to_numpy(model.attention.position_embedding)
    assert np.abs(after - before).max() > 0  # the table is trained
    path = str(tmp_path / "sub.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, custom_objects={"Encoder": Encoder})
    np.testing.assert_allclose(
        to_numpy(loaded((tokens, positions))),
        to_numpy(model((tokens, positions))), atol=1e-6,
    )


def test_keyword_inputs_without_values_return_logits(rng):
    x = keras.Input((None, 8))
    rp = keras.Input((None, None, 1), dtype="int32")
    table = rng.normal(size=(5, 4)).astype("float32")
    logits = RelativeAttention(8, 2, position_embedding=table)(
        content_queries=x, relative_positions=rp
    )
    assert tuple(logits.shape) == (None, None, None, 2)
    model = keras.Model([x, rp], logits)
    out = model([rng.normal(size=(2, 3, 8)), np.zeros((2, 3, 3, 1), "int32")])
    assert tuple(out.shape) == (2, 3, 3, 2)


def test_table_from_a_backend_tensor_is_kept_as_a_weight(rng):
    table = rng.normal(size=(7, 8)).astype("float32")
    layer = RelativeAttention(8, 2, position_embedding=keras.ops.convert_to_tensor(table))
    layer.build()
    np.testing.assert_array_equal(to_numpy(layer.position_embedding), table)
    assert layer.get_config()["position_embedding_shape"] == [7, 8]
    assert "position_embedding" in [w.path.split("/")[-1] for w in layer.weights]
