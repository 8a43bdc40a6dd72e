"""`keras-relattn-demo`: the package's demo (`keras_relattn.__main__`), its
own lines only.

TensorFlow writes C++ start-up notices (oneDNN, CPU features, absl) to stderr
when it is imported, before it reads `TF_CPP_MIN_LOG_LEVEL`. This module sits
outside the package so that it can import Keras (and TensorFlow, which Keras
imports on every backend the first time it serializes an object, as the demo's
save does) with file descriptor 2 sent to /dev/null, before the package
imports them (the package itself first, which imports Keras); importing
`keras_relattn` writes nothing to stderr itself.
"""

import os
import sys


def _import_keras():
    # The package first: it loads triton (the CUDA build of torch's) before
    # Keras loads TensorFlow (keras_relattn/_import_order.py).
    import keras_relattn  # noqa: F401
    import keras  # noqa: F401

    try:
        from keras.src.utils import module_utils

        module_utils.tensorflow.available  # noqa: B018
    except (ImportError, AttributeError):  # pragma: no cover - other Keras layouts
        pass


def _import_keras_quietly():
    """Imports Keras and its backend with fd 2 sent to /dev/null, then
    restores it; an import error is raised after the restore, so its
    traceback is seen."""
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


def main():
    _import_keras_quietly()
    from keras_relattn.__main__ import main as demo

    return demo()


if __name__ == "__main__":
    sys.exit(main())
