"""The package's shape: backend code in one module, no import cycle, nothing
that needs edspdf or the benchmark."""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "keras_relattn")
MODULES = sorted(f[:-3] for f in os.listdir(PACKAGE) if f.endswith(".py"))


def imported(module):
    """Top-level names of every module `module` imports, anywhere in it."""
    with open(os.path.join(PACKAGE, module + ".py")) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            if node.module == "keras_relattn":
                names |= {f"keras_relattn.{alias.name}" for alias in node.names}
    return names


@pytest.mark.parametrize("module", MODULES)
def test_only_the_kernels_module_imports_a_backend(module):
    backends = {n for n in imported(module) if n.split(".")[0] in ("jax", "tensorflow", "torch")}
    assert module == "_kernels" or not backends, backends


@pytest.mark.parametrize("module", MODULES)
def test_nothing_needs_edspdf_or_the_benchmark(module):
    assert not {n for n in imported(module) if n.split(".")[0] in ("edspdf", "benchmarks")}


def test_no_import_cycle():
    graph = {
        module: {n.split(".")[1] for n in imported(module)
                 if n.startswith("keras_relattn.") and n.split(".")[1] in MODULES}
        for module in MODULES
    }

    def visit(module, path):
        for dependency in graph[module]:
            assert dependency not in path, " -> ".join(path + [dependency])
            visit(dependency, path + [dependency])

    for module in MODULES:
        if module != "__init__":
            visit(module, [module])
