"""The handle every hook-setting function returns, and where a gradient hook goes (FSDP2 included)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ._ddp import fsdp_params
from ._selector import unwrap_compiled


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


def grad_hooks(model: nn.Module | None, params: Sequence[tuple[str, torch.Tensor]],
               hook: Callable[[str, torch.Tensor], torch.Tensor | None]) -> list[Any]:
    """Register ``hook(name, grad)`` where autograd meets each parameter's gradient; returns removable handles.

    That is the parameter itself, except for one that FSDP2 (``fully_shard``) shards: autograd
    never sees that one, but the unsharded parameter FSDP2 puts in its module for forward and
    backward, whose gradient it then reduce-scatters into the sharded ``.grad``. FSDP2 creates
    that tensor at its first all-gather and keeps it, so it is hooked from a forward pre-hook on
    the FSDP2 module managing the parameter (run after FSDP2's own, which swaps it in). The hook
    thus sees each rank's full local gradient before the reduction, as under DDP.
    """
    model = None if model is None else unwrap_compiled(model)
    managed = fsdp_params(model) if model is not None else {}
    units = {path: m for path, m in model.named_modules() if hasattr(m, "_get_fsdp_state")} if managed else {}
    handles: list[Any] = []
    for name, p in params:
        path, _, leaf = name.rpartition(".")
        fn = functools.partial(hook, name)
        if id(p) in managed:  # the innermost fully_shard module above the parameter manages it
            unit = max((u for u in units if not u or u == path or path.startswith(u + ".")), key=len)
            param = managed[id(p)]
            handles.append(_UnshardedHook(model.get_submodule(path), leaf, units[unit], param.sharded_param,
                                          getattr(param, "_unsharded_param", None), fn))
            continue
        handles.append(p.register_hook(fn))
        if hasattr(p, "_local_tensor") and model is not None:
            # A DTensor: tensor parallel (autograd reaches it, hooked above), or sharded by an FSDP2 module
            # above ``model``: then the stand-in is in its module when that module's forward starts.
            owner = model.get_submodule(path)
            handles.append(_UnshardedHook(owner, leaf, owner, p, None, fn))
    return handles


class _UnshardedHook:
    """A gradient hook on the unsharded stand-in FSDP2 swaps in for ``param`` (see :func:`grad_hooks`)."""

    def __init__(self, owner: nn.Module, leaf: str, unit: nn.Module, sharded: torch.Tensor,
                 unsharded: torch.Tensor | None, fn: Callable[[torch.Tensor], Any]):
        self.owner, self.leaf, self.sharded, self.fn = owner, leaf, sharded, fn
        self.hooked: torch.Tensor | None = None
        self.handle: RemovableHandle | None = None
        if unsharded is not None:  # FSDP2 made it at the first all-gather
            self._hook(unsharded)
        self.pre = unit.register_forward_pre_hook(self._swap_in)

    def _swap_in(self, module: nn.Module, args: Any) -> None:
        current = self.owner._parameters.get(self.leaf)
        if current is not None and current is not self.hooked and current is not self.sharded:
            self._hook(current)

    def _hook(self, unsharded: torch.Tensor) -> None:
        if not unsharded.requires_grad:  # frozen since: hooked again once unfrozen
            return
        if self.handle is not None:
            self.handle.remove()
        self.hooked, self.handle = unsharded, unsharded.register_hook(self.fn)

    def remove(self) -> None:
        self.pre.remove()
        if self.handle is not None:
            self.handle.remove()
