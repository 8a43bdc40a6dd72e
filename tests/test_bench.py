"""The benchmark runs end to end (a smoke run: no timing is asserted)."""

import json
import os
import subprocess
import sys

import pytest

from helpers import BACKEND

# Compares with the real edspdf or DeBERTa: a skip here fails the run (conftest).
pytestmark = pytest.mark.reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_runs_and_checks_agreement_with_edspdf(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, os.path.join("benchmarks", "bench.py"), "--workloads", "W1", "--repeats", "1",
         "--systems", "ours,keras_mha,edspdf", "--json", str(out)],
        cwd=ROOT, env=dict(os.environ, KERAS_BACKEND=BACKEND, TF_CPP_MIN_LOG_LEVEL="2"),
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert result["backend"] == BACKEND
    w1 = result["workloads"]["W1"]
    assert set(w1["median_ms"]) == {"ours", "keras_mha", "edspdf"}
    # Page faults per timed call, for every system (the README's last column).
    assert set(w1["faults_per_call"]) == set(w1["median_ms"])
    assert all(n >= 0 for n in w1["faults_per_call"].values())
    assert "faults/call" in done.stdout
    assert w1["max_abs_error_vs_edspdf"] < 1e-4
    assert "/ edspdf" in done.stdout and "W1" in done.stdout


def run_script(*argv):
    return subprocess.run(
        [sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, KERAS_BACKEND=BACKEND, TF_CPP_MIN_LOG_LEVEL="2"),
    )


def test_long_training_benchmark_runs(tmp_path):
    """`--long --backward` at a short length (each point in its own process)
    with the BoxTransformer system (the other systems run the same code),
    and compiled on TensorFlow (one XLA backend: the option is the same)."""
    out = tmp_path / "long.json"
    done = run_script(os.path.join("benchmarks", "bench.py"), "--long", "--backward",
                      "--long-lengths", "64", "--long-systems", "box_transformer",
                      "--json", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    point = json.loads(out.read_text())["points"]["box_transformer"]["64"]
    assert set(point) >= {"ms", "peak_bytes"}
    if BACKEND == "tensorflow":
        done = run_script(os.path.join("benchmarks", "bench.py"), "--long", "--backward",
                          "--long-compiled", "--long-lengths", "64",
                          "--long-systems", "ours_tokens", "--json", str(out))
        assert done.returncode == 0, done.stdout + done.stderr
        result = json.loads(out.read_text())
        assert result["mode"] == "long_backward_compiled"
        assert set(result["points"]["ours_tokens"]["64"]) >= {"ms", "peak_bytes"}


def test_profile_of_the_long_step_runs():
    done = run_script(os.path.join("benchmarks", "profile_long.py"), "--backend", BACKEND,
                      "--length", "64")
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("keras_mha", "c2c", "c2c+c2p", "every term"):
        assert f"fwd+bwd  {name}" in done.stdout
    if BACKEND == "torch":
        assert "aten::" in done.stdout
    if BACKEND == "tensorflow":
        assert "its gradient" in done.stdout

