"""Freezing: parameters that cannot move, normalization statistics that stay put, gradual unfreezing."""

from __future__ import annotations

import functools
import numbers
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from ._ddp import built_before_sharding, ddp_wrapper, fsdp_sharded, rebuild_reducer
from ._tensors import require_module
from .errors import OptionError, OptionTypeError, StateError
from .groups import add_group, check_options, check_schedulers, group_index
from .select import FAMILIES, Selection, SelectionError, Selector, as_selectors, resolve, select

__all__ = ["GradualUnfreeze", "freeze", "frozen", "unfreeze"]

_is_norm = FAMILIES["norm"]


def _stay_in_eval(module: nn.Module, mode: bool = True, *, was_training: bool, parent_was: bool) -> nn.Module:
    """Replaces ``train()`` on a frozen norm: ``model.train()`` must not restart its statistics.
    The keywords remember the modes at freezing time, for :func:`unfreeze`."""
    return nn.Module.train(module, False)


def _frozen_stats(module: nn.Module) -> functools.partial | None:
    train = module.__dict__.get("train")
    return train if isinstance(train, functools.partial) and train.func is _stay_in_eval else None


def _freeze_stats(module: nn.Module, parent: nn.Module) -> None:
    if _frozen_stats(module) is None:
        # A partial, not a bound method, so the model still pickles and deep-copies.
        module.train = functools.partial(_stay_in_eval, module, was_training=module.training,
                                         parent_was=parent.training)
        nn.Module.train(module, False)


def _thaw_stats(module: nn.Module, parent: nn.Module) -> None:
    recorded = _frozen_stats(module).keywords
    del module.train
    # As if never frozen: the mode it had, unless the model's mode changed since; then that.
    same = parent.training == recorded["parent_was"]
    nn.Module.train(module, recorded["was_training"] if same else parent.training)


def _scope(model: nn.Module, path: str) -> list[torch.Tensor]:
    """Parameters that decide whether the norm at ``path`` is frozen: its own, or if it has none
    (``affine=False``), those of the nearest enclosing module that has some."""
    parts = path.split(".") if path else []
    for k in range(len(parts), -1, -1):
        params = list(model.get_submodule(".".join(parts[:k])).parameters())
        if params:
            return params
    return []


def _parents(model: nn.Module) -> dict[str, tuple[nn.Module, nn.Module]]:
    """Path -> (module, its parent) for every module (the root is its own parent)."""
    modules = dict(model.named_modules())
    return {path: (m, modules[path.rpartition(".")[0]] if path else m) for path, m in modules.items()}


