"""The docstrings: their examples run, and the public names have KerasHub-style
sections. (The README's own checks are in test_readme.py.)"""

import doctest
import importlib
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = [
    "keras_relattn.box_transformer",
    "keras_relattn.config",
    "keras_relattn.deberta",
    "keras_relattn.relative_attention",
    "keras_relattn.porting",
    "keras_relattn.position_table",
    "keras_relattn.positions",
    "keras_relattn.transformer",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


def public_objects():
    import keras_relattn
    from keras_relattn import positions

    names = [getattr(keras_relattn, n) for n in keras_relattn.__all__
             if n not in ("positions", "config", "deberta")]
    from keras_relattn import deberta

    names += [getattr(deberta, n) for n in ("from_transformers", "to_transformers_state_dict",
                                            "from_keras_hub", "backbone")]
    names += [getattr(positions, n) for n in dir(positions)
              if n.endswith(("_positions", "_table")) and callable(getattr(positions, n))]
    return names


@pytest.mark.parametrize("obj", public_objects(), ids=lambda o: o.__name__)
def test_public_names_have_kerashub_style_docstrings(obj):
    doc = obj.__doc__ or ""
    for section in ("Args:", "Returns:", "Examples:", "References:"):
        assert section in doc, f"{obj.__name__} lacks {section}"
    assert ">>>" in doc


def test_version_is_the_installed_metadatas_and_has_a_changelog_entry():
    """One version: `__version__`, which pyproject.toml's dynamic version
    reads, the installed metadata's (tests/test_wheel.py checks a built
    wheel's), and its entry in CHANGELOG.md."""
    from importlib.metadata import version

    import keras_relattn

    assert keras_relattn.__version__ == version("keras-relattn")
    with open(os.path.join(ROOT, "CHANGELOG.md")) as f:
        assert f"\n## {keras_relattn.__version__}\n" in f.read()
