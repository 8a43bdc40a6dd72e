"""The package's shape: backend code in `_backend` only, no import cycle,
nothing that needs edspdf or the benchmark, no import side effect."""

import ast
import os
import re

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "keras_relattn")
MODULES = sorted(
    os.path.relpath(os.path.join(folder, f), PACKAGE)[:-3].replace(os.sep, ".")
    for folder, _, files in os.walk(PACKAGE) for f in files if f.endswith(".py")
)


def imported(module):
    """Top-level names of every module `module` imports, anywhere in it."""
    with open(os.path.join(PACKAGE, module.replace(".", os.sep) + ".py")) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            if node.module == "keras_relattn":
                names |= {f"keras_relattn.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level:  # relative: the package's
            names.add("keras_relattn." + (node.module or ""))
    return names


# Modules that import a backend's package as a file reader, not to compute:
# `_hf_checkpoint` reads a `pytorch_model.bin` (a torch pickle) with `torch.load`.
FILE_READERS = {"_hf_checkpoint": {"torch"}}


@pytest.mark.parametrize("module", MODULES)
def test_only_the_backend_modules_import_a_backend_or_name_one(module):
    """`_backend.<name>` (and its own `_backend.<name>_<part>`) alone imports
    its backend; nothing else compares `keras.backend.backend()` (a file
    reader may import the package that reads its files)."""
    backends = {n for n in imported(module) if n.split(".")[0] in ("jax", "tensorflow", "torch")}
    backends -= FILE_READERS.get(module, set())
    name = module.split(".")[1].split("_")[0] if module.startswith("_backend.") else None
    own = name in ("jax", "tensorflow", "torch")
    assert own or not backends, backends
    if own:
        assert {n.split(".")[0] for n in backends} <= {name}, backends
    with open(os.path.join(PACKAGE, module.replace(".", os.sep) + ".py")) as f:
        source = f.read()
    if module != "_backend.__init__":
        assert not re.search(r"backend\.backend\(\)\s*(==|!=|in\b)", source)


def test_importing_the_package_has_no_side_effect():
    """`import keras_relattn` neither reads `sys.argv` nor touches stderr."""
    with open(os.path.join(PACKAGE, "__init__.py")) as f:
        init = f.read()
    assert "sys" not in init and "_demo" not in init


@pytest.mark.parametrize("module", MODULES)
def test_nothing_needs_edspdf_or_the_benchmark(module):
    assert not {n for n in imported(module) if n.split(".")[0] in ("edspdf", "benchmarks")}


def test_no_import_cycle():
    def modules_of(name):  # keras_relattn.x.y -> x.y if a module, else x
        parts = name.split(".")[1:]
        dotted = ".".join(parts)
        return dotted if dotted in MODULES else parts[0] if parts else None

    graph = {
        module: {m for m in (modules_of(n) for n in imported(module)
                             if n.startswith("keras_relattn."))
                 if m in MODULES and m != module}
        for module in MODULES
    }

    def visit(module, path):
        for dependency in graph[module]:
            assert dependency not in path, " -> ".join(path + [dependency])
            visit(dependency, path + [dependency])

    for module in MODULES:
        if module != "__init__":
            visit(module, [module])


# The floors of the package, lowest first: a module imports only modules of
# the floors below its own (docs/development.md, "Where things are"). The
# backend modules share the floor of `_backend`, which loads one of them.
FLOORS = [
    {"_checks", "_arguments", "_records", "_calling", "_projection", "_import_order",
     "_hf_checkpoint", "_hf_deberta", "_backend.torch_fused"},
    {"_rows"},
    {"_backend.__init__", "_backend.generic", "_backend.jax", "_backend.tensorflow",
     "_backend.torch"},
    {"_offsets", "_logits", "_weights", "config", "position_table"},
    {"positions"},
    {"_position_terms"},
    {"_blocks"},
    {"_block_plan"},
    {"relative_attention"},
    {"transformer", "deberta"},
    {"box_transformer"},
    {"porting"},
    {"__init__"},
    {"__main__"},
]


def test_imports_go_only_down_the_floors():
    """No import runs back up (the backends once imported `_offsets` from
    inside their loops): each module's imports of the package lie on lower
    floors, `_backend`'s own modules importing `generic` beside them."""
    floor = {module: i for i, modules in enumerate(FLOORS) for module in modules}
    assert set(floor) == set(MODULES), set(floor) ^ set(MODULES)
    for module in MODULES:
        for name in imported(module):
            if not name.startswith("keras_relattn."):
                continue
            dotted = name.split(".", 1)[1]
            target = (dotted if dotted in floor else f"{dotted}.__init__"
                      if f"{dotted}.__init__" in floor else dotted.split(".")[0])
            target = target if target in floor else "__init__"  # a name the package exports
            if target == module or (module.startswith("_backend.")
                                    and target in ("_backend.generic", "_backend.__init__")):
                continue
            assert floor[target] < floor[module], f"{module} imports {target}"
