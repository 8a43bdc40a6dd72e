"""The benchmark runs end to end (a smoke run: no timing is asserted)."""

import json
import os
import subprocess
import sys

from helpers import BACKEND

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
    assert all(ms > 0 for ms in w1["median_ms"].values())
    # Page faults per timed call, for every system (the README's last column).
    assert set(w1["faults_per_call"]) == set(w1["median_ms"])
    assert all(n >= 0 for n in w1["faults_per_call"].values())
    assert "faults/call" in done.stdout
    assert w1["max_abs_error_vs_edspdf"] < 1e-4
    assert "/ edspdf" in done.stdout and "W1" in done.stdout
