"""The tour notebook runs top to bottom (default backend) and is committed run."""

import importlib.util
import os
import re

import nbformat
import pytest

from helpers import BACKEND

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "tour.ipynb")


def load_make_tour():
    """notebooks/make_tour.py as a module (it is no package)."""
    spec = importlib.util.spec_from_file_location(
        "make_tour", os.path.join(ROOT, "notebooks", "make_tour.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_notebook_has_its_outputs_and_plots():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code)
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2
    make_tour = load_make_tour()

    # The committed notebook is the one make_tour.py writes (cells unchanged).
    assert [c.source for c in nb.cells] == [c.source for c in make_tour.build().cells]


@pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason="the tour is executed on the default backend (TensorFlow) only; the "
    "layer itself is tested on every backend by the other modules",
)
def test_tour_notebook_executes(tmp_path):
    make_tour = load_make_tour()

    nb = make_tour.execute(make_tour.build(), cwd=str(tmp_path))
    text = "\n".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )
    accuracy = dict(re.findall(r"^(\S+)\s+test accuracy ([0-9.]+)", text, re.M))
    assert float(accuracy["c2c+c2p+p2c"]) > 0.9, text
    assert float(accuracy["c2c"]) < 0.5, text
    assert "identical predictions after reloading: True" in text
    assert "exported back into edspdf: ok" in text
