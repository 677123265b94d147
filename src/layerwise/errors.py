"""The exceptions layerwise raises; every message names the culprit and says what to do."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["CheckpointError", "GradError", "LayerwiseError", "NonFiniteGradError"]


class LayerwiseError(Exception):
    """Base class of every error layerwise raises on bad input.

    The concrete errors also subclass the built-in exception a caller would expect
    (``ValueError`` for a bad argument, ``FloatingPointError`` for a non-finite gradient),
    so ``except ValueError`` keeps working.

    Example:
        >>> import layerwise as lw, torch
        >>> try:
        ...     lw.select(torch.nn.Linear(2, 2), "wieght")
        ... except lw.LayerwiseError as e:
        ...     print(type(e).__name__)
        SelectionError
    """


class CheckpointError(LayerwiseError, ValueError):
    """A checkpoint that cannot be read or written as asked; the message names the file and key.

    Example:
        >>> import layerwise as lw
        >>> lw.load("missing.safetensors")
        Traceback (most recent call last):
        ...
        layerwise.errors.CheckpointError: missing.safetensors: no such file or folder
    """


class GradError(LayerwiseError, ValueError):
    """A bad argument to a gradient tool (statistics, monitor, sinks, surgery), raised at once,
    before anything changed: not at the first log step, not half-way through an assignment.

    Example:
        >>> import layerwise as lw, torch
        >>> lw.grad_stats(torch.nn.Linear(2, 2), stats=["nrom"])
        Traceback (most recent call last):
        ...
        layerwise.errors.GradError: unknown statistic 'nrom' (did you mean 'norm'?). Valid: norm, mean, std, max_abs, zero_frac.
        >>> lw.set_grad(torch.nn.Linear(2, 1), "bias", torch.zeros(2))
        Traceback (most recent call last):
        ...
        layerwise.errors.GradError: set_grad changed nothing: bias has shape (1,) but its value has shape (2,).
    """


class NonFiniteGradError(LayerwiseError, FloatingPointError):
    """A gradient holds NaN or inf. ``names`` lists the parameters concerned, the first culprit
    first; ``step`` is the :class:`GradMonitor` step, or None.

    Example:
        >>> import layerwise as lw, torch
        >>> net = torch.nn.Linear(2, 1)
        >>> with lw.watch_nonfinite(net):
        ...     net(torch.tensor([[float("inf"), 1.0]])).sum().backward()
        Traceback (most recent call last):
        ...
        layerwise.errors.NonFiniteGradError: the gradient of 'weight' holds NaN or inf...
    """

    def __init__(self, message: str, names: Sequence[str] = (), step: int | None = None):
        super().__init__(message)
        self.names, self.step = list(names), step
