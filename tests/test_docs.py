"""Every docstring example in the package runs and prints what it says."""

import doctest
import importlib
import pkgutil

import pytest

import layerwise

MODULES = sorted(m.name for m in pkgutil.walk_packages(layerwise.__path__, "layerwise.")
                 if ".integrations" not in m.name)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_every_public_name_has_a_docstring_with_an_example():
    for name in layerwise.__all__:
        obj = getattr(layerwise, name)
        assert obj.__doc__ and ">>>" in obj.__doc__, f"layerwise.{name} needs a docstring with an example"
