"""The README's commands, .ci/run, and the docstring examples."""

import doctest
import importlib
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = [
    "keras_relattn.relative_attention",
    "keras_relattn.porting",
    "keras_relattn.position_table",
    "keras_relattn.positions",
    "keras_relattn.transformer",
]


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


def readme_python_blocks():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    blocks = []
    for match in re.finditer(r"(<!--[^>]*-->\n)?```python\n(.*?)\n```", text, re.S):
        if match.group(1) and "not executed" in match.group(1):
            continue
        blocks.append(match.group(2))
    return blocks


@pytest.mark.parametrize("index", range(len(readme_python_blocks())))
def test_readme_python_block_runs(index):
    exec(compile(readme_python_blocks()[index], f"README block {index}", "exec"), {})


def test_readme_layout_map_is_the_one_tested():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    with open(os.path.join(ROOT, "tests", "distribution_check.py")) as f:
        check = f.read()
    for line in re.findall(r'^layouts\["[^\n]*', readme, re.M):
        assert line.strip() in check.replace("    layouts", "layouts"), line


def public_objects():
    import keras_relattn
    from keras_relattn import positions

    names = [getattr(keras_relattn, n) for n in keras_relattn.__all__ if n != "positions"]
    names += [getattr(positions, n) for n in dir(positions)
              if n.endswith(("_positions", "_table")) and callable(getattr(positions, n))]
    return names


@pytest.mark.parametrize("obj", public_objects(), ids=lambda o: o.__name__)
def test_public_names_have_kerashub_style_docstrings(obj):
    doc = obj.__doc__ or ""
    for section in ("Args:", "Returns:", "Example:", "References:"):
        assert section in doc, f"{obj.__name__} lacks {section}"
    assert ">>>" in doc


def test_readme_performance_tables_are_the_benchmark_runs():
    """The README's numbers are the JSON runs in benchmarks/, not hand-copied."""
    import runpy

    script = runpy.run_path(os.path.join(ROOT, "benchmarks", "readme_tables.py"))
    for key, text in script["tables"]().items():
        document = script["DOCUMENTS"][key]
        with open(os.path.join(ROOT, document)) as f:
            assert f"<!-- {key} -->\n{text}\n" in f.read(), f"{document}: table {key} is stale"
