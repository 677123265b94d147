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
    ``freeze`` applies when the Trainer is created, before it builds its optimizer (which then
    leaves the frozen parameters out). Each epoch starts by unfreezing what the schedule says.
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

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kw: Any):
        self._model = model
        self.plan.model_ready(model)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None,
                       optimizer=None, **kw: Any):
        self._model = model
        # The Trainer hands over accelerate's wrapper; hooks belong on the torch optimizer inside it.
        self.plan.optimizer_ready(model, getattr(optimizer, "optimizer", optimizer))

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
