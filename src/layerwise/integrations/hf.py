"""``LayerwiseTrainerCallback``: layerwise in a Hugging Face ``transformers.Trainer`` (needs the ``hf`` extra)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError:
    raise ImportError("layerwise.integrations.hf needs transformers: pip install 'layerwise[hf]'") from None

from ._core import Plan, PlanAccess, Selectors

__all__ = ["LayerwiseTrainerCallback"]


class LayerwiseTrainerCallback(PlanAccess, TrainerCallback):
    """Freeze, unfreeze on a schedule, monitor gradients and keep an EMA inside ``transformers.Trainer``.

    The options are those of :class:`layerwise.integrations.lightning.LayerwiseCallback`.
    ``freeze`` applies when training starts, once the Trainer has built its optimizer: the
    frozen parameters stay in it, skipped while they get no gradient, so unfreezing at the
    start of a scheduled epoch needs no new param group and leaves the LR scheduler alone.
    Under DDP, set ``ddp_find_unused_parameters=True`` (frozen layers get no gradient).
    The EMA is updated after every optimizer step and its weights are swapped in for the
    evaluations the Trainer runs during training (``eval_strategy``), then swapped out.
    The monitor's rows are in ``callback.monitor.history`` (add ``sinks`` in ``grad_monitor``).

    Example::

        >>> from layerwise.integrations.hf import LayerwiseTrainerCallback  # doctest: +SKIP
        >>> trainer = transformers.Trainer(model, args, train_dataset=train, eval_dataset=val,  # doctest: +SKIP
        ...     callbacks=[LayerwiseTrainerCallback(freeze="bert.embeddings", ema=0.999, grad_monitor=50)])
    """

    def __init__(self, freeze: Selectors | None = None, unfreeze_schedule: Mapping[int, Selectors] | None = None,
                 unfreeze_options: Mapping[str, Any] | None = None,
                 grad_monitor: bool | int | Mapping[str, Any] | None = None,
                 ema: float | Mapping[str, Any] | None = None):
        self.plan = Plan(freeze, unfreeze_schedule, unfreeze_options, grad_monitor, ema)
        self._model = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None,
                       optimizer=None, lr_scheduler=None, **kw: Any):
        self._model = model
        # The Trainer hands over accelerate's wrappers; hooks belong on the torch objects inside.
        schedulers = [] if lr_scheduler is None else [getattr(lr_scheduler, "scheduler", lr_scheduler)]
        self.plan.optimizer_ready(model, getattr(optimizer, "optimizer", optimizer), schedulers)

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        self.plan.epoch_started(int(state.epoch or 0))

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        self.plan.optimizer_stepped()
        if control.should_evaluate:  # the Trainer evaluates right after this event
            self.plan.swap_in(self._model)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        if control.should_evaluate:
            self.plan.swap_in(self._model)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        self.plan.swap_out()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        self.plan.close()
