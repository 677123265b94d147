"""The exceptions layerwise raises; every message names the culprit and says what to do."""

from __future__ import annotations

__all__ = ["LayerwiseError"]


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
