"""Keras' own layer harness (`keras.src.testing.TestCase.run_layer_test`),
the checks every Keras layer passes: built state and weight counts, config
and serialization round trip, symbolic and eager outputs of the declared
shapes, masking support, a compiled `fit` step, and mixed precision (outputs
in the compute dtype).

The harness' `fit` step calls the layer with its first input alone, so it
runs for the layers that can be called so (the transformer layer, content
only); the others train with their position inputs in `test_fit_*` below and
in test_keras.py."""

import keras
import numpy as np
import pytest
from keras.src import testing

from keras_relattn import BoxTransformer, PositionTable, RelativeAttention
from keras_relattn import RelativeTransformerLayer

# The harness' own `fit` step feeds a generator with Keras' default shuffle=True.
pytestmark = pytest.mark.filterwarnings("ignore:`shuffle=True` was passed:UserWarning")

BATCH, LENGTH, SIZE = 2, 5, 8
# By build argument (the harness calls the layer with the names less "_shape").
ATTENTION_INPUTS = {
    "content_queries_shape": (BATCH, LENGTH, SIZE),
    "content_keys_shape": (BATCH, LENGTH, SIZE),
    "content_values_shape": (BATCH, LENGTH, SIZE),
}


def relative_positions(coordinates):
    offsets = np.arange(LENGTH)[None, :] - np.arange(LENGTH)[:, None]
    grid = np.stack([offsets] * coordinates, axis=-1)[None]
    return np.broadcast_to(grid, (BATCH, LENGTH, LENGTH, coordinates)).astype("int32")


def page_boxes():
    rng = np.random.default_rng(0)
    x0, y0 = rng.random((BATCH, LENGTH)) * 0.8, rng.random((BATCH, LENGTH)) * 0.9
    return dict(xmin=x0, ymin=y0, xmax=x0 + 0.1, ymax=y0 + 0.02,
                width=np.full((BATCH, LENGTH), 0.1), height=np.full((BATCH, LENGTH), 0.02))


class LayerHarnessTest(testing.TestCase):
    def test_relative_attention(self):
        self.run_layer_test(
            RelativeAttention,
            init_kwargs=dict(size=SIZE, n_heads=2, position_embedding_shape=(9, 4),
                             n_coordinates=2, position_embedding_trainable=True),
            input_shape=ATTENTION_INPUTS,
            call_kwargs=dict(relative_positions=relative_positions(2)),
            expected_output_shape=((BATCH, LENGTH, SIZE), (BATCH, LENGTH, LENGTH, 2)),
            # query, key, value, position_key, position_query: kernel and bias
            # each; the head bias and the (trainable) table.
            expected_num_trainable_weights=12,
            expected_num_non_trainable_weights=0,
            supports_masking=True,
            run_training_check=False,  # needs its keys, values and positions
        )

    def test_relative_attention_pooled_only_with_dropout(self):
        self.run_layer_test(
            RelativeAttention,
            init_kwargs=dict(size=SIZE, n_heads=2, position_embedding_shape=(9, 8),
                             dropout_p=0.1, seed=3),
            input_shape=ATTENTION_INPUTS,
            call_kwargs=dict(relative_positions=relative_positions(1), return_logits=False),
            expected_output_shape=(BATCH, LENGTH, SIZE),
            expected_num_trainable_weights=11,
            expected_num_non_trainable_weights=1,  # the table (not trainable by default)
            expected_num_seed_generators=1,
            supports_masking=True,
            run_training_check=False,
        )

    def test_relative_transformer_layer(self):
        self.run_layer_test(
            RelativeTransformerLayer,
            init_kwargs=dict(input_size=SIZE, num_heads=2, position_embedding_shape=(9, 8),
                             position_embedding_trainable=True, init_resweight=0.5,
                             n_coordinates=1),
            input_shape=(BATCH, LENGTH, SIZE),
            call_kwargs=dict(relative_positions=relative_positions(1), return_logits=False),
            expected_output_shape=(BATCH, LENGTH, SIZE),
            # attention 11 + table; 2 norms x 2; 2 dense x 2; 2 residual gates
            expected_num_trainable_weights=22,
            expected_num_non_trainable_weights=0,
            supports_masking=True,
            run_training_check=False,  # its position weights need positions
        )

    def test_relative_transformer_layer_content_only(self):
        self.run_layer_test(
            RelativeTransformerLayer,
            init_kwargs=dict(input_size=SIZE, num_heads=2, attention_mode=["c2c"],
                             init_resweight=0.5, dropout_p=0.1, seed=1),
            input_shape=(BATCH, LENGTH, SIZE),
            expected_output_shape=((BATCH, LENGTH, SIZE), (BATCH, LENGTH, LENGTH, 2)),
            # attention: query, key, value (kernel, bias), head bias; 2 norms x 2;
            # 2 dense x 2; 2 residual gates
            expected_num_trainable_weights=17,
            expected_num_non_trainable_weights=0,
            expected_num_seed_generators=2,  # the attention's and the residuals'
            supports_masking=True,
        )

    def test_position_table(self):
        self.run_layer_test(
            PositionTable,
            init_kwargs=dict(n_positions=9, size=SIZE),
            input_shape=(BATCH, LENGTH, SIZE),
            expected_output_shape=(9, SIZE),
            expected_num_trainable_weights=1,
            expected_num_non_trainable_weights=0,
            # Its output does not depend on the input: nothing to train through.
            run_training_check=False,
        )

    def test_box_transformer(self):
        self.run_layer_test(
            BoxTransformer,
            init_kwargs=dict(input_size=SIZE, num_heads=2, n_relative_positions=16,
                             n_layers=2, init_resweight=0.5),
            input_shape=(BATCH, LENGTH, SIZE),
            call_kwargs=dict(boxes=page_boxes()),
            expected_output_shape=(BATCH, LENGTH, SIZE),
            supports_masking=True,
            run_training_check=False,  # needs its boxes
        )


def test_fit_trains_every_weight_of_a_box_transformer():
    embeds = keras.Input((None, SIZE), name="embeds")
    boxes = {k: keras.Input((None,), name=k) for k in page_boxes()}
    layer = BoxTransformer(SIZE, num_heads=2, n_relative_positions=16, init_resweight=0.5)
    model = keras.Model({"embeds": embeds, **boxes}, layer(embeds, boxes))
    model.compile("adam", "mse")
    before = [np.array(keras.ops.convert_to_numpy(w)) for w in layer.trainable_weights]
    data = {"embeds": np.random.default_rng(1).normal(size=(BATCH, LENGTH, SIZE)),
            **page_boxes()}
    model.fit(data, np.zeros((BATCH, LENGTH, SIZE)), epochs=2, verbose=0)
    after = [keras.ops.convert_to_numpy(w) for w in layer.trainable_weights]
    unchanged = [w.path for w, a, b in zip(layer.trainable_weights, after, before)
                 if np.array_equal(a, b)]
    assert not unchanged
