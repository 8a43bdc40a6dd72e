"""DeBERTa-v3 on the layer: `keras_relattn.deberta` against Hugging Face's
`DebertaV2Model` and KerasHub's `DebertaV3Backbone` (random weights; nothing
downloaded), both ways, short and beyond the buckets' reach, padding
included; the DeBERTa options of `RelativeAttention`."""

import keras
import numpy as np
import pytest
import torch
from transformers import DebertaV2Config, DebertaV2Model

from helpers import BACKEND, input_and_weight_gradients, to_numpy
from keras_relattn import RelativeAttention, config, deberta

pytestmark = pytest.mark.reference

# float32 against float32 through 2 layers: measured at most 1.2e-6 (outputs ~1).
ATOL = 2e-5


def transformers_config(**changes):
    options = dict(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, relative_attention=True, position_buckets=16,
        max_relative_positions=64, pos_att_type=["p2c", "c2p"], position_biased_input=False,
        share_att_key=True, norm_rel_ebd="layer_norm", type_vocab_size=0,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    options.update(changes)
    return DebertaV2Config(**options)


def random_transformers(seed=0, **changes):
    torch.manual_seed(seed)
    model = DebertaV2Model(transformers_config(**changes)).eval()
    with torch.no_grad():  # off the initialization, biases and norms too
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


def batch(rng, length, vocabulary=100):
    ids = rng.integers(1, vocabulary, size=(2, length)).astype("int32")
    mask = np.ones((2, length), "int32")
    mask[1, length // 2:] = 0  # a padded sequence
    return ids, mask


def transformers_output(model, ids, mask):
    with torch.no_grad():
        return model(torch.tensor(ids).long(), attention_mask=torch.tensor(mask)
                     ).last_hidden_state.numpy()


@pytest.mark.parametrize("length", [20, 150])  # 150: beyond the buckets' reach (64)
def test_from_transformers_equals_debertav2model(length, rng):
    source = random_transformers()
    model = deberta.from_transformers(source.state_dict(), source.config.to_dict())
    ids, mask = batch(rng, length)
    got = to_numpy(model({"token_ids": ids, "padding_mask": mask}))
    np.testing.assert_allclose(got, transformers_output(source, ids, mask), atol=ATOL, rtol=0)


def test_deberta_v3_buckets_beyond_512_tokens(rng):
    """DeBERTa-v3's own bucket setting (256 buckets, 512 positions) at 600
    tokens: the table's edge (offsets 511-512) is crossed."""
    source = random_transformers(position_buckets=256, max_relative_positions=512,
                                 num_hidden_layers=1)
    model = deberta.from_transformers(source.state_dict(), source.config.to_dict())
    ids, mask = batch(rng, 600)
    got = to_numpy(model({"token_ids": ids, "padding_mask": mask}))
    np.testing.assert_allclose(got, transformers_output(source, ids, mask), atol=ATOL, rtol=0)


def test_the_round_trip_ends_in_transformers(rng):
    source = random_transformers(seed=1)
    model = deberta.from_transformers(source.state_dict(), source.config.to_dict())
    for weight in model.weights:  # trained: every weight moved
        weight.assign(to_numpy(weight) + rng.normal(0, 0.01, size=weight.shape))
    state = deberta.to_transformers_state_dict(model)
    back = DebertaV2Model(source.config).eval()
    back.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    ids, mask = batch(rng, 40)
    np.testing.assert_allclose(transformers_output(back, ids, mask),
                               to_numpy(model({"token_ids": ids, "padding_mask": mask})),
                               atol=ATOL, rtol=0)


def test_a_task_model_state_dict_with_its_prefix_loads(rng):
    source = random_transformers()
    prefixed = {f"deberta.{k}": v for k, v in source.state_dict().items()}
    model = deberta.from_transformers(prefixed, source.config.to_dict())
    ids, mask = batch(rng, 10)
    np.testing.assert_allclose(to_numpy(model({"token_ids": ids, "padding_mask": mask})),
                               transformers_output(source, ids, mask), atol=ATOL)


@pytest.mark.parametrize("change, name", [
    (dict(position_biased_input=True), "position_biased_input"),
    (dict(relative_attention=False), "relative_attention"),
    (dict(pos_att_type=["c2p"]), "pos_att_type"),
    (dict(type_vocab_size=2), "type_vocab_size"),
    (dict(share_att_key=False), "share_att_key"),
    (dict(conv_kernel_size=3), "conv_kernel_size"),
    (dict(norm_rel_ebd="none"), "norm_rel_ebd"),
])
def test_options_v3_does_not_use_are_refused_by_name(change, name):
    options = transformers_config(**change).to_dict()
    with pytest.raises(ValueError, match=name):
        deberta.from_transformers({}, options)


@pytest.mark.parametrize("length", [20, 150])
def test_from_keras_hub_equals_debertav3backbone(length, rng):
    from keras_hub.models import DebertaV3Backbone

    keras.utils.set_random_seed(0)
    source = DebertaV3Backbone(vocabulary_size=100, num_layers=2, num_heads=4, hidden_dim=32,
                               intermediate_dim=64, max_sequence_length=64, bucket_size=16,
                               dropout=0.0)
    for weight in source.weights:
        noise = rng.normal(0, 0.05, size=weight.shape).astype("float32")
        weight.assign(to_numpy(weight) + noise)
    model = deberta.from_keras_hub(source)
    ids, mask = batch(rng, length)
    inputs = {"token_ids": ids, "padding_mask": mask}
    np.testing.assert_allclose(to_numpy(model(inputs)), to_numpy(source(inputs)), atol=ATOL,
                               rtol=0)


def test_long_blocks_train_as_one_block(rng):
    """The converted model's gradients through the banded, recomputed blocks
    (buckets, tied projections, the table passed at call) equal one block's."""
    source = random_transformers(num_hidden_layers=1)
    model = deberta.from_transformers(source.state_dict(), source.config.to_dict())
    encoder = model.get_layer("encoder")
    ids, mask = batch(rng, 300)
    probe = rng.normal(size=(2, 300, 32)).astype("float32")

    def gradients():
        return input_and_weight_gradients(
            encoder, lambda out: keras.ops.sum(out * keras.ops.convert_to_tensor(probe)),
            dict(token_ids=ids, padding_mask=mask), wrt=())[1]

    with config.block_settings(block_elements=10**9, band_rows=2**30) as whole:
        want = gradients()
    with config.block_settings(band_rows=64, block_elements=2 * 4 * 300 * 64,
                               recompute_elements=0) as split:
        got = gradients()
    assert whole.plans[0].n_blocks == 1
    assert split.plans[0].band_width and split.plans[0].n_blocks == 5
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


# The layer's DeBERTa options --------------------------------------------------


def test_deberta_options_serialize_and_build_no_position_projections():
    layer = RelativeAttention(16, 2, position_embedding_shape=(None, 16), head_bias=False,
                              tied_position_projections=True, position_dropout_p=0.1,
                              position_buckets=(8, 32), sequence_positions=True)
    layer.build()
    assert layer.position_key_projection is None and layer.position_query_projection is None
    again = RelativeAttention.from_config(layer.get_config())
    assert again.tied_position_projections and again.position_dropout_p == 0.1
    assert tuple(again.position_buckets) == (8, 32)


@pytest.mark.parametrize("ctor, error, match", [
    (dict(tied_position_projections=True), ValueError, "no table"),
    (dict(tied_position_projections=True, position_embedding_shape=(9, 8)), ValueError,
     "feature size"),
    (dict(tied_position_projections=True, position_embedding_shape=(9, 16), n_coordinates=2),
     ValueError, "n_coordinates=1"),
    (dict(position_buckets=(2, 8)), ValueError, "bucket_size"),
    (dict(position_buckets=8), TypeError, "position_buckets"),
    (dict(position_dropout_p=1.5), ValueError, "position_dropout_p"),
])
def test_deberta_option_errors_name_the_argument(ctor, error, match):
    with pytest.raises(error, match=match):
        RelativeAttention(16, 2, **ctor)


def test_deberta_dropout_placement_leaves_the_inputs_alone(rng):
    """With `position_dropout_p`, `dropout_p` drops only the attention
    probabilities: a layer whose probabilities cannot change (one key) gives
    the same output in training as in inference."""
    layer = RelativeAttention(8, 2, position_embedding=rng.normal(size=(9, 8)).astype("float32"),
                              dropout_p=0.5, position_dropout_p=0.0, seed=1)
    x = rng.normal(size=(2, 1, 8)).astype("float32")  # one key: weights are 1 (x2 kept, 0)
    offsets = np.zeros((1, 1, 1, 1), "int32")
    inference = to_numpy(layer(x, x, x, relative_positions=offsets)[0])
    draws = [to_numpy(layer(x, x, x, relative_positions=offsets, training=True)[0])
             for _ in range(6)]
    for draw in draws:  # each (batch, head) kept (x2) or dropped (0), never the inputs
        for b in range(2):
            for head in range(2):
                part = draw[b, :, head * 4:(head + 1) * 4]
                want = inference[b, :, head * 4:(head + 1) * 4]
                assert np.allclose(part, 0) or np.allclose(part, 2 * want, atol=1e-5)
    if BACKEND != "jax":  # (JAX draws the same mask from an unchanged seed state)
        assert any(not np.allclose(d, draws[0]) for d in draws)
