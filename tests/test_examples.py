"""The example on real data (examples/digits.py): a shortened run on this
backend, and the numbers in its documentation page are its full run's."""

import json
import os
import runpy
import subprocess
import sys

import pytest

from helpers import BACKEND

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "digits.py")


@pytest.mark.skipif(BACKEND != "tensorflow", reason="the example's shortened run is executed "
                    "on the default backend (TensorFlow) only, as the tour notebook; the layer "
                    "itself is tested on every backend by the other modules")
def test_the_digits_example_runs_shortened(tmp_path):
    done = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--out", str(tmp_path)], cwd=ROOT,
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, KERAS_BACKEND=BACKEND, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    assert results["backend"] == BACKEND and results["train_images"] == 300
    for kind in ("relative", "absolute"):
        model = results["models"][kind]
        assert set(model["accuracy"]) == {"0", "1", "2"}
        assert all(0.0 <= a <= 1.0 for a in model["accuracy"].values())
        # Both models train: 4 epochs take the loss from ~2.5 to ~2.3 on every
        # backend (chance-level accuracy: this shortened run only checks that
        # the script runs; the page's numbers are the full run's).
        loss = model["loss"]
        assert len(loss) == 4 and loss[-1] < loss[0] - 0.1, loss
    for figure in ("accuracy.png", "logits.png"):
        assert (tmp_path / figure).stat().st_size > 1000


def test_the_digits_page_shows_the_committed_run():
    example = runpy.run_path(SCRIPT)
    with open(os.path.join(ROOT, "docs", "examples", "results.json")) as f:
        results = json.load(f)
    assert results["epochs"] == 30 and results["train_images"] == 1297
    with open(os.path.join(ROOT, "docs", "examples", "digits.md")) as f:
        page = f.read()
    assert "<!-- digits -->\n" + example["table"](results) + "\n" in page


LONG_DOCUMENTS = os.path.join(ROOT, "examples", "long_documents.py")


@pytest.mark.skipif(BACKEND != "torch", reason="the example runs on torch, its default (the "
                    "fastest of the three on a CPU, its docstring says); the DeBERTa port is "
                    "tested on every backend by test_deberta*.py")
def test_the_long_documents_example_runs_shortened(tmp_path):
    done = subprocess.run(
        [sys.executable, LONG_DOCUMENTS, "--quick", "--out", str(tmp_path)], cwd=ROOT,
        capture_output=True, text=True, timeout=600, env=dict(os.environ, KERAS_BACKEND=BACKEND),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    with open(tmp_path / "long_documents.json") as f:
        results = json.load(f)
    assert results["backend"] == BACKEND and results["steps"] == 3
    for length in (str(results["short"]), str(results["long"])):
        curve = results["fine_tuning"][length]["curve"]
        assert [step for step, _ in curve][-1] == 3
        assert all(0.0 <= accuracy <= 1.0 for _, accuracy in curve)
    timed = results["step_seconds"]
    assert timed[0]["keras_relattn"] > 0 and timed[0]["keras_hub"] > 0
    assert (tmp_path / "long_documents.png").stat().st_size > 1000


def test_the_long_documents_page_shows_the_committed_run(monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", BACKEND)  # the script sets a default; keep ours
    example = runpy.run_path(LONG_DOCUMENTS)
    with open(os.path.join(ROOT, "docs", "examples", "long_documents.json")) as f:
        results = json.load(f)
    assert (results["short"], results["long"]) == (512, 4096)
    with open(os.path.join(ROOT, "docs", "examples", "long_documents.md")) as f:
        page = f.read()
    assert "<!-- long_documents -->\n" + example["table"](results) + "\n" in page
