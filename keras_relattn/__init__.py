"""keras-relattn: DeBERTa-style relative attention for Keras 3 (TF, JAX, torch)."""

import sys as _sys

if _sys.argv[:1] == ["-m"]:  # `python -m keras_relattn`: the demo is starting
    from keras_relattn._demo_start import import_keras_quietly as _quiet

    _quiet()

from keras_relattn import config, positions
from keras_relattn.box_transformer import BoxTransformer
from keras_relattn.porting import edspdf_state_dict, load_edspdf_state_dict
from keras_relattn.position_table import PositionTable
from keras_relattn.positions import sinusoidal_table
from keras_relattn.relative_attention import RelativeAttention
from keras_relattn.transformer import RelativeTransformerLayer

__version__ = "0.1.0"

__all__ = [
    "BoxTransformer",
    "PositionTable",
    "RelativeAttention",
    "RelativeTransformerLayer",
    "config",
    "edspdf_state_dict",
    "load_edspdf_state_dict",
    "positions",
    "sinusoidal_table",
]
