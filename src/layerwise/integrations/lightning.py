"""``LayerwiseCallback``: layerwise in a ``lightning.Trainer`` (needs the ``lightning`` extra)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from ..errors import MissingExtraError, OptionError, StateError

try:
    import lightning.pytorch as pl
except ImportError:
    raise MissingExtraError("layerwise.integrations.lightning needs lightning: pip install 'layerwise[lightning]'") \
        from None

from ._core import Plan, PlanAccess, Selectors

__all__ = ["LayerwiseCallback"]


class _LoggerSink:
    """Send the monitor's rows to the Trainer's loggers as ``grad_norm/<layer>``-style metrics, or
    with ``lightning_keys`` under the keys of Lightning's ``utilities.grad_norm(module, 2)``."""

    histograms = False

    def __init__(self, trainer: pl.Trainer, plan: Plan, lightning_keys: bool = False):
        self.trainer, self.plan, self.lightning_keys = trainer, plan, lightning_keys

    def write(self, step: int, rows: list[dict[str, Any]], histograms: Any = None) -> None:
        rename = {"grad_norm": "grad_2.0_norm"} if self.lightning_keys else {}
        trained = self.plan.trained_rows(rows)
        metrics = {f"{rename.get(key, key)}/{row['layer']}": value for row in trained for key, value in row.items()
                   if isinstance(value, float)}
        norms = [row["grad_norm"] for row in trained if isinstance(row.get("grad_norm"), float)]
        if self.lightning_keys and norms:  # Lightning's total: the norm of all gradients as one vector
            metrics["grad_2.0_norm_total"] = math.sqrt(math.fsum(n * n for n in norms))
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def close(self) -> None:
        pass


class LayerwiseCallback(PlanAccess, pl.Callback):
    """Freeze, unfreeze on a schedule, monitor gradients and keep an EMA inside Lightning.

    ``freeze``: selectors frozen when training starts, after ``configure_optimizers``: the
    optimizer holds them but skips them while they get no gradient, so ``unfreeze_schedule``
    (``{epoch: selectors}``, unfrozen at the start of that epoch) needs no new param group and
    leaves LR schedulers alone. (Parameters the optimizer lacks join it as a new group with
    ``unfreeze_options``, the schedulers extended to it.) ``unfreeze_options`` (e.g. ``{"lr": 1e-4}``,
    a base lr that follows the group's schedule) apply to every unfrozen parameter, and
    ``unfreeze_warmup_steps=n`` ramps their lr linearly from ``unfreeze_warmup_ratio`` (0.1) ×
    its value to all of it over their first ``n`` optimizer steps, like ``BackboneFinetuning``'s
    ``backbone_initial_ratio_lr``. Both apply step by step, with the optimizer's groups left as
    built. Under a DDP strategy, frozen layers get no gradient: use
    ``DDPStrategy(find_unused_parameters=True)``.
    ``grad_monitor``: ``True`` (every ``log_every_n_steps``), ``every`` as an int, or
    :class:`~layerwise.GradMonitor` keyword arguments (``select=`` for selectors); rows go to the
    Trainer's loggers as ``grad_norm/<layer>``-style metrics, a layer the schedule unfreezes from
    its first trained step; ``grad_keys="lightning"`` logs the norms under the keys of Lightning's
    ``grad_norm(module, norm_type=2)``: ``grad_2.0_norm/<layer>`` and ``grad_2.0_norm_total``. The
    values are the gradients the optimizer applies, after ``gradient_clip_val`` clips them; Lightning's
    ``grad_norm`` in ``on_before_optimizer_step`` is taken before clipping (equal without it). ``ema``: a decay or :class:`~layerwise.EMA` keyword arguments; the EMA
    is updated after every optimizer step and its weights are swapped in for validation;
    ``ema_apply_at_end=True`` leaves them in the model when training ends. EMA, unfreezing and
    warm-up progress are saved in checkpoints.

    Example::

        >>> from layerwise.integrations.lightning import LayerwiseCallback  # doctest: +SKIP
        >>> trainer = lightning.Trainer(callbacks=[LayerwiseCallback(  # doctest: +SKIP
        ...     freeze="encoder", unfreeze_schedule={2: "encoder.layers.[6-11]"}, grad_monitor=50, ema=0.999)])
    """

    def __init__(self, freeze: Selectors | None = None, unfreeze_schedule: Mapping[int, Selectors] | None = None,
                 unfreeze_options: Mapping[str, Any] | None = None,
                 grad_monitor: bool | int | Mapping[str, Any] | None = None,
                 ema: float | Mapping[str, Any] | None = None, *, unfreeze_warmup_steps: int = 0,
                 unfreeze_warmup_ratio: float = 0.1, ema_apply_at_end: bool = False,
                 grad_keys: Literal["layerwise", "lightning"] = "layerwise"):
        if grad_keys not in ("layerwise", "lightning"):
            raise OptionError(f"grad_keys={grad_keys!r}: 'layerwise' (grad_norm/<layer>) or 'lightning' "
                              "(grad_2.0_norm/<layer> and grad_2.0_norm_total, as lightning's grad_norm utility)")
        self.grad_keys = grad_keys
        self.plan = Plan(freeze, unfreeze_schedule, unfreeze_options, grad_monitor, ema,
                         unfreeze_warmup_steps=unfreeze_warmup_steps, unfreeze_warmup_ratio=unfreeze_warmup_ratio,
                         ema_apply_at_end=ema_apply_at_end)
        self._last_step = -1

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        if optimizer is None:
            raise StateError("LayerwiseCallback needs the optimizer that configure_optimizers returns: return one.")
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        # Monitor steps count as Lightning's logging step does: the optimizer steps taken before.
        self.plan.optimizer_ready(pl_module, optimizer, schedulers, sinks=[_LoggerSink(trainer, self.plan, self.grad_keys == "lightning")],
                                  step=trainer.global_step, every=max(1, trainer.log_every_n_steps))
        self._last_step = trainer.global_step

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.plan.epoch_started(trainer.current_epoch)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # With gradient accumulation not every batch ends in an optimizer step.
        if trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            self.plan.optimizer_stepped()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.plan.swap_in(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.plan.swap_out()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.plan.train_ended(pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.plan.close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.plan.close()

    def state_dict(self) -> dict[str, Any]:
        return self.plan.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.plan.load_state_dict(state_dict)
