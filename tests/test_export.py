"""Exported models compute what the Keras model computes, at other shapes too.

A traced Python branch on a shape (say `if length == 1`) is frozen into an
export; these tests run every export at several batch sizes and lengths.
"""

import keras
import numpy as np
import pytest

from conftest import BACKEND, to_numpy
from keras_relattn import RelativeAttention

SHAPES = [(1, 1), (2, 3), (3, 7)]  # (batch, length)


def model_and_data(rng):
    tokens = keras.Input((None, 8), name="tokens")
    positions = keras.Input((None, None, 1), dtype="int32", name="positions")
    layer = RelativeAttention(8, 2, position_embedding_shape=(9, 8))
    pooled, _ = layer(tokens, tokens, tokens, relative_positions=positions)
    model = keras.Model([tokens, positions], pooled)
    for weight in model.weights:
        weight.assign(rng.normal(size=weight.shape).astype("float32") * 0.5)

    def data(batch, length):
        x = rng.normal(size=(batch, length, 8)).astype("float32")
        offsets = np.arange(length)[None, :] - np.arange(length)[:, None]
        rel = np.broadcast_to(offsets[None, :, :, None], (batch, length, length, 1))
        return x, rel.astype("int32")

    model(list(data(1, 2)))
    return model, data


# jax2tf names each unknown dimension apart unless told that the positions'
# lengths are the tokens' length.
POLYMORPHIC = {"jax2tf_kwargs": {"polymorphic_shapes": [["(b, n, 8)", "(b, n, n, 1)"]]}}


@pytest.mark.skipif(BACKEND == "torch", reason="tf_saved_model export needs TF or JAX")
def test_tf_saved_model_with_dynamic_batch_and_length(rng, tmp_path):
    import tensorflow as tf

    model, data = model_and_data(rng)
    path = str(tmp_path / "saved")
    model.export(path, format="tf_saved_model", verbose=False,
                 **(POLYMORPHIC if BACKEND == "jax" else {}))
    served = tf.saved_model.load(path)
    for batch, length in SHAPES:
        x, rel = data(batch, length)
        got = served.serve([x, rel]).numpy()
        np.testing.assert_allclose(got, to_numpy(model([x, rel])), atol=1e-5)


@pytest.mark.skipif(BACKEND == "torch", reason="ExportArchive writes TF SavedModels: TF or JAX")
def test_export_archive_with_dynamic_batch_and_length(rng, tmp_path):
    import tensorflow as tf

    model, data = model_and_data(rng)
    archive = keras.export.ExportArchive()
    archive.track(model)
    signature = [[keras.InputSpec(shape=(None, None, 8), dtype="float32"),
                  keras.InputSpec(shape=(None, None, None, 1), dtype="int32")]]
    archive.add_endpoint("serve", model.__call__, input_signature=signature,
                         **(POLYMORPHIC if BACKEND == "jax" else {}))
    path = str(tmp_path / "archive")
    archive.write_out(path, verbose=False)
    served = tf.saved_model.load(path)
    for batch, length in SHAPES:
        x, rel = data(batch, length)
        np.testing.assert_allclose(served.serve([x, rel]).numpy(),
                                   to_numpy(model([x, rel])), atol=1e-5)


@pytest.mark.skipif(BACKEND != "torch", reason="ONNX export of the torch backend (TF: issue 12)")
def test_torch_onnx_export_at_every_length(rng, tmp_path):
    """It traced the one-key softmax shortcut as a constant: outputs were off
    by 2-4 at every length but 1."""
    ort = pytest.importorskip("onnxruntime")
    model, data = model_and_data(rng)
    path = str(tmp_path / "model.onnx")
    model.export(path, format="onnx", verbose=False)
    session = ort.InferenceSession(path)
    names = [i.name for i in session.get_inputs()]
    for batch, length in SHAPES:
        x, rel = data(batch, length)
        got = session.run(None, dict(zip(names, [x, rel])))[0]
        np.testing.assert_allclose(got, to_numpy(model([x, rel])), atol=1e-5)
