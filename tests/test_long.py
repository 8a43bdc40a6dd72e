"""One long input through the real block sizes, no setting changed.

Other tests shrink the blocks (`config.block_settings`) so that a few
queries make several; this one runs the defaults: a `(1, 3, 2100, 2100)`
input passes the recompute threshold (2**23 elements), so the pooled path
splits it in blocks (2**20 elements on torch eager, 2**23 under XLA's
backends) and recomputes each in the backward pass. The output and the
queries' gradient are compared, on a slice of rows, with edspdf's module run
in float64 (queries do not interact, so a slice of them is its own
attention over every key).
"""

import keras
import numpy as np
import pytest
import torch

from helpers import edspdf_module, input_and_weight_gradients, to_numpy
from keras_relattn import RelativeAttention, config, load_edspdf_state_dict

# Compares with the real edspdf or DeBERTa: a skip here fails the run (conftest).
pytestmark = pytest.mark.reference

N = 2100  # 3 heads (1 additional) x 2100**2 = 13.2M elements > 2**23
ROWS = np.r_[0:2, 248:250, 746:748, 1996:1998, 2098:2100]  # around block edges


def test_a_long_input_through_the_default_blocks_equals_edspdf_in_float64():
    rng = np.random.default_rng(20261204)
    table = rng.normal(size=(33, 16)).astype("float32")
    module = edspdf_module(rng, 16, 2, table=table, n_additional_heads=1)
    layer = RelativeAttention(16, 2, position_embedding=table, n_additional_heads=1)
    load_edspdf_state_dict(layer, module.state_dict())
    x = rng.normal(size=(1, N, 16)).astype("float32")
    mask = rng.random((1, N)) > 0.1
    positions = np.arange(N, dtype="int32")[None, :, None]
    probe = rng.normal(size=(1, N, 16)).astype("float32")
    inputs = dict(content_queries=x, content_keys=x.copy(), content_values=x.copy(), mask=mask,
                  query_positions=positions, key_positions=positions, return_logits=False)
    with config.block_settings() as log:  # the defaults, logged
        pooled = to_numpy(layer(**inputs))
        grads, _ = input_and_weight_gradients(
            layer, lambda out: keras.ops.sum(out * keras.ops.convert_to_tensor(probe)), inputs)
    for plan in log.plans:
        assert plan.n_queries == N and plan.n_blocks > 1 and plan.recomputed

    double = module.double()
    queries = torch.tensor(x[:, ROWS], dtype=torch.float64, requires_grad=True)
    keys = torch.tensor(x, dtype=torch.float64)
    offsets = np.arange(N)[None, :] - ROWS[:, None]
    want, _ = double(queries, keys, keys, mask=torch.tensor(mask),
                     relative_positions=torch.tensor(offsets[None, :, :, None]))
    (want * torch.tensor(probe[:, ROWS], dtype=torch.float64)).sum().backward()
    # float32 sums over 2100 keys against float64: measured 1.5e-6 (outputs of
    # size ~1) and 4e-6 (gradients); 10x margin.
    np.testing.assert_allclose(pooled[:, ROWS], want.detach().numpy(), atol=2e-5, rtol=0)
    np.testing.assert_allclose(grads["content_queries"][:, ROWS], queries.grad.numpy(),
                               atol=5e-5, rtol=0)
