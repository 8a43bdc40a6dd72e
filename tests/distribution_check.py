"""RelativeAttention under keras.distribution, on 8 virtual CPU devices (JAX).

Run by tests/test_distribution.py in its own process, since the device count
is fixed when JAX starts:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 KERAS_BACKEND=jax \
        python tests/distribution_check.py

Compares DataParallel and ModelParallel (heads sharded by a LayoutMap) with the
single-device run: predictions, and the weights after two SGD steps.
"""

import os

os.environ["KERAS_BACKEND"] = "jax"
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = flags + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec  # noqa: E402

from keras_relattn import RelativeAttention  # noqa: E402


def build():
    tokens = keras.Input((None, 32), name="tokens")
    positions = keras.Input((None, None, 2), dtype="int32", name="positions")
    pooled, _ = RelativeAttention(
        32, 4, position_embedding_shape=(17, 32), n_coordinates=2,
        position_embedding_trainable=True, name="attention",
    )(tokens, tokens, tokens, relative_positions=positions)
    return keras.Model([tokens, positions], keras.layers.Dense(8, name="head")(pooled))


def layout_map(mesh):
    layouts = keras.distribution.LayoutMap(mesh)
    # Heads are the second axis of every projection kernel: shard them.
    layouts["attention/(query|key|value)/kernel"] = (None, "model", None)
    layouts["attention/(query|key|value)/bias"] = ("model", None)
    layouts["attention/position_(query|key)/kernel"] = (None, None, "model", None)
    layouts["attention/position_(query|key)/bias"] = (None, "model", None)
    layouts["attention/head_bias"] = ("model",)
    return layouts


def run(model, weights, data, target):
    model.set_weights(weights)
    predicted = model.predict(data, batch_size=8, verbose=0)
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit(data, target, batch_size=8, epochs=1, shuffle=False, verbose=0)
    return predicted, [np.asarray(w) for w in model.get_weights()]


def compare(name, got, want):
    predicted, weights = got
    err = np.abs(predicted - want[0]).max()
    werr = max(np.abs(a - b).max() for a, b in zip(weights, want[1]))
    print(f"{name}: max |prediction diff| {err:.2e}, max |weight diff after fit| {werr:.2e}")
    assert err < 1e-5 and werr < 1e-5, name


def main():
    devices = jax.devices("cpu")
    assert len(devices) == 8, devices
    rng = np.random.default_rng(0)
    data = [rng.normal(size=(16, 6, 32)).astype("float32"),
            rng.integers(-9, 10, size=(16, 6, 6, 2)).astype("int32")]
    target = rng.normal(size=(16, 6, 8)).astype("float32")

    keras.utils.set_random_seed(0)
    reference_model = build()
    weights = reference_model.get_weights()
    reference = run(reference_model, weights, data, target)

    data_parallel = keras.distribution.DataParallel(devices=devices)
    with data_parallel.scope():
        compare("DataParallel (8 devices)", run(build(), weights, data, target), reference)

    mesh = keras.distribution.DeviceMesh((2, 4), ["batch", "model"], devices)
    model_parallel = keras.distribution.ModelParallel(
        layout_map=layout_map(mesh), batch_dim_name="batch"
    )
    with model_parallel.scope():
        model = build()
        attention = model.get_layer("attention")
        spec = attention.key_projection.kernel.value.sharding.spec
        assert spec == PartitionSpec(None, "model", None), spec
        spec = attention.position_key_projection.kernel.value.sharding.spec
        assert spec == PartitionSpec(None, None, "model", None), spec
        compare("ModelParallel (2 x 4 mesh, heads sharded)",
                run(model, weights, data, target), reference)
    print("distribution ok")


if __name__ == "__main__":
    main()
