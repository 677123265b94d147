"""The package entry point: lazy submodules, the public names, start-up cost."""

import subprocess
import sys

import pytest

import layerwise as lw


def _fresh(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_import_loads_neither_torch_nor_rich():
    assert _fresh("import sys, layerwise; print(sorted(m for m in ('torch', 'rich') if m in sys.modules))") == "[]"


def test_every_public_name_resolves_to_its_defining_module():
    for name in lw.__all__:
        obj = getattr(lw, name)
        assert obj.__module__.startswith("layerwise."), name
    assert sorted(lw.__all__) == sorted(set(lw.__all__))
    assert set(lw.__all__) <= set(dir(lw))


@pytest.mark.parametrize("name", ["select", "average", "freeze"])
def test_a_function_named_like_its_module_stays_the_function_after_the_module_is_imported(name):
    out = _fresh(f"import layerwise.{name}, layerwise as lw, inspect; print(inspect.isfunction(lw.{name}))")
    assert out == "True"


def test_submodules_stay_reachable_as_attributes():
    assert lw.checkpoint.load is lw.load
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lw.nope  # noqa: B018


def test_star_import_gives_every_public_name():
    namespace: dict = {}
    exec("from layerwise import *", namespace)
    assert {n for n in namespace if not n.startswith("__")} == set(lw.__all__)
