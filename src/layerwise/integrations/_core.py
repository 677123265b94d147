"""What the framework callbacks share: freezing, unfreezing on a schedule, a gradient monitor
and an EMA whose weights are swapped in for evaluation. Each callback maps its framework's
events onto these few calls."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..ema import EMA
from ..freeze import GradualUnfreeze, freeze
from ..monitor import GradMonitor
from ..select import Selector, as_selectors
from ..sinks import Sink

Selectors = Selector | Sequence[Selector]


def _options(value: bool | int | float | Mapping[str, Any] | None, number: str) -> dict[str, Any] | None:
    """``True``/a number/a dict of keyword arguments, or None when the feature is off."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if isinstance(value, (int, float)):
        return {number: value}
    return dict(value)


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
                 ema: float | Mapping[str, Any] | None = None):
        self.freeze = as_selectors(freeze)
        self.unfreeze_schedule = dict(unfreeze_schedule or {})
        self.unfreeze_options = dict(unfreeze_options or {})
        self.monitor_options = _options(grad_monitor, "every")
        self.ema_options = _options(ema, "decay")
        self.unfreezer: GradualUnfreeze | None = None
        self.monitor: GradMonitor | None = None
        self.ema: EMA | None = None
        self._swap: contextlib.ExitStack | None = None
        self._pending_state: dict[str, Any] | None = None

    def optimizer_ready(self, model: nn.Module, optimizer: torch.optim.Optimizer, schedulers: Sequence[Any] = (),
                        sinks: Sequence[Sink] = ()) -> None:
        """Once the optimizer exists. Freezing now keeps the frozen parameters in it (skipped while
        they get no gradient), so unfreezing later needs no new param group nor scheduler surgery."""
        if self.freeze:
            freeze(model, *self.freeze)
        if self.unfreeze_schedule:
            self.unfreezer = GradualUnfreeze(model, optimizer, self.unfreeze_schedule, scheduler=list(schedulers),
                                             **self.unfreeze_options)
        if self.monitor_options is not None and self.monitor is None:
            options = {"sinks": sinks, **self.monitor_options}
            selectors = as_selectors(options.pop("select", None))
            self.monitor = GradMonitor(model, *selectors, optimizer=optimizer, **options)
        if self.ema_options is not None and self.ema is None:
            self.ema = EMA(model, **self.ema_options)
        if self._pending_state is not None:
            self.load_state_dict(self._pending_state)

    def epoch_started(self, epoch: int) -> list[str]:
        return self.unfreezer.step(epoch) if self.unfreezer is not None else []

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

    def close(self) -> None:
        self.swap_out()
        if self.monitor is not None:
            self.monitor.remove()

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict() if self.ema is not None else None,
                "unfreeze": self.unfreezer.state_dict() if self.unfreezer is not None else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore EMA and unfreezing progress; kept until the optimizer exists if called earlier."""
        if (state.get("ema") and self.ema is None) or (state.get("unfreeze") and self.unfreezer is None):
            self._pending_state = dict(state)
            return
        self._pending_state = None
        if state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        if state.get("unfreeze"):
            self.unfreezer.load_state_dict(state["unfreeze"])
