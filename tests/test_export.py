"""Exported models compute what the Keras model computes, at other shapes too.

The model is the one a user serves: token ids -> embedding ->
`RelativeTransformerLayer` -> dense, the relative positions a second input.
A traced Python branch on a shape (say `if length == 1`) is frozen into an
export; every export runs at several batch sizes and lengths, through both
of the layer's paths (`return_logits=False`, the pooled-only path, and the
full path whose logits feed the pooling).

Which backend exports which format (Keras 3.15, what the README's "Serving"
section states): `tf_saved_model` and `ExportArchive` on TensorFlow and JAX,
`onnx` on TensorFlow and torch, `litert` on TensorFlow.
"""

import warnings

import keras
import numpy as np
import pytest

from helpers import BACKEND, to_numpy
from keras_relattn import RelativeTransformerLayer

SHAPES = [(1, 1), (2, 3), (3, 7)]  # (batch, length)
# return_logits, and the positions' form: `(b, n, n, 1)` offsets, or `(b, n, 1)`
# coordinates per token (`positions=`, offsets formed inside, block by block).
PATHS = {"pooled_only": (False, "offsets"), "full": (True, "offsets"),
         "pooled_only_per_token": (False, "tokens")}
ATOL = 1e-5


def model_and_data(rng, return_logits, form="offsets"):
    ids = keras.Input((None,), dtype="int32", name="ids")
    shape = (None, None, 1) if form == "offsets" else (None, 1)
    positions = keras.Input(shape, dtype="int32", name="positions")
    x = keras.layers.Embedding(20, 8)(ids)
    block = RelativeTransformerLayer(
        8, 2, n_coordinates=1, position_embedding_shape=(9, 8), init_resweight=0.5
    )
    given = dict(relative_positions=positions) if form == "offsets" else dict(positions=positions)
    x = block(x, **given, return_logits=return_logits)
    x = x[0] if return_logits else x
    model = keras.Model([ids, positions], keras.layers.Dense(3)(x))
    for weight in model.weights:
        weight.assign(rng.normal(size=weight.shape).astype("float32") * 0.5)

    def data(batch, length):
        tokens = rng.integers(0, 20, size=(batch, length)).astype("int32")
        if form == "tokens":  # shifted: only differences matter
            coords = np.arange(length)[None, :, None] + rng.integers(0, 5, size=(batch, 1, 1))
            return tokens, coords.astype("int32")
        offsets = np.arange(length)[None, :] - np.arange(length)[:, None]
        rel = np.broadcast_to(offsets[None, :, :, None], (batch, length, length, 1))
        return tokens, np.ascontiguousarray(rel, dtype="int32")

    model(list(data(1, 2)))
    return model, data


def assert_serves_like_keras(serve, model, data):
    for batch, length in SHAPES:
        inputs = data(batch, length)
        expected = to_numpy(model(list(inputs)))
        np.testing.assert_allclose(serve(*inputs), expected, atol=ATOL, rtol=0)


# jax2tf names each unknown dimension apart unless told that the positions'
# lengths are the tokens' length.
POLYMORPHIC = {
    form: {"jax2tf_kwargs": {"polymorphic_shapes": [["(b, n)", shape]]}}
    for form, shape in (("offsets", "(b, n, n, 1)"), ("tokens", "(b, n, 1)"))
}
TF_OR_JAX = pytest.mark.skipif(
    BACKEND == "torch", reason="SavedModels are written by the TensorFlow and JAX backends"
)


@TF_OR_JAX
@pytest.mark.parametrize("path", PATHS)
def test_tf_saved_model_with_dynamic_batch_and_length(path, rng, tmp_path):
    import tensorflow as tf

    model, data = model_and_data(rng, *PATHS[path])
    target = str(tmp_path / "saved")
    model.export(target, format="tf_saved_model", verbose=False,
                 **(POLYMORPHIC[PATHS[path][1]] if BACKEND == "jax" else {}))
    served = tf.saved_model.load(target)
    assert_serves_like_keras(lambda *x: served.serve(list(x)).numpy(), model, data)


@TF_OR_JAX
def test_export_archive_with_dynamic_batch_and_length(rng, tmp_path):
    import tensorflow as tf

    model, data = model_and_data(rng, return_logits=False)
    archive = keras.export.ExportArchive()
    archive.track(model)
    signature = [[keras.InputSpec(shape=(None, None), dtype="int32"),
                  keras.InputSpec(shape=(None, None, None, 1), dtype="int32")]]
    archive.add_endpoint("serve", model.__call__, input_signature=signature,
                         **(POLYMORPHIC["offsets"] if BACKEND == "jax" else {}))
    target = str(tmp_path / "archive")
    archive.write_out(target, verbose=False)
    served = tf.saved_model.load(target)
    assert_serves_like_keras(lambda *x: served.serve(list(x)).numpy(), model, data)


@pytest.mark.skipif(BACKEND == "jax", reason="Keras exports ONNX from TensorFlow and torch")
# torch.jit.trace warns about Keras' own shape checks and graph plumbing
# (`keras.src`), as for any Keras model; one from keras_relattn would show.
@pytest.mark.filterwarnings(r"ignore::torch.jit.TracerWarning:keras\.src")
# Keras' tf2onnx patch probes `np.object`, which NumPy 2 warns about.
@pytest.mark.filterwarnings(r"ignore:In the future `np.object`:FutureWarning:keras\.src")
@pytest.mark.parametrize("path", PATHS)
def test_onnx_export_at_every_length(path, rng, tmp_path):
    """torch traced the one-key softmax shortcut as a constant (outputs off by
    2-4 at every length but 1); through tf2onnx, Keras' exact GELU became an
    `Erfc` ONNX lacks."""
    ort = pytest.importorskip("onnxruntime")
    if BACKEND == "tensorflow":
        pytest.importorskip("tf2onnx")
    model, data = model_and_data(rng, *PATHS[path])
    target = str(tmp_path / "model.onnx")
    model.export(target, format="onnx", verbose=False)
    session = ort.InferenceSession(target)
    names = [i.name for i in session.get_inputs()]
    assert_serves_like_keras(
        lambda *x: session.run(None, dict(zip(names, x)))[0], model, data
    )


@pytest.mark.skipif(BACKEND != "tensorflow", reason="LiteRT export is tested on TensorFlow")
@pytest.mark.skipif(
    tuple(int(p) for p in keras.__version__.split(".")[:2]) < (3, 13),
    reason="Keras < 3.13 has no format='litert'",
)
@pytest.mark.parametrize("path", PATHS)
def test_litert_export_with_builtin_ops_only(path, rng, tmp_path):
    """A `x[:, :, None]` index became `FlexStridedSlice`, an op the plain
    interpreter refuses: the model must need no TensorFlow ops."""
    model, data = model_and_data(rng, *PATHS[path])
    target = str(tmp_path / "model.tflite")
    model.export(target, format="litert", verbose=False)
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # TensorFlow's own, deprecated in favour of LiteRT's
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # tf.lite's deprecation notice
        interpreter = Interpreter(model_path=target)

    def serve(*inputs):
        details = interpreter.get_input_details()
        for detail, array in zip(details, inputs):
            interpreter.resize_tensor_input(detail["index"], array.shape)
        interpreter.allocate_tensors()
        for detail, array in zip(details, inputs):
            interpreter.set_tensor(detail["index"], array)
        interpreter.invoke()
        return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])

    assert_serves_like_keras(serve, model, data)
