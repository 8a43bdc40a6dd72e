"""keras.distribution: DataParallel and ModelParallel with sharded heads."""

import os
import subprocess
import sys

import pytest

from helpers import BACKEND

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.skipif(
    BACKEND != "jax",
    reason="keras.distribution's DataParallel/ModelParallel run on the JAX "
    "backend; this check starts its own JAX process (8 virtual CPU devices), "
    "so it runs once, from the JAX suite",
)
def test_data_and_model_parallel_match_one_device():
    env = dict(
        os.environ,
        KERAS_BACKEND="jax",
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    done = subprocess.run(
        [sys.executable, os.path.join(HERE, "distribution_check.py")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "DataParallel (8 devices)" in done.stdout
    assert "ModelParallel (2 x 4 mesh, heads sharded)" in done.stdout
    assert "distribution ok" in done.stdout
