"""``LayerwiseTrainerCallback``: layerwise in a Hugging Face ``transformers.Trainer`` (needs the ``hf`` extra)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

from ..errors import MissingExtraError

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError:
    raise MissingExtraError("layerwise.integrations.hf needs transformers: pip install 'layerwise[hf]'") from None

import torch

from ._core import Plan, PlanAccess, Selectors

__all__ = ["STATE_FILE", "LayerwiseTrainerCallback"]

STATE_FILE = "layerwise_state.pt"  # written into each checkpoint folder: EMA, unfreezing and warm-up progress


class _Rows:
    """Collects a monitored step's rows as ``<column>/<layer>`` metrics until the Trainer's step ends."""

    histograms = False

    def __init__(self, plan: Plan):
        self.plan, self.metrics = plan, {}

    def write(self, step: int, rows: list[dict[str, Any]], histograms: Any = None) -> None:
        self.metrics.update({f"{key}/{row['layer']}": value for row in self.plan.trained_rows(rows)
                             for key, value in row.items() if isinstance(value, float)})

    def close(self) -> None:
        pass


class LayerwiseTrainerCallback(PlanAccess, TrainerCallback):
    """Freeze, unfreeze on a schedule, monitor gradients and keep an EMA inside ``transformers.Trainer``.

    The options are those of :class:`layerwise.integrations.lightning.LayerwiseCallback` (but
    ``grad_keys``: metrics here are named like the Trainer's own ``grad_norm``).
    ``freeze`` applies when training starts, once the Trainer has built its optimizer: the
    frozen parameters stay in it, skipped while they get no gradient, so unfreezing at the
    start of a scheduled epoch needs no new param group and leaves the LR scheduler alone.
    ``unfreeze_options`` and the warm-up (``unfreeze_warmup_steps`` optimizer steps, from
    ``unfreeze_warmup_ratio`` × the lr) apply to the unfrozen layers step by step, with the
    optimizer's groups as the Trainer built them (so its checkpoints resume).
    Under DDP, set ``ddp_find_unused_parameters=True`` (frozen layers get no gradient).

    Gradient statistics (``grad_monitor``; ``True`` logs every ``logging_steps``) go through
    ``trainer.log`` as ``grad_norm/<layer>``-style metrics on the Trainer's global step, so
    they reach every ``report_to`` integration and ``trainer.state.log_history``; a callback
    needs the trainer for that: ``trainer.add_callback(LayerwiseTrainerCallback(..., trainer=trainer))``
    (without it they reach ``log_history`` only). Layers the schedule unfreezes are logged
    from their first trained step. Rows are also in ``callback.monitor.history``. They measure the
    gradients the optimizer applies, after ``max_grad_norm`` clipping; the Trainer's ``grad_norm``
    is the total before clipping (the two agree when nothing is clipped).

    The EMA is updated after every optimizer step and swapped in for the evaluations the
    Trainer runs during training, then swapped out; ``ema_apply_at_end=True`` leaves its
    weights in the model when training ends (replacing a best model loaded at the end).
    EMA, unfreezing and warm-up progress are saved in each checkpoint folder
    (:data:`STATE_FILE`, on the main process) and restored by ``trainer.train(resume_from_checkpoint=...)``
    from the checkpoint of the resumed step under ``output_dir`` (or ``args.resume_from_checkpoint``).

    Example::

        >>> from layerwise.integrations.hf import LayerwiseTrainerCallback  # doctest: +SKIP
        >>> trainer = transformers.Trainer(model, args, train_dataset=train, eval_dataset=val)  # doctest: +SKIP
        >>> trainer.add_callback(LayerwiseTrainerCallback(  # doctest: +SKIP
        ...     freeze="bert.embeddings", ema=0.999, ema_apply_at_end=True, grad_monitor=True, trainer=trainer))
    """

    def __init__(self, freeze: Selectors | None = None, unfreeze_schedule: Mapping[int, Selectors] | None = None,
                 unfreeze_options: Mapping[str, Any] | None = None,
                 grad_monitor: bool | int | Mapping[str, Any] | None = None,
                 ema: float | Mapping[str, Any] | None = None, *, unfreeze_warmup_steps: int = 0,
                 unfreeze_warmup_ratio: float = 0.1, ema_apply_at_end: bool = False, trainer: Any = None):
        self.plan = Plan(freeze, unfreeze_schedule, unfreeze_options, grad_monitor, ema,
                         unfreeze_warmup_steps=unfreeze_warmup_steps, unfreeze_warmup_ratio=unfreeze_warmup_ratio,
                         ema_apply_at_end=ema_apply_at_end)
        self.trainer = trainer
        self._rows = _Rows(self.plan)
        self._model = None

    def set_trainer(self, trainer: Any) -> LayerwiseTrainerCallback:
        """Log through ``trainer.log`` (as ``trainer=`` does); returns the callback."""
        self.trainer = trainer
        return self

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None,
                       optimizer=None, lr_scheduler=None, **kw: Any):
        self._model = model
        if state.global_step:  # resuming: the Trainer restored its own state, this restores ours
            # Callbacks are not told the folder trainer.train(resume_from_checkpoint=) got: the
            # argument's, else the Trainer's own name for the checkpoint of this step.
            folder = args.resume_from_checkpoint if isinstance(args.resume_from_checkpoint, str) and \
                os.path.isdir(args.resume_from_checkpoint) else \
                os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            path = os.path.join(folder, STATE_FILE)
            if os.path.isfile(path):
                self.plan.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            else:
                warnings.warn(f"resuming at step {state.global_step} without {path}: the EMA and the unfreezing "
                              "progress start afresh.", RuntimeWarning, stacklevel=2)
        if self.plan.monitor_options is not None and self.trainer is None:
            warnings.warn("LayerwiseTrainerCallback has no trainer: gradient statistics go to state.log_history "
                          "only. Pass trainer= (trainer.add_callback(LayerwiseTrainerCallback(..., trainer=trainer))) "
                          "so that they reach the report_to integrations.", RuntimeWarning, stacklevel=2)
        # The Trainer hands over accelerate's wrappers; hooks belong on the torch objects inside.
        schedulers = [] if lr_scheduler is None else [getattr(lr_scheduler, "scheduler", lr_scheduler)]
        # Monitor steps are numbered as the Trainer's global step after the update: 1, 2, ...
        self.plan.optimizer_ready(model, getattr(optimizer, "optimizer", optimizer), schedulers, [self._rows],
                                  step=state.global_step + 1, every=max(1, int(state.logging_steps or 50)))

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        self.plan.epoch_started(int(state.epoch or 0))

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        self.plan.optimizer_stepped()
        if self._rows.metrics:
            metrics, self._rows.metrics = self._rows.metrics, {}
            if self.trainer is not None:
                # Trainer.log ends in on_log, which clears control.should_log: the Trainer would then
                # drop its own log of this step (loss, grad_norm, learning_rate).
                should_log = control.should_log
                self.trainer.log(metrics)
                control.should_log = should_log
            else:
                state.log_history.append({**metrics, "step": state.global_step})
        if control.should_evaluate:  # the Trainer evaluates right after this event
            self.plan.swap_in(self._model)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        if control.should_evaluate:
            self.plan.swap_in(self._model)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        self.plan.swap_out()

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            torch.save(self.plan.state_dict(), os.path.join(folder, STATE_FILE))

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        self.plan.train_ended(self._model)
        self.plan.close()
