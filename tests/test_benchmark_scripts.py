"""The issue-37 benchmark scripts run end to end (smoke runs: no timing is
asserted). They compare nothing with edspdf or DeBERTa, and each is the same
script on every backend: run once, in the torch run."""

import os
import subprocess
import sys

import pytest

from helpers import BACKEND

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(
    BACKEND != "torch", reason="a backend-generic script, run once: in the torch run")


def run_script(*argv):
    return subprocess.run(
        [sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, KERAS_BACKEND=BACKEND, TF_CPP_MIN_LOG_LEVEL="2"),
    )


def test_band_crossover_runs():
    """The table behind the backends' `band_min_keys`: both paths timed, the
    band taken where it fits."""
    done = run_script(os.path.join("benchmarks", "band_crossover.py"), "--backend", BACKEND,
                      "--lengths", "256", "--repeats", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    row = [line.split() for line in done.stdout.splitlines() if line.strip().startswith("256")]
    assert len(row) == 1 and len(row[0]) == 4, done.stdout  # no "(no band ...)" note
    assert float(row[0][3]) > 0


def test_flash_floor_runs():
    """torch's CPU flash kernel: one full call against the far keys' two
    causal calls."""
    done = run_script(os.path.join("benchmarks", "flash_floor.py"), "--length", "256",
                      "--repeats", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "two causal" in done.stdout and "stacked causal" in done.stdout