def freeze(model: nn.Module, *selectors: Selector, norm_stats: Literal["freeze", "train"] = "freeze",
           missing_ok: bool = False) -> Selection:
    """Freeze the selected parameters (all of them with no selector) so that nothing moves them.

    Each parameter gets ``requires_grad=False`` **and** ``.grad = None``: a stale gradient would
    let momentum or weight decay keep moving a "frozen" weight. Normalization layers that are
    fully frozen — all their parameters frozen, or lying in a selected subtree, or selected by
    ``type:`` (also those with ``affine=False``, which have no parameters) — are put in eval mode
    and stay there through later ``model.train()`` calls, so their running statistics stay fixed.
    ``norm_stats="train"`` leaves normalization layers alone. Frozen layers cost nothing in
    backward: autograd skips what no trainable parameter needs. A selector that reaches
    nothing (a negation's too) is an error. Returns the frozen selection.

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
    require_module(model, "freeze")
    if norm_stats not in ("freeze", "train"):
        raise OptionError(f"freeze: norm_stats must be 'freeze' or 'train', got {norm_stats!r}")
    # A selector counts as found when it reaches a parameter or a module (a norm with affine=False).
    resolution = resolve(model, *selectors, missing_ok=missing_ok)
    chosen = resolution.selection()
    reached = {id(m) for _, m in resolution.modules}
    changed = any(p.requires_grad for p in chosen.params())
    for p in chosen.params():
        p.requires_grad_(False)
        p.grad = None
    if norm_stats == "freeze":
        touched = {id(p) for p in chosen.params()}
        for path, (module, parent) in _parents(model).items():
            if not _is_norm(module):
                continue
            scope = _scope(model, path)
            by_params = all(not p.requires_grad for p in scope) and any(id(p) in touched for p in scope)
            if id(module) in reached or by_params:
                _freeze_stats(module, parent)
    if changed and (ddp := ddp_wrapper(model)) is not None:
        rebuild_reducer(ddp)
    return chosen


def _warn_if_distributed(model: nn.Module, names: Sequence[str]) -> None:
    if names and dist.is_available() and dist.is_initialized() and not fsdp_sharded(model):
        warnings.warn(
            f"unfreezing {names[0]}{' ...' if len(names) > 1 else ''} under torch.distributed: "
            "DistributedDataParallel synchronizes only the parameters that required grad when it was "
            "built. If this module is wrapped in DistributedDataParallel, pass the wrapper "
            "(lw.unfreeze(ddp_model, 'module.<name>')) so that its reducer is rebuilt.", stacklevel=3)


def unfreeze(model: nn.Module, *selectors: Selector, missing_ok: bool = False) -> Selection:
    """Make the selected parameters (all with no selector) trainable, undoing :func:`freeze`.

    Every selected parameter gets ``requires_grad=True``, however it was frozen. A
    normalization layer whose statistics were frozen is released once any parameter deciding
    it trains (or it lies in the unfrozen subtree): it returns to the mode it had when frozen,
    or, if the model's train/eval mode changed since, to the model's mode.

    DistributedDataParallel: pass the wrapper itself. DDP all-reduces only the parameters that
    required grad when it was built; :func:`freeze` and :func:`unfreeze` on the wrapper rebuild
    its reducer for the new trainable set (as DDP does when unpickled), so an unfrozen layer
    stays in sync and a frozen one is not waited for, without ``find_unused_parameters``.
    Every rank must make the same calls, between steps (not between a forward and its
    backward). FSDP2 (``fully_shard``) needs nothing more. Under
    torch.distributed, unfreezing a module that is neither warns that a wrapper around it
    would not see the change.

    Example:
        >>> import layerwise as lw, torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
        >>> _ = lw.freeze(net)
        >>> _ = lw.unfreeze(net, "1")
        >>> net.train()[1].training, lw.frozen(net)
        (True, ['0.weight', '0.bias'])
    """
    require_module(model, "unfreeze")
    # A selector counts as found when it reaches a parameter or a module (a norm with affine=False).
    resolution = resolve(model, *selectors, missing_ok=missing_ok)
    chosen = resolution.selection()
    reached = {id(m) for _, m in resolution.modules}
    # Integer and bool parameters (quantized weights, counters) cannot require a gradient: left frozen
    trainable = [(n, p) for n, p in chosen if p.dtype.is_floating_point or p.dtype.is_complex]
    if selectors and len(chosen) and not trainable:
        raise SelectionError(f"unfreeze: {', '.join(chosen.names()[:3])} hold{'s' * (len(chosen) == 1)} "
                             f"{chosen.params()[0].dtype} values, which cannot require a gradient; select floating ones")
    newly = [name for name, p in trainable if not p.requires_grad]
    ddp = ddp_wrapper(model)
    if ddp is None:
        _warn_if_distributed(model, newly)
    for _, p in trainable:
        p.requires_grad_(True)
    for path, (module, parent) in _parents(model).items():
        if _frozen_stats(module) is not None and (
                id(module) in reached or any(p.requires_grad for p in _scope(model, path))):
            _thaw_stats(module, parent)
    if newly and ddp is not None:
        rebuild_reducer(ddp)
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
    require_module(model, "frozen")
    return [name for name, p in select(model) if not p.requires_grad]


class GradualUnfreeze:
    """Unfreeze layers on a schedule (ULMFiT-style), handing the live optimizer what it lacks.

    ``schedule`` maps an epoch (or step: whatever you pass to :meth:`step`) to selectors.
    ``step(n)`` unfreezes everything scheduled at or before ``n`` that is not yet unfrozen.
    Parameters the optimizer already holds (frozen ones are skipped by it until they get a
    gradient) simply start training; the others join it as one new param group, never a
    parameter twice, with ``group_options`` (the rest from the optimizer's defaults). Pass
    the LR ``scheduler`` (or a list) built on the optimizer so it covers the new group; torch's
    schedulers otherwise fail at their next step. Selectors are checked when the schedule is
    made, not when it fires. ``state_dict`` records which entries each step unfroze; restore
    it before ``optimizer.load_state_dict`` so that the groups exist.

    Under DistributedDataParallel pass the wrapper (selectors then start with ``module.``):
    each unfreezing rebuilds its reducer so the new layers are all-reduced, with no
    ``find_unused_parameters`` (see :func:`unfreeze`). Under FSDP2 nothing more is needed.

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
                 schedule: Mapping[int, Selector | Sequence[Selector]], *, scheduler: Any = None,
                 **group_options: Any):
        require_module(model, "GradualUnfreeze")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise OptionTypeError(f"GradualUnfreeze takes the torch.optim.Optimizer to extend, got {type(optimizer).__name__}")
        self.model, self.optimizer, self.group_options = model, optimizer, group_options
        self.schedulers = [] if scheduler is None else list(scheduler) if isinstance(scheduler, (list, tuple)) \
            else [scheduler]
        check_options(group_options, "GradualUnfreeze", optimizer)  # now, not epochs later when a group is added
        check_schedulers(self.schedulers, optimizer, extended=False)  # (whether one can follow: if a group is added)
        if built_before_sharding(model, [p for g in optimizer.param_groups for p in g["params"]]):
            raise StateError(f"GradualUnfreeze: the optimizer was built before fully_shard replaced the parameters of "
                             f"{type(model).__name__}: it would train tensors the model no longer uses. Build it after.")
        for at in schedule:
            if isinstance(at, bool) or not isinstance(at, numbers.Integral):
                raise OptionTypeError(f"GradualUnfreeze: schedule keys are epochs or steps (ints >= 0), got {at!r} "
                                      f"({type(at).__name__}); a fraction would be truncated, so give the int you mean")
            if at < 0:
                raise OptionError(f"GradualUnfreeze: schedule keys are epochs or steps (ints >= 0), got {at}")
        self.schedule = {int(at): as_selectors(s) for at, s in sorted(schedule.items())}
        for at, sels in self.schedule.items():
            if not sels:
                raise SelectionError(f"the schedule entry at {at} has no selector")
            resolve(model, *sels)  # fail now, not when the entry fires
        self.done: list[list[int]] = []  # the schedule entries each step() unfroze, in order

    def step(self, epoch: int) -> list[str]:
        """Unfreeze what is due at ``epoch``; returns the names newly added to the optimizer.

        All or nothing: the new group and the schedulers are checked before any layer is
        unfrozen, so a step that raises leaves model, optimizer and schedulers as they were."""
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Real):
            raise OptionTypeError(f"GradualUnfreeze.step takes the epoch or step number, got {type(epoch).__name__}")
        finished = {at for entries in self.done for at in entries}
        due = [at for at in self.schedule if at <= epoch and at not in finished]
        return self._apply(due) if due else []

    def _apply(self, entries: list[int]) -> list[str]:
        selectors = [s for at in entries for s in self.schedule[at]]
        held = group_index(self.optimizer)
        new = [(name, p) for name, p in select(self.model, *selectors, missing_ok=True) if id(p) not in held]
        if new:  # first: it checks the schedulers and options before it changes anything, unfreeze cannot fail
            add_group(self.optimizer, new, self.group_options, self.schedulers)
        unfreeze(self.model, *selectors, missing_ok=True)
        self.done.append(entries)
        return [name for name, _ in new]

    def state_dict(self) -> dict[str, Any]:
        return {"done": [list(entries) for entries in self.done]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replay the recorded steps, so the optimizer gets the same groups in the same order."""
        done = state.get("done") if isinstance(state, Mapping) else None
        ok = isinstance(done, list) and all(isinstance(e, list) and e for e in done)
        flat = [at for entries in done for at in entries] if ok else []
        if not ok or len(set(flat)) < len(flat) or not all(type(at) is int and at in self.schedule for at in flat):
            # checked whole first: a replay that failed half-way would leave half the groups added
            raise StateError(f"GradualUnfreeze.load_state_dict takes the {{'done': [[entry, ...], ...]}} of "
                             f"state_dict(), each entry once and one of this schedule's {list(self.schedule)}; "
                             f"got {state!r:.200}")
        if self.done:
            raise StateError("GradualUnfreeze.load_state_dict replays the recorded steps, but this one has stepped "
                             "already: load the state into a fresh GradualUnfreeze")
        for entries in done:
            self._apply(list(entries))
