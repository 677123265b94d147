"""The handle every hook-setting function returns."""

from __future__ import annotations

from collections.abc import Iterable

from torch.utils.hooks import RemovableHandle


class Hooks:
    """Hooks that ``remove()`` takes off (a second call does nothing); as a context manager, on exit."""

    def __init__(self, handles: Iterable[RemovableHandle] = ()):
        self._handles = list(handles)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
