"""The DeBERTa-v3 journey (issue 38): a checkpoint folder written by
transformers' `save_pretrained` -> `deberta.from_pretrained(path, task)` ->
fine-tuning -> `deberta.save_pretrained` -> transformers'
`AutoModelFor<Task>.from_pretrained`, compared with transformers' own models
at every end (random tiny configurations; nothing downloaded); KerasHub's
classifier; bad input."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import torch
import transformers
from transformers import DebertaV2Config

from helpers import BACKEND, to_numpy
from keras_relattn import deberta

pytestmark = pytest.mark.reference

# float32 against float32 through 2 layers and a head: the bound.
ATOL = 1e-4
LENGTH = 150  # beyond max_position_embeddings (64) and the buckets' reach (64)

HF_CLASSES = {
    None: transformers.DebertaV2Model,
    "sequence_classification": transformers.DebertaV2ForSequenceClassification,
    "token_classification": transformers.DebertaV2ForTokenClassification,
    "masked_lm": transformers.DebertaV2ForMaskedLM,
}
AUTO_CLASSES = {
    None: transformers.AutoModel,
    "sequence_classification": transformers.AutoModelForSequenceClassification,
    "token_classification": transformers.AutoModelForTokenClassification,
    "masked_lm": transformers.AutoModelForMaskedLM,
}
# (task, legacy): both masked-LM layouts.
TASKS = [(None, True), ("sequence_classification", True), ("token_classification", True),
         ("masked_lm", True), ("masked_lm", False)]
TASK_IDS = ["backbone", "sequence", "token", "masked_lm_legacy", "masked_lm"]


def hf_config(**changes):
    options = dict(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, relative_attention=True, position_buckets=16,
        max_relative_positions=64, max_position_embeddings=64, pos_att_type=["p2c", "c2p"],
        position_biased_input=False, share_att_key=True, norm_rel_ebd="layer_norm",
        type_vocab_size=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        num_labels=3, pooler_hidden_act="tanh",
    )
    options.update(changes)
    return DebertaV2Config(**options)


def hf_model(task, seed=0, **changes):
    """transformers' model of `task`, every parameter moved off its
    initialization (biases, norms and heads too)."""
    torch.manual_seed(seed)
    model = HF_CLASSES[task](hf_config(**changes)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


def saved(model, folder, **options):
    model.save_pretrained(str(folder), **options)
    return str(folder)


def batch(rng, length=LENGTH, vocabulary=100):
    ids = rng.integers(1, vocabulary, size=(2, length)).astype("int32")
    mask = np.ones((2, length), "int32")
    mask[1, length // 2:] = 0  # a padded row
    return ids, mask


def hf_logits(model, ids, mask):
    with torch.no_grad():
        out = model(torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long())
    return (out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits).numpy()


def keras_logits(model, ids, mask):
    return to_numpy(model({"token_ids": ids, "padding_mask": mask}))


# 1. from_pretrained ------------------------------------------------------------


@pytest.mark.parametrize("task, legacy", TASKS, ids=TASK_IDS)
def test_from_pretrained_equals_transformers_task_model(task, legacy, tmp_path, rng):
    source = hf_model(task, legacy=legacy)
    model = deberta.from_pretrained(saved(source, tmp_path), task)
    assert isinstance(model, keras.Model)
    ids, mask = batch(rng)
    np.testing.assert_allclose(keras_logits(model, ids, mask), hf_logits(source, ids, mask),
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_checkpoints_load(dtype, tmp_path, rng):
    """As transformers reads the same file in float32: the same rounded weights."""
    source = hf_model("sequence_classification").to(getattr(torch, dtype))
    folder = saved(source, tmp_path)
    from safetensors import safe_open

    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        assert f.get_tensor("classifier.weight").dtype == getattr(torch, dtype)
    reference = transformers.AutoModelForSequenceClassification.from_pretrained(
        folder, dtype=torch.float32).eval()
    model = deberta.from_pretrained(folder, "sequence_classification")
    ids, mask = batch(rng, 40)
    np.testing.assert_allclose(keras_logits(model, ids, mask), hf_logits(reference, ids, mask),
                               atol=ATOL, rtol=0)


def test_sharded_checkpoints_load(tmp_path, rng):
    source = hf_model("token_classification")
    folder = saved(source, tmp_path, max_shard_size="40KB")
    assert "model.safetensors.index.json" in os.listdir(folder)
    assert "model.safetensors" not in os.listdir(folder)
    model = deberta.from_pretrained(folder, "token_classification")
    ids, mask = batch(rng, 40)
    np.testing.assert_allclose(keras_logits(model, ids, mask), hf_logits(source, ids, mask),
                               atol=ATOL, rtol=0)


def write_bin_folder(source, folder):
    os.makedirs(folder, exist_ok=True)
    source.config.to_json_file(os.path.join(folder, "config.json"))
    torch.save(source.state_dict(), os.path.join(folder, "pytorch_model.bin"))
    return str(folder)


def test_a_pytorch_bin_folder_loads_with_torch(tmp_path, rng):
    source = hf_model("masked_lm")
    model = deberta.from_pretrained(write_bin_folder(source, tmp_path), "masked_lm")
    ids, mask = batch(rng, 30)
    np.testing.assert_allclose(keras_logits(model, ids, mask), hf_logits(source, ids, mask),
                               atol=ATOL, rtol=0)


def test_a_pytorch_bin_folder_says_it_needs_torch(tmp_path, monkeypatch):
    folder = write_bin_folder(hf_model(None), tmp_path)
    monkeypatch.setitem(sys.modules, "torch", None)  # torch not installed
    with pytest.raises(ImportError, match=r"pytorch_model\.bin.*needs torch"):
        deberta.from_pretrained(folder)


NO_TORCH_NO_TRANSFORMERS = """
import sys

