"""The README is what runs: its commands, its code, its tables.

Its first two commands (the demo and the tests) and `.ci/run`, every Python
block (unless marked not executed), the `LayoutMap` lines, the error table
(error_cases.py) and the performance tables (benchmarks/*.json).
"""

import os
import re
import subprocess
import sys

import pytest

from error_cases import CASES
from helpers import BACKEND

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def readme_commands():
    return re.findall(r"```bash\n(.*?)\n```", readme(), re.S)


def test_readme_starts_with_demo_and_test_commands():
    demo, tests = readme_commands()[:2]
    assert "python -m keras_relattn" in demo
    assert "python tests/run_all_backends.py" in tests
    assert "torch==2.13.0" in tests.split(".[test]")[0]  # pinned torch first


def test_ci_runs_the_readme_test_command():
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    assert readme_commands()[1] in ci


def readme_python_blocks():
    text = readme()
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
    with open(os.path.join(ROOT, "tests", "distribution_check.py")) as f:
        check = f.read()
    for line in re.findall(r'^layouts\["[^\n]*', readme(), re.M):
        assert line.strip() in check.replace("    layouts", "layouts"), line


def test_readme_has_the_error_table():
    text = readme()
    for case in CASES:
        assert f"| {case.situation} | `{case.error.__name__}` |" in text


def test_demo_prints_its_own_lines_only():
    """`python -m keras_relattn`: no TensorFlow start-up notices around them."""
    done = subprocess.run(
        [sys.executable, "-m", "keras_relattn"], cwd=ROOT, capture_output=True, text=True,
        env=dict(os.environ, KERAS_BACKEND=BACKEND), timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert lines[0].startswith("keras ") and lines[-1] == "ok", lines
    assert not [line for line in lines if "oneDNN" in line or "absl" in line], lines


def test_readme_performance_tables_are_the_benchmark_runs():
    """The README's numbers are the JSON runs in benchmarks/, not hand-copied."""
    import runpy

    script = runpy.run_path(os.path.join(ROOT, "benchmarks", "readme_tables.py"))
    for key, text in script["tables"]().items():
        document = script["DOCUMENTS"][key]
        with open(os.path.join(ROOT, document)) as f:
            assert f"<!-- {key} -->\n{text}\n" in f.read(), f"{document}: table {key} is stale"
