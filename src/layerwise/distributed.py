"""Averaging parameters across processes, built on ``torch.distributed``'s model-averaging utilities."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.model_averaging import utils as averaging

from ._tensors import buckets, pick
from .errors import LayerwiseError
from .select import Selector, as_selectors
from .select import select as _select

__all__ = ["PeriodicAverager", "average_parameters"]


def _require_process_group() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise LayerwiseError("torch.distributed is not initialized: call torch.distributed.init_process_group "
                             "(e.g. under torchrun) before averaging across processes")


@torch.no_grad()
def average_parameters(model: nn.Module, *selectors: Selector, group: dist.ProcessGroup | None = None) -> None:
    """Replace the selected parameters (all with no selector) by their mean over the processes of ``group``.

    One all-reduce per device/dtype bucket, through torch's own
    ``torch.distributed.algorithms.model_averaging.utils.average_parameters`` (which flattens a
    bucket into one buffer; as there, the parameters are rebound to contiguous views of the
    averaged buffer, keeping their identity but not a channels-last layout). Bucketing by dtype
    avoids its silent up-casting of mixed dtypes. Shared parameters are averaged once. Every process must call it with the same selection.

    Example (under ``torchrun --nproc-per-node 2``)::

        >>> lw.average_parameters(model, "encoder")  # doctest: +SKIP
    """
    _require_process_group()
    params = _select(model, *selectors).params()
    for idx in buckets(params).values():
        averaging.average_parameters(iter(pick(params, idx)), group)


class PeriodicAverager:
    """Average parameters across processes every ``period`` steps after ``warmup_steps`` (local SGD).

    The schedule is torch's ``PeriodicModelAverager``: on step s it averages when
    ``s >= warmup_steps`` and ``(s - warmup_steps) % period == 0``. Unlike it, every selected
    parameter is averaged, whether or not it holds a gradient at that moment (torch's skips
    parameters whose ``.grad`` is None, so a ``zero_grad(set_to_none=True)`` before the call
    silently averages nothing). Call :meth:`step` after each ``optimizer.step()``; the step
    counter saves and loads with :meth:`state_dict`.

    Example (under ``torchrun``)::

        >>> averager = lw.PeriodicAverager(model, period=4, warmup_steps=100)  # doctest: +SKIP
        >>> for batch in loader:  # doctest: +SKIP
        ...     loss(model, batch).backward(); optimizer.step(); optimizer.zero_grad()
        ...     averager.step()
    """

    def __init__(self, model: nn.Module, period: int, warmup_steps: int = 0,
                 select: Selector | Sequence[Selector] | None = None, group: dist.ProcessGroup | None = None):
        if period < 1:
            raise LayerwiseError(f"period={period} must be a positive number of steps")
        if warmup_steps < 0:
            raise LayerwiseError(f"warmup_steps={warmup_steps} must be >= 0")
        self.model, self.period, self.warmup_steps, self.group = model, period, warmup_steps, group
        self.selectors = as_selectors(select)
        _select(model, *self.selectors)  # fail now, not at the first averaging step
        self.steps = 0

    def step(self) -> bool:
        """Count one step; average if the schedule says so. Returns whether it averaged."""
        due = self.steps >= self.warmup_steps and (self.steps - self.warmup_steps) % self.period == 0
        if due:
            average_parameters(self.model, *self.selectors, group=self.group)
        self.steps += 1
        return due

    def state_dict(self) -> dict[str, int]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.steps = int(state["steps"])
