"""pytest fixtures for every test module (helpers are in helpers.py). The backend
is chosen by KERAS_BACKEND, one process each."""

# The package first: it loads triton (the CUDA build of torch's, and the test
# extra's) before Keras loads TensorFlow, which would crash the first import
# of `transformers` or `torch._dynamo` after it (keras_relattn/_import_order.py).
import keras_relattn  # noqa: F401, I001

import keras
import numpy as np
import pytest

BACKEND = keras.backend.backend()


def pytest_report_header(config):
    return f"keras {keras.__version__}, backend {BACKEND}"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "reference: compares with the real edspdf or DeBERTa code; never skipped"
    )
    config.addinivalue_line(
        "markers", "default_band_rule: runs under the backend's measured band_min_keys"
    )


_SKIPPED_REFERENCES = []


def pytest_runtest_logreport(report):
    if report.skipped and "reference" in report.keywords:
        _SKIPPED_REFERENCES.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    """A comparison with edspdf or DeBERTa that was skipped fails the run:
    a missing reference must never pass as a green suite."""
    if _SKIPPED_REFERENCES:
        print("\nSkipped comparisons with edspdf / DeBERTa (this fails the run):")
        for nodeid in _SKIPPED_REFERENCES:
            print("  " + nodeid)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True)
def _reset_keras_state():
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(1234)
    yield
    keras.config.set_dtype_policy("float32")


@pytest.fixture(autouse=True)
def _band_wherever_it_fits(request):
    """The banded path wherever the band fits (`band_min_keys=1`): the
    suite's inputs are short, and the band must meet its references there.
    The backends' measured default, which gives short inputs the per-token
    path on eager torch, is tested apart (marked `default_band_rule`)."""
    if "default_band_rule" in request.keywords:
        yield
        return
    with keras_relattn.config.block_settings(band_min_keys=1):
        yield


@pytest.fixture
def rng():
    return np.random.default_rng(20261127)
