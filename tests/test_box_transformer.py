"""`BoxTransformer` against edspdf's `BoxTransformerModule`, and in Keras."""

import foldedtensor  # noqa: F401  (edspdf's BoxTransformer needs it)
import keras
import numpy as np
import pytest
import torch

from helpers import input_and_weight_gradients, to_numpy
from keras_relattn import BoxTransformer, edspdf_state_dict, load_edspdf_state_dict
from keras_relattn.box_transformer import BOX_KEYS
from test_blockwise import small_blocks  # noqa: F401 (a fixture)

# Compares with the real edspdf or DeBERTa: a skip here fails the run (conftest).
pytestmark = pytest.mark.reference

LINES = [5, 3, 4]  # lines per page: pages are padded to 5
SIZE = 16


def pages(rng, lengths=LINES):
    """edspdf's inputs (FoldedTensors by page and line) and ours (arrays)."""
    def folded(rows):
        return foldedtensor.as_folded_tensor(
            rows, full_names=["page", "line"], data_dims=["page", "line"], dtype=torch.float
        )

    def per_line(draw):
        return [[float(draw()) for _ in range(n)] for n in lengths]

    xmin = folded(per_line(lambda: rng.random() * 0.8))
    ymin = folded(per_line(lambda: rng.random() * 0.9))
    width = folded(per_line(lambda: 0.05 + 0.1 * rng.random()))
    height = folded(per_line(lambda: 0.01 + 0.02 * rng.random()))
    boxes = dict(
        xmin=xmin, ymin=ymin, width=width, height=height,
        xmax=xmin.with_data(xmin.as_tensor() + width.as_tensor()),
        ymax=ymin.with_data(ymin.as_tensor() + height.as_tensor()),
    )
    data = rng.normal(size=(len(lengths), max(lengths), SIZE)).astype("float32")
    embeds = xmin.with_data(torch.tensor(data))
    ours = dict(
        embeds=data,
        boxes={k: v.as_tensor().numpy() for k, v in boxes.items()},
        mask=xmin.mask.numpy(),
    )
    return (embeds, boxes), ours


def random_module(rng, **kwargs):
    from edspdf.layers.box_transformer import BoxTransformerModule

    module = BoxTransformerModule(SIZE, **kwargs).eval()
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.tensor(rng.normal(0.0, 0.5, size=param.shape)))
    return module


