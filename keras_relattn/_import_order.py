"""Loads triton before TensorFlow, where both are installed.

TensorFlow 2.20+ loads its shared library with `RTLD_GLOBAL`; triton's LLVM
imported after it binds to TensorFlow's symbols and the process segfaults
(tensorflow/tensorflow#124205). Triton comes with the default (CUDA) build
of torch, and `torch._dynamo` imports it: so `transformers` (DeBERTa's
reference) or `torch.compile` after TensorFlow crash a porting program on any
Keras backend (Keras imports TensorFlow to serialize, whatever the backend).
Imported the other way round, both work (POT did the same, PythonOT/POT#839).

This module imports nothing of Keras: `keras_relattn/__init__.py` runs it
first, before Keras loads TensorFlow.
"""

import importlib.util
import sys
import warnings

UPSTREAM = "https://github.com/tensorflow/tensorflow/issues/124205"


def _installed(name):
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken or half-installed package
        return False


def load_triton_first():
    """Imports triton now if it is installed, TensorFlow is installed too and
    not loaded yet; warns if TensorFlow was loaded first. Returns whether
    triton is loaded."""
    if "triton" in sys.modules:
        return True
    if not _installed("triton") or not _installed("tensorflow"):
        return False
    if "tensorflow" in sys.modules:
        warnings.warn(
            "TensorFlow was imported before triton (installed with the CUDA build of "
            "torch): importing triton now, or `transformers` / `torch.compile`, which "
            "import it, will crash this process. Import `keras_relattn` (or triton) "
            f"before TensorFlow. See {UPSTREAM}.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - a triton that cannot load changes nothing here
        return False
    return True
