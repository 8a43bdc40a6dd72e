"""TensorFlow and triton in one process (tensorflow/tensorflow#124205).

Triton comes with the default (CUDA) build of torch, and with the test extra
on Linux x86-64 (so that this runs on a machine with the CPU build too).
TensorFlow 2.20+ loaded first makes triton's import segfault; `transformers`
and `torch._dynamo` import triton. Each scenario runs in a subprocess, so
that a segfault fails a test instead of killing the test runner.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

from helpers import BACKEND

TRITON = importlib.util.find_spec("triton") is not None
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(code, backend=BACKEND):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def assert_ran(done):
    # A segfault is a negative return code (-11), never an exception.
    assert done.returncode == 0, (done.returncode, done.stderr[-3000:])


def test_porting_after_the_package_on_any_backend_does_not_crash():
    """The package, then Keras' TensorFlow (loaded to serialize, on every
    backend), then DeBERTa's reference and torch's compiler: what a porting
    program does."""
    done = run(
        "import sys\n"
        "import keras_relattn, keras\n"
        "from keras.src.utils import module_utils\n"
        "module_utils.tensorflow.available\n"
        "import tensorflow\n"
        "from transformers import DebertaV2Model\n"
        "import torch._dynamo\n"
        "names = list(sys.modules)\n"
        "print('triton' in names and names.index('triton') < names.index('tensorflow'))\n"
    )
    assert_ran(done)
    assert done.stdout.strip().splitlines()[-1] == str(TRITON)


ONCE = pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason="the same subprocess whatever the backend under test: it runs once, in the "
           "TensorFlow run (the porting program above runs on every backend)")


@ONCE
def test_tensorflow_imported_first_warns_where_triton_would_crash():
    """Too late to reorder: the package says so (where triton is installed)
    rather than leave a segfault for later; without triton, nothing. (On
    the torch backend, Keras' own import of `torch._dynamo` would crash
    before the package is reached: this runs on TensorFlow.)"""
    done = run("import warnings\nwarnings.simplefilter('always')\n"
               "import tensorflow\nimport keras_relattn\n")
    assert_ran(done)
    warned = "TensorFlow was imported before triton" in done.stderr
    assert warned == TRITON
    if TRITON:
        assert "tensorflow/tensorflow/issues/124205" in done.stderr


@ONCE
def test_the_crash_this_guards_against_is_real():
    """TensorFlow, then triton, crashes this environment: the order above is
    what makes the first test pass, not luck."""
    if not TRITON:
        pytest.skip("triton is not installed (the test extra installs it on Linux x86-64)")
    done = run("import tensorflow\nimport triton\n")
    assert done.returncode != 0
