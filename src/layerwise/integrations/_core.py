"""What the framework callbacks share: freezing, unfreezing on a schedule (with the unfrozen
layers' own options and an lr warm-up), a gradient monitor that follows the schedule, and an
EMA swapped in for evaluation and optionally kept at the end. Each callback maps its
framework's events onto these few calls."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._tensors import require_flag
from ..ema import EMA
from ..errors import OptionError, OptionTypeError
from ..freeze import GradualUnfreeze, freeze, unfreeze
from ..monitor import GradMonitor
from ..select import Selector, as_selectors, select
from ._unfrozen import UnfrozenGroups

Selectors = Selector | Sequence[Selector]


def _options(value: bool | int | float | Mapping[str, Any] | None, number: str,
             option: str) -> dict[str, Any] | None:
    """``True``/a number/a dict of keyword arguments, or None when the feature is off."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if isinstance(value, (int, float)):
        return {number: value}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise OptionTypeError(f"{option}={value!r:.80}: pass True, a number ({number}) or a dict of its keyword "
                              "arguments")
    return dict(value)


def _check_warmup(steps: int, ratio: float) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise OptionTypeError(f"unfreeze_warmup_steps={steps!r}: pass a whole number of optimizer steps.")
    if steps < 0:
        raise OptionError(f"unfreeze_warmup_steps={steps}: pass 0 (no warm-up) or a positive number of steps.")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise OptionTypeError(f"unfreeze_warmup_ratio={ratio!r}: pass a number in (0, 1].")
    if not 0 < ratio <= 1:
        raise OptionError(f"unfreeze_warmup_ratio={ratio}: the warm-up starts at this share of the lr; "
                          "pass a number in (0, 1].")


class PlanAccess:
    """What a callback exposes of its plan: the monitor (its ``history``) and the EMA."""

    plan: Plan

    @property
    def monitor(self) -> GradMonitor | None:
        return self.plan.monitor

    @property
    def ema(self) -> EMA | None:
        return self.plan.ema


