"""layerwise: per-layer control of PyTorch training.

Select parameters with one selector language, then act on them: share, freeze, give them
their own optimizer options, average and merge models, inspect and reshape gradients.

    >>> import layerwise as lw, torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> lw.select(net, "0").names()
    ['0.weight', '0.bias']

Submodules load on first use (PEP 562), so ``import layerwise`` costs almost nothing beyond
torch and the command line's ``--help`` never imports torch at all.
"""

from __future__ import annotations

import importlib
import sys
import types

from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    DistributedError,
    GradError,
    LayerwiseError,
    MergeError,
    MissingExtraError,
    NonFiniteGradError,
    NotFoundError,
    OptionError,
    OptionTypeError,
    OutputExistsError,
    SelectionError,
    StateError,
    VerificationError,
)

__version__ = "0.1.0"

# Public name -> the submodule that defines it, imported on first access. A new public name is
# one line here (and one in __all__), plus the same import in the TYPE_CHECKING block for IDEs.
_LAZY = {
    "EMA": "ema",
    "FlatParameters": "flat",
    "flatten_parameters": "flat",
    "average": "average",
    "greedy_soup": "average",
    "merge": "average",
    "Diff": "checkpoint",
    "diff_files": "checkpoint",
    "load": "checkpoint",
    "merge_files": "checkpoint",
    "save": "checkpoint",
    "PeriodicAverager": "distributed",
    "average_parameters": "distributed",
    "GradualUnfreeze": "freeze",
    "freeze": "freeze",
    "frozen": "freeze",
    "unfreeze": "freeze",
    "GradCheck": "grads",
    "GradStats": "grads",
    "NonFiniteWatch": "grads",
    "check_grads": "grads",
    "grad_stats": "grads",
    "watch_nonfinite": "grads",
    "add_param_group": "groups",
    "audit": "audit",
    "param_groups": "groups",
    "show": "inspect",
    "GradMonitor": "monitor",
    "CSVSink": "sinks",
    "Histogram": "sinks",
    "JSONLSink": "sinks",
    "Sink": "sinks",
    "TensorBoardSink": "sinks",
    "Selection": "select",
    "select": "select",
    "shared": "share",
    "tie": "share",
    "clip_grad_norm": "clip",
    "pcgrad": "pcgrad",
    "GradReverse": "reverse",
    "grad_reverse": "reverse",
    "GradHooks": "surgery",
    "GradScale": "surgery",
    "grad_hook": "surgery",
    "scale_grad": "surgery",
    "set_grad": "surgery",
}

TYPE_CHECKING = False  # typing itself costs a CLI --help ~10 ms; type checkers read this block
if TYPE_CHECKING:
    from typing import Any

    from .audit import audit
    from .average import average, greedy_soup, merge
    from .checkpoint import Diff, diff_files, load, merge_files, save
    from .clip import clip_grad_norm
    from .distributed import PeriodicAverager, average_parameters
    from .ema import EMA
    from .flat import FlatParameters, flatten_parameters
    from .freeze import GradualUnfreeze, freeze, frozen, unfreeze
    from .grads import GradCheck, GradStats, NonFiniteWatch, check_grads, grad_stats, watch_nonfinite
    from .groups import add_param_group, param_groups
    from .inspect import show
    from .monitor import GradMonitor
    from .pcgrad import pcgrad
    from .reverse import GradReverse, grad_reverse
    from .select import Selection, select
    from .share import shared, tie
    from .sinks import CSVSink, Histogram, JSONLSink, Sink, TensorBoardSink
    from .surgery import GradHooks, GradScale, grad_hook, scale_grad, set_grad


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:  # a submodule, as `lw.checkpoint` was reachable when everything loaded eagerly
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'layerwise' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """Importing a submodule binds it on the package; where a public function shares the module's
    name (``select``, ``average``, ``freeze``), ``lw.select`` must stay the function."""

    def __setattr__(self, name: str, value: Any) -> None:
        if not (isinstance(value, types.ModuleType) and name in _LAZY):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = [
    "CSVSink",
    "CheckpointError",
    "CheckpointNotFoundError",
    "Diff",
    "DistributedError",
    "EMA",
    "FlatParameters",
    "GradCheck",
    "GradError",
    "GradHooks",
    "GradMonitor",
    "GradReverse",
    "GradScale",
    "GradStats",
    "GradualUnfreeze",
    "Histogram",
    "JSONLSink",
    "LayerwiseError",
    "MergeError",
    "MissingExtraError",
    "NonFiniteGradError",
    "NonFiniteWatch",
    "NotFoundError",
    "OptionError",
    "OptionTypeError",
    "OutputExistsError",
    "PeriodicAverager",
    "Selection",
    "SelectionError",
    "Sink",
    "StateError",
    "TensorBoardSink",
    "VerificationError",
    "add_param_group",
    "audit",
    "average",
    "average_parameters",
    "check_grads",
    "clip_grad_norm",
    "diff_files",
    "flatten_parameters",
    "freeze",
    "frozen",
    "grad_hook",
    "grad_reverse",
    "grad_stats",
    "greedy_soup",
    "load",
    "merge",
    "merge_files",
    "param_groups",
    "pcgrad",
    "save",
    "scale_grad",
    "select",
    "set_grad",
    "shared",
    "show",
    "tie",
    "unfreeze",
    "watch_nonfinite",
]
