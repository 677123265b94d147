"""The exceptions layerwise raises; every message names the culprit and says what to do."""

from __future__ import annotations

__all__ = ["CheckpointError", "LayerwiseError"]


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