class Plan:
    """The layerwise side of a callback; the framework calls these methods at its events."""

    def __init__(self, freeze: Selectors | None = None, unfreeze_schedule: Mapping[int, Selectors] | None = None,
                 unfreeze_options: Mapping[str, Any] | None = None,
                 grad_monitor: bool | int | Mapping[str, Any] | None = None,
                 ema: float | Mapping[str, Any] | None = None, *, unfreeze_warmup_steps: int = 0,
                 unfreeze_warmup_ratio: float = 0.1, ema_apply_at_end: bool = False):
        _check_warmup(unfreeze_warmup_steps, unfreeze_warmup_ratio)
        require_flag(ema_apply_at_end, "ema_apply_at_end")
        if ema_apply_at_end and ema is None:
            raise OptionError("ema_apply_at_end=True keeps the EMA weights at the end: also pass ema=DECAY.")
        self.freeze = as_selectors(freeze)
        self.unfreeze_schedule = dict(unfreeze_schedule or {})
        self.unfreeze_options = dict(unfreeze_options or {})
        self.warmup_steps, self.warmup_ratio = unfreeze_warmup_steps, float(unfreeze_warmup_ratio)
        self.monitor_options = _options(grad_monitor, "every", "grad_monitor")
        self.ema_options = _options(ema, "decay", "ema")
        self.ema_apply_at_end = ema_apply_at_end
        self.unfreezer: GradualUnfreeze | None = None
        self.unfrozen: UnfrozenGroups | None = None
        self.monitor: GradMonitor | None = None
        self.ema: EMA | None = None
        self._model: nn.Module | None = None
        self._params: dict[str, torch.Tensor] = {}
        self._swap: contextlib.ExitStack | None = None
        self._pending_state: dict[str, Any] | None = None

    def optimizer_ready(self, model: nn.Module, optimizer: torch.optim.Optimizer, schedulers: Sequence[Any] = (),
                        sinks: Sequence[Any] = (), *, step: int = 0, every: int = 50) -> None:
        """Once the optimizer exists. Freezing now keeps the frozen parameters in it (skipped while
        they get no gradient), so unfreezing later needs no new param group nor scheduler surgery.
        ``step`` numbers the monitor's first step (the framework's, on resume), ``every`` is the
        monitor's default period (the framework's logging period). A bad option fails before the
        model changes: the freeze comes after everything that checks options, and a failure after
        it (a resumed state that does not fit) unhooks what was built and unfreezes what it froze."""
        self._model = model
        self._params = dict(model.named_parameters(remove_duplicate=False))
        to_freeze = [p for p in select(model, *self.freeze, missing_ok=True).params() if p.requires_grad] if self.freeze else []
        built: list[Any] = []
        frozen = False
        try:
            if self.unfreeze_schedule:
                self.unfreezer = GradualUnfreeze(model, optimizer, self.unfreeze_schedule, scheduler=list(schedulers),
                                                 **self.unfreeze_options)
                if self.unfreeze_options or self.warmup_steps:
                    self.unfrozen = UnfrozenGroups(optimizer, self.unfreeze_options, self.warmup_steps,
                                                   self.warmup_ratio)
                    built.append(self.unfrozen)
            if self.monitor_options is not None and self.monitor is None:
                options = {"sinks": sinks, "every": every, **self.monitor_options}
                # Each log step reaches the framework's loggers at that step: they expect steps in order.
                options.setdefault("flush_every", options["every"])
                selectors = as_selectors(options.pop("select", None)) or [self._trained_at_some_point(to_freeze)]
                self.monitor = GradMonitor(model, *selectors, optimizer=optimizer, **options)
                self.monitor.steps = step
                built.append(self.monitor)
            if self.ema_options is not None and self.ema is None:
                self.ema = EMA(model, **self.ema_options)
                built.append(self.ema)
            if self.freeze:
                freeze(model, *self.freeze)
                frozen = True
            if self._pending_state is not None:
                self.load_state_dict(self._pending_state)
        except BaseException:
            for part in built:
                if hasattr(part, "remove"):
                    part.remove()
            self.monitor = None if self.monitor in built else self.monitor
            self.ema = None if self.ema in built else self.ema
            self.unfreezer = self.unfrozen = None
            if frozen and to_freeze:
                ids = {id(p) for p in to_freeze}
                unfreeze(model, lambda name, p: id(p) in ids)
            raise

    def _trained_at_some_point(self, to_freeze: Sequence[torch.Tensor]) -> Any:
        """The monitor covers from the start what trains once ``to_freeze`` is frozen, or once the schedule
        unfreezes it, so a layer's columns appear from its first trained step (its memory is what it
        will need then)."""
        scheduled = {id(p) for sels in self.unfreeze_schedule.values()
                     for p in select(self._model, *as_selectors(sels), missing_ok=True).params()}
        frozen = {id(p) for p in to_freeze}
        return lambda name, p: (p.requires_grad and id(p) not in frozen) or id(p) in scheduled

    def trained_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The monitor's rows of layers that train now: a layer waiting for its unfreeze is not logged."""
        return [row for row in rows if self._params[row["layer"]].requires_grad]

    def epoch_started(self, epoch: int) -> list[str]:
        if self.unfreezer is None:
            return []
        finished = len(self.unfreezer.done)
        added = self.unfreezer.step(epoch)
        for entries in self.unfreezer.done[finished:]:
            self._track(entries)
        return added

    def _track(self, entries: Sequence[int], steps: Mapping[int, int] | None = None) -> None:
        """Give the unfrozen entries their own options and warm-up from the next optimizer step."""
        if self.unfrozen is not None:
            for at in entries:
                params = select(self._model, *self.unfreezer.schedule[at], missing_ok=True).params()
                self.unfrozen.add(at, params, (steps or {}).get(at, 0))

    def optimizer_stepped(self) -> None:
        if self.ema is not None:
            self.ema.update()

    def swap_in(self, model: nn.Module) -> None:
        """Evaluate with the EMA weights (until :meth:`swap_out`)."""
        if self.ema is not None and self._swap is None:
            self._swap = contextlib.ExitStack()
            self._swap.enter_context(self.ema.swapped(model))

    def swap_out(self) -> None:
        if self._swap is not None:
            self._swap.close()
            self._swap = None

    def train_ended(self, model: nn.Module) -> None:
        """With ``ema_apply_at_end``, the model keeps the EMA weights for good."""
        self.swap_out()
        if self.ema_apply_at_end and self.ema is not None:
            self.ema.copy_to(model)

    def close(self) -> None:
        self.swap_out()
        if self.monitor is not None:
            self.monitor.remove()
        if self.unfrozen is not None:
            self.unfrozen.remove()

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict() if self.ema is not None else None,
                "unfreeze": self.unfreezer.state_dict() if self.unfreezer is not None else None,
                "warmup": self.unfrozen.state_dict() if self.unfrozen is not None else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore EMA, unfreezing and warm-up progress; kept until the optimizer exists if called earlier."""
        if (state.get("ema") and self.ema is None) or (state.get("unfreeze") and self.unfreezer is None):
            self._pending_state = dict(state)
            return
        self._pending_state = None
        if state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        if state.get("unfreeze"):
            self.unfreezer.load_state_dict(state["unfreeze"])
            self._track([at for entries in self.unfreezer.done for at in entries], state.get("warmup"))
