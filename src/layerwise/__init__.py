"""layerwise: per-layer control of PyTorch training.

Select parameters with one selector language, then act on them: share, freeze, give them
their own optimizer options, average and merge models, inspect and reshape gradients.

    >>> import layerwise as lw, torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> lw.select(net, "0").names()
    ['0.weight', '0.bias']
"""

from .errors import LayerwiseError
from .inspect import show
from .select import Selection, SelectionError, select
from .share import shared, tie
from .surgery import GradReverse, clip_grad_norm, grad_hook, grad_reverse, pcgrad, scale_grad, set_grad

__version__ = "0.1.0"

__all__ = [
    "GradReverse",
    "LayerwiseError",
    "Selection",
    "SelectionError",
    "clip_grad_norm",
    "grad_hook",
    "grad_reverse",
    "pcgrad",
    "scale_grad",
    "select",
    "set_grad",
    "shared",
    "show",
    "tie",
]
