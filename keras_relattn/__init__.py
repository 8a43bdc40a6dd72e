"""keras-relattn: DeBERTa-style relative attention for Keras 3 (TF, JAX, torch)."""

# First, before anything imports Keras (and so TensorFlow): see _import_order.
from keras_relattn import _import_order

_import_order.load_triton_first()

from keras_relattn import config, deberta, positions  # noqa: E402
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
    "deberta",
    "edspdf_state_dict",
    "load_edspdf_state_dict",
    "positions",
    "sinusoidal_table",
]
