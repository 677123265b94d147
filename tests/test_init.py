"""The package entry point: lazy submodules, the public names, start-up cost."""

import subprocess
import sys

import pytest
import torch

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


def test_a_function_named_like_its_module_stays_the_function_after_the_module_is_imported():
    names = ["select", "average", "freeze"]  # (one fresh interpreter for all: each costs an import of torch)
    imports = ", ".join(f"layerwise.{n}" for n in names)
    out = _fresh(f"import {imports}, layerwise as lw, inspect; print([inspect.isfunction(getattr(lw, n)) for n in {names}])")
    assert out == str([True] * len(names))


def test_submodules_stay_reachable_as_attributes():
    assert lw.checkpoint.load is lw.load
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lw.nope  # noqa: B018


def test_star_import_gives_every_public_name():
    namespace: dict = {}
    exec("from layerwise import *", namespace)
    assert {n for n in namespace if not n.startswith("__")} == set(lw.__all__)


_TAKES_STATE_DICTS = {"select", "show", "shared"}  # they read names and values, which a state dict has


def test_every_function_that_acts_on_a_model_refuses_a_state_dict_by_name():
    import inspect

    net = torch.nn.Linear(2, 2)
    sd, opt = net.state_dict(), torch.optim.SGD(net.parameters(), lr=0.1)
    calls = {"EMA": (), "GradMonitor": (), "GradualUnfreeze": (opt, {1: "weight"}), "PeriodicAverager": (2,),
             "audit": (opt,), "average_parameters": (), "check_grads": (), "clip_grad_norm": (1.0,),
             "flatten_parameters": (), "freeze": (), "frozen": (), "grad_stats": (), "param_groups": (),
             "set_grad": ("weight", 0.0), "tie": ("weight", "bias"), "unfreeze": (), "watch_nonfinite": ()}
    keywords = {"grad_hook": {"fn": lambda name, g: g}, "scale_grad": {"factor": 2.0}}
    for name in lw.__all__:  # every public callable whose first parameter is the model is covered
        obj = getattr(lw, name)
        try:
            first = next(iter(inspect.signature(obj).parameters), None)
        except (TypeError, ValueError):
            continue
        assert first != "model" or name in calls or name in keywords or name in _TAKES_STATE_DICTS, name
    for name in [*calls, *keywords]:
        with pytest.raises(lw.OptionTypeError, match=f"^{name} takes an nn.Module, got OrderedDict: a state dict"):
            getattr(lw, name)(sd, *calls.get(name, ()), **keywords.get(name, {}))
    with pytest.raises(lw.OptionTypeError, match="^pcgrad takes an nn.Module, got OrderedDict"):
        lw.pcgrad([net(torch.ones(2)).sum(), net(torch.ones(2)).mean()], sd)
    with pytest.raises(lw.OptionTypeError, match="^add_param_group takes an nn.Module, got NoneType$"):
        lw.add_param_group(opt, None, "weight")
