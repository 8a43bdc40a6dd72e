"""keras-relattn: DeBERTa-style relative attention for Keras 3 (TF, JAX, torch)."""

from keras_relattn.porting import edspdf_state_dict, load_edspdf_state_dict
from keras_relattn.position_table import PositionTable
from keras_relattn.relative_attention import RelativeAttention

__version__ = "0.1.0"

__all__ = [
    "PositionTable",
    "RelativeAttention",
    "edspdf_state_dict",
    "load_edspdf_state_dict",
]
