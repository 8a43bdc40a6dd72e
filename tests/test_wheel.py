"""The package as users install it: `python -m build` makes an sdist and,
from it, a wheel, with no deprecation warning; `twine check` passes on both;
the wheel, installed in a new environment with no checkout beside it, runs
the README's demo and prints what the README says; `__version__` is the
installed metadata's version.

In the TensorFlow run only (the demo's default backend), in 15-40 s:
the sources are copied to a temporary folder (the build writes nothing in the
checkout), built once, and the wheel installed `--no-deps` in a new virtual
environment that then sees this environment's packages (Keras, TensorFlow)
through a `.pth` line, but not its editable keras_relattn.
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest

from helpers import BACKEND

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(
    BACKEND != "tensorflow", reason="the wheel is built and its demo run once, in the "
    "TensorFlow run (the demo's default backend)")

# What a build could not fetch says so in pip's words (an isolated build
# installs the build backend, setuptools, into a new environment first).
UNFETCHABLE = ("Could not find a version", "No matching distribution",
               "Failed to establish a new connection", "Temporary failure in name resolution",
               "Network is unreachable")


def run(command, **kwargs):
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")}
    env.update(kwargs.pop("env", {}))
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env,
                          **kwargs)


def build(source, dist):
    """`python -m build`: the sdist, then the wheel from it. Without build
    isolation where this environment has the build backend (fast, offline),
    else isolated, fetching it; a backend that cannot be fetched skips."""
    done = run([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, source])
    if done.returncode and re.search(r"(Missing|Unmet) dependencies", done.stdout + done.stderr):
        done = run([sys.executable, "-m", "build", "--outdir", dist, source])
        output = done.stdout + done.stderr
        said = [line.strip() for line in output.splitlines()
                if any(sign in line for sign in UNFETCHABLE)]
        if done.returncode and said:
            pytest.skip("the build backend (pyproject.toml's [build-system] requires) is not "
                        f"installed here and could not be fetched: {said[0]}")
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def demo_output_stated(document):
    """The demo's output as a document states it: its `text` block that starts
    with the demo's first line."""
    with open(os.path.join(ROOT, document)) as f:
        match = re.search(r"```text\n(keras .*?)\n```", f.read(), re.S)
    assert match, f"{document} does not state what the demo prints"
    return match.group(1).splitlines()


def normalized(lines):
    """The lines, less what varies with the installed Keras: its version, and
    the size of the `.keras` file it writes."""
    lines = [re.sub(r"^keras \S+ on", "keras X on", line) for line in lines]
    return [re.sub(r"\(\d+ bytes\)", "(N bytes)", line) for line in lines]


def test_the_readme_and_the_install_page_state_the_same_demo_output():
    assert demo_output_stated("README.md") == demo_output_stated("docs/install.md")


def test_the_wheel_installs_and_runs_the_demo_in_a_new_environment(tmp_path):
    missing = [p for p in ("build", "twine") if importlib.util.find_spec(p) is None]
    assert not missing, f"{missing} not installed: the test extra has both (.ci/run installs it)"
    source, dist = tmp_path / "source", tmp_path / "dist"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "venv", "build", "dist", "site", "*.egg-info", "__pycache__",
        ".pytest_cache", ".hypothesis", "bench_out", "notebooks"))
    output = build(str(source), str(dist))
    assert not re.search(r"deprecat", output, re.I), [
        line for line in output.splitlines() if re.search(r"deprecat", line, re.I)]
    wheels = sorted(dist.glob("*.whl"))
    sdists = sorted(dist.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(os.listdir(dist))

    checked = run([sys.executable, "-m", "twine", "check", "--strict", str(wheels[0]),
                   str(sdists[0])])
    assert checked.returncode == 0, checked.stdout + checked.stderr

    # A new environment with the wheel alone, then this one's packages behind it.
    env = tmp_path / "env"
    made = run([sys.executable, "-m", "venv", "--without-pip", str(env)])
    assert made.returncode == 0, made.stderr
    python = str(env / "bin" / "python")
    installed = run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
                     "--no-index", "--no-compile", str(wheels[0])])
    assert installed.returncode == 0, installed.stdout + installed.stderr
    found = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    with open(os.path.join(found.stdout.strip(), "test_env_packages.pth"), "w") as f:
        f.write("\n".join(sorted(ours)) + "\n")

    elsewhere = tmp_path / "elsewhere"  # no checkout beside it
    elsewhere.mkdir()
    demo = run([str(env / "bin" / "keras-relattn-demo")], cwd=elsewhere,
               env={"KERAS_BACKEND": "tensorflow"})
    assert demo.returncode == 0, demo.stdout + demo.stderr
    lines = (demo.stdout + demo.stderr).strip().splitlines()
    assert normalized(lines) == normalized(demo_output_stated("README.md")), lines

    # Where the package and the demo come from, and the versions, without
    # importing them (Keras and TensorFlow took their time in the demo).
    code = ("import ast, importlib.metadata, importlib.util; "
            "package = importlib.util.find_spec('keras_relattn').origin; "
            "print(package); print(importlib.util.find_spec('keras_relattn_demo').origin); "
            "tree = ast.parse(open(package).read()); "
            "print([n.value.value for n in tree.body if isinstance(n, ast.Assign) "
            "and getattr(n.targets[0], 'id', '') == '__version__'][0], "
            "importlib.metadata.version('keras-relattn'))")
    where = run([python, "-c", code], cwd=elsewhere)
    assert where.returncode == 0, where.stderr
    package, module, versions = where.stdout.strip().splitlines()
    site = found.stdout.strip()
    assert package.startswith(site) and module.startswith(site), (package, module, site)
    version, metadata = versions.split()
    assert version == metadata == wheels[0].name.split("-")[1]