class NotInstalled:  # neither torch nor transformers, as far as this process knows
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, NotInstalled())
import numpy as np
from keras_relattn import deberta
model = deberta.from_pretrained(sys.argv[1], "sequence_classification")
ids = np.arange(1, 21, dtype="int32")[None]
logits = model({"token_ids": ids, "padding_mask": np.ones_like(ids)})
np.save(sys.argv[2], np.asarray(logits))
assert "torch" not in sys.modules and "transformers" not in sys.modules
"""


def test_a_safetensors_folder_loads_without_torch_or_transformers(tmp_path, rng):
    """The loading process imports neither. Keras' torch backend is torch itself,
    so in the torch run the loading process runs on JAX (never skipped: this
    module compares with the real DeBERTa)."""
    source = hf_model("sequence_classification")
    folder = saved(source, tmp_path / "model")
    loader_backend = "jax" if BACKEND == "torch" else BACKEND
    done = subprocess.run(
        [sys.executable, "-c", NO_TORCH_NO_TRANSFORMERS, folder, str(tmp_path / "logits.npy")],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, KERAS_BACKEND=loader_backend, TF_CPP_MIN_LOG_LEVEL="2"))
    assert done.returncode == 0, done.stderr[-3000:]
    ids = np.arange(1, 21, dtype="int32")[None]
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"),
                               hf_logits(source, ids, np.ones_like(ids)), atol=ATOL, rtol=0)


def test_a_base_checkpoint_gets_a_fresh_head_as_in_transformers(tmp_path, rng):
    """`AutoModelForSequenceClassification.from_pretrained(base, num_labels=5)`:
    the backbone read, the head new (and said so)."""
    source = hf_model(None)
    folder = saved(source, tmp_path)
    with pytest.warns(UserWarning, match="classifier.weight.*fresh"):
        model = deberta.from_pretrained(folder, "sequence_classification", num_labels=5)
    ids, mask = batch(rng, 20)
    assert keras_logits(model, ids, mask).shape == (2, 5)
    hidden = to_numpy(model.encoder(ids, mask))
    np.testing.assert_allclose(hidden, hf_logits(source, ids, mask), atol=ATOL, rtol=0)


# 2. save_pretrained, back to transformers ---------------------------------------


@pytest.mark.parametrize("task, legacy", TASKS, ids=TASK_IDS)
def test_save_pretrained_loads_in_transformers_with_the_same_logits(task, legacy, tmp_path, rng):
    source = hf_model(task, seed=1, legacy=legacy)
    model = deberta.from_pretrained(saved(source, tmp_path / "in"), task)
    for weight in model.weights:  # fine-tuned: every weight moved
        weight.assign(to_numpy(weight) + rng.normal(0, 0.01, size=weight.shape))
    out = deberta.save_pretrained(model, tmp_path / "out")
    back, info = AUTO_CLASSES[task].from_pretrained(out, output_loading_info=True)
    assert type(back) is HF_CLASSES[task]
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    ids, mask = batch(rng)
    np.testing.assert_allclose(hf_logits(back.eval(), ids, mask), keras_logits(model, ids, mask),
                               atol=ATOL, rtol=0)


def test_a_backbone_model_saves_as_debertav2model(tmp_path, rng):
    model = deberta.backbone(vocabulary_size=100, num_layers=1, num_heads=2, hidden_dim=32,
                             intermediate_dim=64, bucket_size=16, max_position=64)
    out = deberta.save_pretrained(model, tmp_path)
    back, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids, mask = batch(rng, 30)
    np.testing.assert_allclose(hf_logits(back.eval(), ids, mask), keras_logits(model, ids, mask),
                               atol=ATOL, rtol=0)


def test_saving_keeps_the_checkpoints_labels(tmp_path):
    source = hf_model("sequence_classification", id2label={0: "neg", 1: "neutral", 2: "pos"})
    model = deberta.from_pretrained(saved(source, tmp_path / "in"), "sequence_classification")
    out = deberta.save_pretrained(model, tmp_path / "out")
    config = transformers.AutoConfig.from_pretrained(out)
    assert config.id2label == {0: "neg", 1: "neutral", 2: "pos"}
    assert config.pooler_hidden_act == "tanh"


# Keras: .keras files, fit, mixed precision ---------------------------------------


@pytest.mark.parametrize("task", ["sequence_classification", "masked_lm"])
def test_a_loaded_model_fits_and_round_trips_through_keras_files(task, tmp_path, rng):
    source = hf_model(task)
    model = deberta.from_pretrained(saved(source, tmp_path / "hf"), task)
    ids, mask = batch(rng, 70)
    labels = (rng.integers(0, 3, size=(2,)) if task == "sequence_classification"
              else rng.integers(0, 100, size=(2, 70)))
    model.compile(keras.optimizers.Adam(1e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = keras_logits(model, ids, mask)
    history = model.fit({"token_ids": ids, "padding_mask": mask}, labels, epochs=1,
                        batch_size=2, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    after = keras_logits(model, ids, mask)
    assert not np.allclose(before, after)
    model.save(tmp_path / "model.keras")
    again = keras.saving.load_model(tmp_path / "model.keras")
    assert type(again) is deberta.DebertaV3TaskModel and again.task == task
    np.testing.assert_allclose(keras_logits(again, ids, mask), after, atol=1e-6, rtol=0)
    if task == "masked_lm":  # still tied: one embedding, read by the head
        assert len([w for w in again.weights if tuple(w.shape) == (100, 32)]) == 1


def test_a_loaded_model_trains_at_8192_tokens(tmp_path, rng):
    """No length cap on the journey: 128 times max_position_embeddings."""
    source = hf_model("sequence_classification")
    model = deberta.from_pretrained(saved(source, tmp_path), "sequence_classification")
    ids, mask = batch(rng, 8192)
    ids, mask = ids[:1], mask[:1]
    model.compile(keras.optimizers.Adam(1e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = [np.array(w) for w in model.get_weights()]
    history = model.fit({"token_ids": ids, "padding_mask": mask}, np.array([1]), epochs=1,
                        batch_size=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    moved = [not np.allclose(b, np.array(w)) for b, w in zip(before, model.get_weights())]
    assert all(moved), f"{moved.count(False)} of {len(moved)} weights did not train"


def test_mixed_bfloat16_loads_and_runs(tmp_path, rng):
    source = hf_model("token_classification")
    model = deberta.from_pretrained(saved(source, tmp_path), "token_classification",
                                    dtype="mixed_bfloat16")
    assert model.encoder.compute_dtype == "bfloat16"
    ids, mask = batch(rng, 40)
    got = keras_logits(model, ids, mask).astype("float32")
    want = hf_logits(source, ids, mask)
    assert np.abs(got - want)[0].max() < 0.1  # bfloat16's precision


# 3. KerasHub ------------------------------------------------------------------------


def test_from_keras_hub_keeps_a_classifiers_head(rng):
    from keras_hub.models import DebertaV3Backbone, DebertaV3TextClassifier

    source_backbone = DebertaV3Backbone(vocabulary_size=100, num_layers=2, num_heads=2,
                                        hidden_dim=32, intermediate_dim=64,
                                        max_sequence_length=64, bucket_size=16, dropout=0.0)
    source = DebertaV3TextClassifier(source_backbone, num_classes=3, hidden_dim=24)
    for weight in source.weights:
        weight.assign(to_numpy(weight) + rng.normal(0, 0.05, size=weight.shape))
    model = deberta.from_keras_hub(source)
    assert model.task == "sequence_classification" and model.pooler_dim == 24
    ids, mask = batch(rng, LENGTH)
    inputs = {"token_ids": ids, "padding_mask": mask}
    np.testing.assert_allclose(to_numpy(model(inputs)), to_numpy(source(inputs)), atol=ATOL,
                               rtol=0)


# Bad input: a clear error, nothing half-written ----------------------------------------


def test_folders_that_are_not_deberta_checkpoints_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        deberta.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no config.json"):
        deberta.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type='bert'.*deberta-v2"):
        deberta.from_pretrained(tmp_path)
    config = hf_config().to_dict()
    (tmp_path / "config.json").write_text(json.dumps(
        dict(config, architectures=["DebertaV2ForCausalLM"])))
    with pytest.raises(ValueError, match="DebertaV2ForCausalLM"):
        deberta.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="holds no weights.*model.safetensors"):
        deberta.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(config, position_biased_input=True)))
    with pytest.raises(ValueError, match="position_biased_input"):
        deberta.from_pretrained(tmp_path)


def test_task_and_options_are_checked(tmp_path):
    folder = saved(hf_model(None), tmp_path)
    with pytest.raises(ValueError, match="`task` must be one of.*task='summarization'"):
        deberta.from_pretrained(folder, "summarization")
    with pytest.raises(TypeError, match="unknown option.*hidden_sizes"):
        deberta.from_pretrained(folder, hidden_sizes=3)


def test_a_vocabulary_larger_than_the_config_is_named(tmp_path):
    folder = saved(hf_model(None, vocab_size=120), tmp_path)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(config, vocab_size=100), f)
    with pytest.raises(ValueError, match=r"word_embeddings.weight.*\(120, 32\).*\(100, 32\)"):
        deberta.from_pretrained(folder)


def test_a_masked_lm_head_in_the_other_layout_names_the_option(tmp_path):
    folder = saved(hf_model("masked_lm", legacy=False), tmp_path)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(config, legacy=True), f)
    with pytest.raises(ValueError, match="lm_predictions.lm_head.*legacy=False"):
        deberta.from_pretrained(folder, "masked_lm")
    deberta.from_pretrained(folder, "masked_lm", legacy=False)


def test_save_pretrained_refuses_a_folder_holding_another_model(tmp_path):
    other = saved(hf_model("sequence_classification", num_labels=2), tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(other)}
    model = deberta.from_pretrained(saved(hf_model("sequence_classification"),
                                          tmp_path / "three"), "sequence_classification")
    with pytest.raises(ValueError, match="different model.*num_labels: 2 there, 3 here"):
        deberta.save_pretrained(model, other)
    after = {name: (tmp_path / name).read_bytes() for name in os.listdir(other)
             if name != "three"}
    assert after == before  # nothing half-written
    deberta.save_pretrained(model, other, overwrite=True)
    again = deberta.save_pretrained(model, other)  # the same model: no refusal
    assert transformers.AutoConfig.from_pretrained(again).num_labels == 3
    with pytest.raises(TypeError, match="`model` must be"):
        deberta.save_pretrained(keras.Sequential([keras.layers.Dense(2)]), tmp_path / "x")
    with pytest.raises(TypeError, match="`overwrite` must be a bool"):
        deberta.save_pretrained(model, other, overwrite="yes")


def word_tokenizer(words):
    """A transformers tokenizer built in memory (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocabulary = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    inner = Tokenizer(models.WordLevel(vocabulary, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="[PAD]",
                                                unk_token="[UNK]")


def test_raw_strings_go_in_through_a_tokenizer(tmp_path, rng):
    source = hf_model("sequence_classification")
    model = deberta.from_pretrained(saved(source, tmp_path), "sequence_classification")
    tokenizer = word_tokenizer([f"w{i}" for i in range(50)])
    text = deberta.TextModel(model, tokenizer, sequence_length=80)
    texts = ["w1 w2 w3 " * 20, "w4 w5"]
    inputs = text.preprocess(texts)
    encoded = tokenizer(texts, padding="max_length", max_length=80, truncation=True,
                        return_tensors="np")
    np.testing.assert_array_equal(inputs["token_ids"], encoded["input_ids"])
    np.testing.assert_allclose(text.predict(texts, verbose=0),
                               hf_logits(source, encoded["input_ids"], encoded["attention_mask"]),
                               atol=ATOL, rtol=0)
    model.compile(keras.optimizers.Adam(1e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    text.fit(texts, [0, 2], epochs=1, verbose=0)


def test_a_tokenizer_larger_than_the_embedding_is_refused():
    model = deberta.backbone(vocabulary_size=10, num_layers=1, num_heads=2, hidden_dim=16,
                             intermediate_dim=32, bucket_size=8, max_position=32)
    with pytest.raises(ValueError, match="vocabulary of 22 tokens.*token embedding \\(10 rows"):
        deberta.TextModel(model, word_tokenizer([f"w{i}" for i in range(20)]))
    with pytest.raises(TypeError, match="`tokenizer` must be"):
        deberta.TextModel(model, "spm.model")
