"""Quiet start of `python -m keras_relattn` (the demo): the demo prints its
own lines, not TensorFlow's C++ start-up notices (oneDNN, CPU features,
absl), which ignore `TF_CPP_MIN_LOG_LEVEL` because they are written before
TensorFlow reads it.

Imported by the package's `__init__` only while `python -m` is locating
this package (`sys.argv[0] == "-m"`): importing keras_relattn anywhere else
never touches the process' stderr.
"""

import os


def _import_keras():
    import keras  # noqa: F401

    # On every backend, Keras imports TensorFlow (when installed) the first
    # time it serializes an object, as the demo's save does: have Keras do
    # that import now, while it is quiet.
    try:
        from keras.src.utils import module_utils

        module_utils.tensorflow.available  # noqa: B018
    except (ImportError, AttributeError):  # pragma: no cover - other Keras layouts
        pass


def import_keras_quietly():
    """Imports Keras, its backend (and TensorFlow where installed) with file
    descriptor 2 sent to /dev/null, then restores it; an import error is
    raised after the restore, so its traceback is seen."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to silence
        _import_keras()
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            _import_keras()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