CONFIGS = {
    "default": dict(num_heads=2, n_relative_positions=32, init_resweight=0.5),
    "three_layers_c2p": dict(num_heads=4, n_relative_positions=16, n_layers=3,
                             attention_mode=("c2c", "c2p"), init_resweight=0.3),
    "no_positions": dict(num_heads=2, n_relative_positions=None, init_resweight=0.7),
    "relu_head_size": dict(num_heads=2, head_size=4, n_relative_positions=24,
                           activation="relu", init_resweight=0.5),
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_matches_edspdf_both_ways(config, rng):
    kwargs = CONFIGS[config]
    module = random_module(rng, **kwargs)
    theirs, ours = pages(rng)
    with torch.no_grad():
        expected = module(*theirs).as_tensor().numpy()

    layer = BoxTransformer(SIZE, **kwargs)
    load_edspdf_state_dict(layer, module.state_dict())
    got = to_numpy(layer(**ours))
    real = ours["mask"]  # padded lines are computed from padding on both sides
    np.testing.assert_allclose(got[real], expected[real], atol=1e-4)

    # Our own weights, exported, give edspdf our outputs.
    for weight in layer.weights:
        weight.assign(rng.normal(0.0, 0.5, size=weight.shape).astype("float32"))
    state = {k: torch.from_numpy(v) for k, v in edspdf_state_dict(layer).items()}
    module.load_state_dict(state, strict=True)
    with torch.no_grad():
        expected = module(*theirs).as_tensor().numpy()
    np.testing.assert_allclose(to_numpy(layer(**ours))[real], expected[real], atol=1e-4)


def test_one_shared_trainable_table_and_every_layers_logits(rng):
    layer = BoxTransformer(SIZE, num_heads=2, n_relative_positions=32, n_layers=3)
    _, ours = pages(rng)
    out, logits = layer(**ours, return_logits=True)
    assert tuple(out.shape) == (3, 5, SIZE)
    assert [tuple(t.shape) for t in logits] == [(3, 6, 6, 2)] * 3
    tables = [w for w in layer.trainable_weights if "position_embedding" in w.path]
    assert len(tables) == 1
    np.testing.assert_allclose(to_numpy(layer(**ours)), to_numpy(out), atol=1e-6)


def test_functional_model_with_a_dict_of_boxes_saves_and_loads(rng, tmp_path):
    embeds = keras.Input((None, SIZE), name="embeds")
    boxes = {key: keras.Input((None,), name=key) for key in BOX_KEYS}
    mask = keras.Input((None,), dtype="bool", name="mask")
    out = BoxTransformer(SIZE, num_heads=2, n_relative_positions=32, init_resweight=0.5)(
        embeds, boxes, mask=mask)
    model = keras.Model({"embeds": embeds, "mask": mask, **boxes}, out)
    _, ours = pages(rng)
    inputs = {"embeds": ours["embeds"], "mask": ours["mask"], **ours["boxes"]}
    before = to_numpy(model(inputs))
    path = str(tmp_path / "box.keras")
    model.save(path)
    again = keras.saving.load_model(path)
    np.testing.assert_allclose(to_numpy(again(inputs)), before, atol=1e-6)


def test_embeddings_keras_mask_is_the_line_mask(rng):
    layer = BoxTransformer(SIZE, num_heads=2, n_relative_positions=32, init_resweight=0.5)
    embedding = keras.layers.Embedding(10, SIZE, mask_zero=True)
    ids = keras.Input((None,), dtype="int32")
    box_inputs = {key: keras.Input((None,), name=key) for key in BOX_KEYS}
    model = keras.Model([ids, box_inputs], layer(embedding(ids), box_inputs))
    _, ours = pages(rng)
    real = ours["mask"]
    tokens = np.where(real, 3, 0).astype("int32")  # 0 = padding
    got = to_numpy(model([tokens, ours["boxes"]]))
    want = to_numpy(layer(to_numpy(embedding(tokens)), ours["boxes"], mask=real))
    np.testing.assert_allclose(got[real], want[real], atol=1e-5)
    assert not np.allclose(  # the mask matters: all lines real gives other numbers
        to_numpy(layer(to_numpy(embedding(tokens)), ours["boxes"]))[real], want[real]
    )


def whole_page_inputs(boxes, n_relative_positions):
    """What edspdf's `BoxTransformerModule` gives its layers: `(pages, lines
    + 1, lines + 1, 2)` offsets (0 on the CLS row and column) and the
    no-position mask of that row and column."""
    from edspdf.utils.torch import compute_pdf_relative_positions

    t = {k: torch.from_numpy(np.asarray(v)) for k, v in boxes.items()}
    inner = compute_pdf_relative_positions(
        t["xmin"], t["ymin"], t["xmax"], t["ymax"], t["width"], t["height"],
        n_relative_positions=n_relative_positions,
    ).numpy()
    pages, lines = inner.shape[:2]
    offsets = np.zeros((pages, lines + 1, lines + 1, 2), "int64")
    offsets[:, 1:, 1:] = inner
    no_position = np.ones((pages, lines + 1, lines + 1), bool)
    no_position[:, 1:, 1:] = False
    return offsets, no_position


def test_long_pages_in_blocks_equal_edspdf_and_the_full_paths_gradients(
        small_blocks, rng):
    """Pages of 9 lines in blocks of one query, each recomputed: the box
    offsets are formed block by block (no whole-page tensor)."""
    kwargs = dict(num_heads=2, n_relative_positions=32, init_resweight=0.5)
    module = random_module(rng, **kwargs)
    lengths = [9, 6, 8]
    (embeds, boxes), ours = pages(rng, lengths)
    leaf = embeds.as_tensor().clone().requires_grad_(True)
    embeds = embeds.with_data(leaf)
    output = module(embeds, boxes).as_tensor()
    real = ours["mask"]
    # The loss reads real lines only: padded ones are computed from padding
    # (their NaN offsets cast differently on JAX).
    probe = rng.normal(size=tuple(output.shape)).astype("float32") * real[..., None]
    (output * torch.from_numpy(probe)).sum().backward()

    layer = BoxTransformer(SIZE, **kwargs)
    load_edspdf_state_dict(layer, module.state_dict())
    got = to_numpy(layer(**ours))
    # Each layer's pooled path ran in recomputed blocks: 10 rows (CLS and 9
    # lines) of 3 pages x 2 heads x 10 keys, a row a block.
    assert small_blocks and all(p.n_blocks == 10 and p.recomputed for p in small_blocks)
    np.testing.assert_allclose(got[real], output.detach().numpy()[real], atol=1e-4)

    def loss_fn(out):
        pooled = out[0] if isinstance(out, tuple) else out
        return keras.ops.sum(pooled * keras.ops.convert_to_tensor(probe))

    def gradients(return_logits):
        return input_and_weight_gradients(
            layer, loss_fn, dict(ours, return_logits=return_logits), ["embeds"]
        )

    blockwise, full = gradients(False), gradients(True)
    theirs = leaf.grad.numpy()
    np.testing.assert_allclose(blockwise[0]["embeds"][real], theirs[real], atol=1e-4)
    np.testing.assert_allclose(blockwise[0]["embeds"], full[0]["embeds"], atol=2e-5)
    assert len(blockwise[1]) == len(layer.trainable_weights)
    for i, (a, b) in enumerate(zip(blockwise[1], full[1])):
        np.testing.assert_allclose(a, b, atol=2e-5, err_msg=layer.trainable_weights[i].path)
