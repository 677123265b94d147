"""layerwise: per-layer control of PyTorch training.

Select parameters with one selector language, then act on them: share, freeze, give them
their own optimizer options, average and merge models, inspect and reshape gradients.

    >>> import layerwise as lw, torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> lw.select(net, "0").names()
    ['0.weight', '0.bias']
"""

from .average import EMA, average, greedy_soup, merge
from .checkpoint import Diff, diff_files, load, merge_files, save
from .distributed import PeriodicAverager, average_parameters
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
from .freeze import GradualUnfreeze, freeze, frozen, unfreeze
from .grads import GradCheck, GradStats, NonFiniteWatch, check_grads, grad_stats, watch_nonfinite
from .groups import add_param_group, param_groups
from .inspect import show
from .monitor import GradMonitor
from .select import Selection, select
from .share import shared, tie
from .sinks import CSVSink, Histogram, JSONLSink, Sink, TensorBoardSink
from .surgery import GradReverse, clip_grad_norm, grad_hook, grad_reverse, pcgrad, scale_grad, set_grad

__version__ = "0.1.0"

__all__ = [
    "Sink",
    "Histogram",
    "NonFiniteWatch",
    "GradStats",
    "GradCheck",
    "CSVSink",
    "CheckpointError",
    "CheckpointNotFoundError",
    "Diff",
    "DistributedError",
    "EMA",
    "GradError",
    "GradMonitor",
    "GradReverse",
    "GradualUnfreeze",
    "JSONLSink",
    "LayerwiseError",
    "MergeError",
    "MissingExtraError",
    "NonFiniteGradError",
    "NotFoundError",
    "OptionError",
    "OptionTypeError",
    "OutputExistsError",
    "PeriodicAverager",
    "Selection",
    "SelectionError",
    "StateError",
    "TensorBoardSink",
    "VerificationError",
    "add_param_group",
    "average",
    "average_parameters",
    "check_grads",
    "clip_grad_norm",
    "diff_files",
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
