"""Freezing: parameters that cannot move, normalization statistics that stay put, gradual unfreezing."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from .groups import add_param_group
from .select import (
    FAMILIES,
    Selection,
    SelectionError,
    Selector,
    select,
    select_modules,
)

__all__ = ["GradualUnfreeze", "freeze", "frozen", "unfreeze"]

_is_norm = FAMILIES["norm"]


def _stay_in_eval(module: nn.Module, mode: bool = True) -> nn.Module:
    """Replaces ``train()`` on a frozen norm: ``model.train()`` must not restart its statistics."""
    return nn.Module.train(module, False)


def _stats_frozen(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get("train"), functools.partial)


def _freeze_stats(module: nn.Module) -> None:
    if not _stats_frozen(module):
        # A partial, not a bound method, so the model still pickles and deep-copies.
        module.train = functools.partial(_stay_in_eval, module)
        module.eval()


def _scope(model: nn.Module, path: str) -> list[torch.Tensor]:
    """Parameters that decide whether the norm at ``path`` is frozen: its own, or if it has none
    (``affine=False``), those of the nearest enclosing module that has some."""
    parts = path.split(".") if path else []
    for k in range(len(parts), -1, -1):
        params = list(model.get_submodule(".".join(parts[:k])).parameters())
        if params:
            return params
    return []


def freeze(model: nn.Module, *selectors: Selector, norm_stats: Literal["freeze", "train"] = "freeze",
           missing_ok: bool = False) -> Selection:
    """Freeze the selected parameters (all of them with no selector) so that nothing moves them.

    Each parameter gets ``requires_grad=False`` **and** ``.grad = None``: a stale gradient would
    let momentum or weight decay keep moving a "frozen" weight. Normalization layers that are
    fully frozen — all their parameters frozen, or lying in a selected subtree, or selected by
    ``type:`` (also those with ``affine=False``, which have no parameters) — are put in eval mode
    and stay there through later ``model.train()`` calls, so their running statistics stay fixed.
    ``norm_stats="train"`` leaves normalization layers alone. Frozen layers cost nothing in
    backward: autograd skips what no trainable parameter needs. Returns the frozen selection.

    Example:
        >>> import layerwise as lw, torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
        >>> lw.freeze(net, "0", "1")
        Selection(4 tensors, 28 elements: 0.weight, 0.bias, 1.weight, 1.bias)
        >>> net.train().training, net[1].training   # the frozen norm stays in eval mode
        (True, False)
        >>> lw.frozen(net)
        ['0.weight', '0.bias', '1.weight', '1.bias']
    """
    if norm_stats not in ("freeze", "train"):
        raise ValueError(f"norm_stats must be 'freeze' or 'train', got {norm_stats!r}")
    chosen = select(model, *selectors, missing_ok=True)
    reached = select_modules(model, *selectors) if selectors else list(model.named_modules())
    if not missing_ok:
        for s in selectors:
            if not select(model, s, missing_ok=True) and not select_modules(model, s):
                select(model, s)  # raises the usual error naming s and the closest names
    for p in chosen.params():
        p.requires_grad_(False)
        p.grad = None
    if norm_stats == "freeze":
        touched = {id(p) for p in chosen.params()}
        reached_ids = {id(m) for _, m in reached}
        for path, module in model.named_modules():
            if not _is_norm(module):
                continue
            scope = _scope(model, path)
            by_params = all(not p.requires_grad for p in scope) and any(id(p) in touched for p in scope)
            if id(module) in reached_ids or by_params:
                _freeze_stats(module)
    return chosen


def unfreeze(model: nn.Module, *selectors: Selector, missing_ok: bool = False) -> Selection:
    """Undo :func:`freeze` for the selected parameters (all with no selector).

    Parameters become trainable again, and a normalization layer whose statistics were frozen
    follows its parent's train/eval mode again once any parameter deciding it trains (or it
    lies in the unfrozen subtree).

    Example:
        >>> import layerwise as lw, torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
        >>> _ = lw.freeze(net)
        >>> _ = lw.unfreeze(net, "1")
        >>> net.train()[1].training, lw.frozen(net)
        (True, ['0.weight', '0.bias'])
    """
    chosen = select(model, *selectors, missing_ok=missing_ok)
    reached = {id(m) for _, m in (select_modules(model, *selectors) if selectors else model.named_modules())}
    for p in chosen.params():
        p.requires_grad_(True)
    modules = dict(model.named_modules())
    for path, module in modules.items():
        if not _stats_frozen(module):
            continue
        if id(module) in reached or any(p.requires_grad for p in _scope(model, path)):
            del module.train
            parent = modules[path.rpartition(".")[0]] if path else module
            module.train(parent.training if parent is not module else True)
    return chosen


def frozen(model: nn.Module) -> list[str]:
    """Names of the frozen parameters (``requires_grad=False``), one per tensor, in model order.

    Example:
        >>> import layerwise as lw, torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        >>> net[1].bias.requires_grad_(False)  # doctest: +ELLIPSIS
        Parameter containing:
        ...
        >>> lw.frozen(net)
        ['1.bias']
    """
    return [name for name, p in select(model) if not p.requires_grad]


class GradualUnfreeze:
    """Unfreeze layers on a schedule and hand them to the live optimizer (ULMFiT-style).

    ``schedule`` maps an epoch (or step: whatever you pass to :meth:`step`) to selectors.
    ``step(n)`` unfreezes everything scheduled at or before ``n`` that is not yet unfrozen and
    adds the parameters the optimizer does not hold yet as one new param group, never a
    parameter twice. ``group_options`` (lr, weight_decay, ...) set that group's options; the
    rest come from the optimizer's defaults, as with ``optimizer.add_param_group``. When
    resuming, call ``step(epoch)`` before ``optimizer.load_state_dict`` so the groups exist.
    Selectors are checked when the schedule is made, not when it fires.

    Example:
        >>> import layerwise as lw, torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        >>> _ = lw.freeze(net, "0", "1")
        >>> opt = torch.optim.SGD(lw.param_groups(net), lr=0.1)
        >>> schedule = lw.GradualUnfreeze(net, opt, {1: "1", 2: "0"}, lr=0.01)
        >>> schedule.step(0), schedule.step(1)
        ([], ['1.weight', '1.bias'])
        >>> [g["names"] for g in opt.param_groups], opt.param_groups[-1]["lr"]
        ([['2.weight'], ['2.bias'], ['1.weight', '1.bias']], 0.01)
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 schedule: Mapping[int, Selector | Sequence[Selector]], **group_options: Any):
        self.model, self.optimizer, self.group_options = model, optimizer, group_options
        self.schedule = {int(at): [s] if isinstance(s, (str, type)) or callable(s) else list(s)
                         for at, s in sorted(schedule.items())}
        for at, sels in self.schedule.items():
            if not sels:
                raise SelectionError(f"the schedule entry at {at} has no selector")
            select(model, *sels)
        self.done: set[int] = set()

    def step(self, epoch: int) -> list[str]:
        """Unfreeze what is due at ``epoch``; returns the names newly added to the optimizer."""
        due = [at for at in self.schedule if at <= epoch and at not in self.done]
        if not due:
            return []
        selectors = [s for at in due for s in self.schedule[at]]
        chosen = unfreeze(self.model, *selectors)
        self.done.update(due)
        held = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        new = [name for name, p in chosen if id(p) not in held]
        if new:
            add_param_group(self.optimizer, self.model, *new, **self.group_options)
        return new

    def state_dict(self) -> dict[str, Any]:
        return {"done": sorted(self.done)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore progress; the layers of the finished entries are unfrozen and in the optimizer."""
        for at in state["done"]:
            self.step(at)
