"""The README's commands, .ci/run, and the docstring examples."""

import doctest
import importlib
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ["keras_relattn.relative_attention", "keras_relattn.porting"]


def readme_commands():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    return re.findall(r"```bash\n(.*?)\n```", text, re.S)


def test_readme_starts_with_demo_and_test_commands():
    demo, tests = readme_commands()[:2]
    assert "python -m keras_relattn" in demo
    assert "python tests/run_all_backends.py" in tests
    assert "torch==2.13.0" in tests.split(".[test]")[0]  # pinned torch first


def test_ci_runs_the_readme_test_command():
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    assert readme_commands()[1] in ci


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
