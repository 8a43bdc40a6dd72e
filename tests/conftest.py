"""Shared helpers. The backend is chosen by KERAS_BACKEND, one process each."""

import os

import keras
import numpy as np
import pytest

BACKEND = keras.backend.backend()


def pytest_report_header(config):
    return f"keras {keras.__version__}, backend {BACKEND}"


@pytest.fixture(autouse=True)
def _reset_keras_state():
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(1234)
    yield
    keras.config.set_dtype_policy("float32")


def to_numpy(x):
    if x is None:
        return None
    return np.asarray(keras.ops.convert_to_numpy(x))


@pytest.fixture
def rng():
    return np.random.default_rng(20261127)


def edspdf_module(rng, size, n_heads, table=None, trainable_table=False, **kwargs):
    """The real edspdf layer with *every* parameter randomized (biases too)."""
    import torch
    from edspdf.layers.relative_attention import RelativeAttention as Torch

    if table is not None:
        table = torch.tensor(table)
        if trainable_table:
            table = torch.nn.Parameter(table)
    module = Torch(size, n_heads, position_embedding=table, **kwargs)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.tensor(rng.normal(0.0, 0.5, size=param.shape)))
    return module.eval()


def run_edspdf(module, inputs):
    """Calls the torch module with numpy inputs, returns numpy outputs."""
    import torch

    args = {k: None if v is None else torch.as_tensor(v) for k, v in inputs.items()}
    with torch.no_grad():
        out = module(**args)
    if isinstance(out, tuple):
        return tuple(o.numpy() for o in out)
    return out.numpy()


def tmp_keras_path(tmp_path, name="model.keras"):
    return os.fspath(tmp_path / name)
