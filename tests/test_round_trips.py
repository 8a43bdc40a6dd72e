"""Round trips that end in the other system: what we export, loaded into the
real edspdf module (`load_state_dict(strict=True)`), must make *edspdf's own
forward* compute what ours does; what edspdf exports, loaded into ours and
exported again, must give edspdf back its own outputs.

An export that agrees with our own reload can still be wrong for edspdf:
edspdf registers one shared module under two names, and a strict load
copies both names into it (issue 19: zeros written under an unread alias
overwrote the shared positional projection, silently).
"""

import itertools

import numpy as np
import pytest
import torch

from helpers import edspdf_module, run_edspdf, to_numpy
from keras_relattn import (
    BoxTransformer,
    RelativeAttention,
    RelativeTransformerLayer,
    edspdf_state_dict,
    load_edspdf_state_dict,
)
from parity_cases import ALL_MODES

# Compares with the real edspdf or DeBERTa: a skip here fails the run (conftest).
pytestmark = pytest.mark.reference

ATOL = 1e-4
SHARING = [
    dict(same_key_query_proj=a, same_positional_key_query_proj=b)
    for a, b in itertools.product([False, True], repeat=2)
]
TABLE_SHAPE = (9, 8)  # 2 coordinates x 4 features


def valid(mode, table):
    """Without a table only c2c can be computed: a mode without it cannot run."""
    return table or "c2c" in mode


ATTENTION_CASES = [
    pytest.param(mode, sharing, table, id=f"{'+'.join(mode)}-{i}-{'table' if table else 'none'}")
    for mode in ALL_MODES
    for i, sharing in enumerate(SHARING)
    for table in (True, False)
    if valid(mode, table)
]


def into_edspdf(layer, module):
    """Our export, loaded strictly into the edspdf `module`."""
    state = {k: torch.from_numpy(v) for k, v in edspdf_state_dict(layer).items()}
    module.load_state_dict(state, strict=True)
    return module


def randomize(layer, rng):
    """Every weight of ours random (biases and the table too)."""
    for weight in layer.weights:
        weight.assign(rng.normal(0.0, 0.5, size=weight.shape).astype("float32"))


def assert_close(ours, theirs):
    ours = ours if isinstance(ours, (tuple, list)) else (ours,)
    theirs = theirs if isinstance(theirs, (tuple, list)) else (theirs,)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        a, b = to_numpy(a), np.asarray(b)
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def attention_inputs(rng, table):
    x = rng.normal(size=(2, 4, 8)).astype("float32")
    return dict(
        content_queries=x, content_keys=x, content_values=x,
        mask=rng.random((2, 4)) > 0.2,
        relative_positions=rng.integers(-6, 7, size=(2, 4, 4, 2)) if table else None,
    )


@pytest.mark.parametrize("mode, sharing, table", ATTENTION_CASES)
def test_attention_round_trips_end_in_edspdf(mode, sharing, table, rng):
    ctor = dict(mode=mode, n_coordinates=2, n_additional_heads=1, **sharing)
    table_array = rng.normal(size=TABLE_SHAPE).astype("float32") if table else None
    inputs = attention_inputs(rng, table)

    # edspdf -> ours -> edspdf: edspdf's forward before and after agree.
    original = edspdf_module(rng, 8, 2, table=table_array, **ctor)
    before = run_edspdf(original, inputs)
    layer = RelativeAttention(
        8, 2, position_embedding_shape=TABLE_SHAPE if table else None, **ctor
    )
    load_edspdf_state_dict(layer, original.state_dict())
    assert_close(layer(**inputs), before)
    fresh = edspdf_module(rng, 8, 2, table=table_array, **ctor)
    assert_close(run_edspdf(into_edspdf(layer, fresh), inputs), before)

    # ours (random) -> edspdf: edspdf computes what we compute.
    randomize(layer, rng)
    assert_close(layer(**inputs), run_edspdf(into_edspdf(layer, fresh), inputs))


# The transformer layers share no projection: every mode, with and without a table.
MODE_TABLE_CASES = [
    pytest.param(mode, table, id=f"{'+'.join(mode)}-{'table' if table else 'none'}")
    for mode in ALL_MODES
    for table in (True, False)
    if valid(mode, table)
]


@pytest.mark.parametrize("mode, table", MODE_TABLE_CASES)
def test_transformer_layer_round_trips_end_in_edspdf(mode, table, rng):
    from edspdf.layers.box_transformer import BoxTransformerLayer

    size, heads = 16, 2
    table_array = rng.normal(size=TABLE_SHAPE).astype("float32") if table else None

    def module():
        made = BoxTransformerLayer(
            size, num_heads=heads, attention_mode=mode, init_resweight=0.3,
            position_embedding=None if table_array is None else torch.tensor(table_array),
        )
        with torch.no_grad():
            for p in made.parameters():
                p.copy_(torch.tensor(rng.normal(0, 0.3, size=p.shape)))
        return made.eval()

    x = rng.normal(size=(3, 6, size)).astype("float32")
    mask = rng.random((3, 6)) > 0.2
    rel = rng.integers(-6, 7, size=(3, 6, 6, 2)) if table else None

    def edspdf_forward(m):
        with torch.no_grad():
            positions = None if rel is None else torch.tensor(rel)
            return [t.numpy() for t in m(torch.tensor(x), torch.tensor(mask), positions)]

    original = module()
    before = edspdf_forward(original)
    ours = RelativeTransformerLayer(
        size, heads, attention_mode=mode,
        position_embedding_shape=TABLE_SHAPE if table else None,
    )
    load_edspdf_state_dict(ours, original.state_dict())
    assert_close(ours(x, mask=mask, relative_positions=rel), before)
    fresh = module()
    assert_close(edspdf_forward(into_edspdf(ours, fresh)), before)

    randomize(ours, rng)
    assert_close(ours(x, mask=mask, relative_positions=rel),
                 edspdf_forward(into_edspdf(ours, fresh)))


@pytest.mark.parametrize("mode, table", MODE_TABLE_CASES)
def test_box_transformer_round_trips_end_in_edspdf(mode, table, rng):
    from edspdf.layers.box_transformer import BoxTransformerModule
    from test_box_transformer import SIZE, pages

    kwargs = dict(num_heads=2, n_layers=2, attention_mode=mode, init_resweight=0.4,
                  n_relative_positions=16 if table else None)

    def module():
        made = BoxTransformerModule(SIZE, **kwargs).eval()
        with torch.no_grad():
            for p in made.parameters():
                p.copy_(torch.tensor(rng.normal(0.0, 0.5, size=p.shape)))
        return made

    theirs, inputs = pages(rng)
    real = inputs["mask"]  # padded lines are computed from padding on both sides

    def edspdf_forward(m):
        with torch.no_grad():
            return m(*theirs).as_tensor().numpy()[real]

    original = module()
    before = edspdf_forward(original)
    ours = BoxTransformer(SIZE, **kwargs)
    load_edspdf_state_dict(ours, original.state_dict())
    assert_close(to_numpy(ours(**inputs))[real], before)
    fresh = module()
    assert_close(edspdf_forward(into_edspdf(ours, fresh)), before)

    randomize(ours, rng)
    assert_close(to_numpy(ours(**inputs))[real], edspdf_forward(into_edspdf(ours, fresh)))
