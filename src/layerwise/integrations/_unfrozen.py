"""Options and an lr warm-up for the parameters a schedule unfroze, with the optimizer's groups left as they are.

The callbacks freeze after the optimizer is built, so unfrozen parameters sit in the groups
they started in, beside others. Their own options (``unfreeze_options``) and warm-up therefore
apply per step: just before ``optimizer.step()`` they are moved into groups of their own
(their home group's options, overridden), and moved back right after. Between steps the
optimizer is exactly as built, so its ``state_dict`` keeps the layout that a framework
re-creates and loads on resume (the Hugging Face Trainer loads it before any callback runs),
and LR schedulers never see the extra groups. Per-parameter optimizer state is keyed by the
parameter, so moving a parameter between groups carries its momentum along.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

_OWN = ("params", "names", "param_names", "initial_lr")  # keys that belong to a group, not to its options


class UnfrozenGroups:
    """The entries a schedule unfroze (by schedule key), each with the optimizer steps it has taken."""

    def __init__(self, optimizer: torch.optim.Optimizer, options: Mapping[str, Any], warmup_steps: int,
                 warmup_ratio: float):
        self.optimizer, self.options = optimizer, dict(options)
        self.warmup_steps, self.warmup_ratio = warmup_steps, warmup_ratio
        self.entries: dict[int, tuple[set[int], int]] = {}  # key: (ids of its parameters, steps taken)
        self._saved: list[tuple[dict[str, Any], list[torch.Tensor]]] | None = None
        self._count = len(optimizer.param_groups)
        self._handles = [optimizer.register_step_pre_hook(self._before_step),
                         optimizer.register_step_post_hook(self._after_step),
                         optimizer.register_state_dict_pre_hook(lambda _: self._restore())]

    def add(self, key: int, params: Sequence[torch.Tensor], steps: int = 0) -> None:
        self.entries[key] = ({id(p) for p in params}, steps)

    def factor(self, steps: int) -> float:
        """The warm-up's share of the lr after ``steps`` steps: ``warmup_ratio`` rising linearly to 1."""
        if steps >= self.warmup_steps:
            return 1.0
        return self.warmup_ratio + (1.0 - self.warmup_ratio) * steps / self.warmup_steps

    def _active(self) -> list[tuple[set[int], int]]:
        return [(ids, steps) for ids, steps in self.entries.values()
                if self.options or steps < self.warmup_steps]

    def _before_step(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        self._restore()  # a step that raised never ran the post-hook
        active = self._active()
        if not active:
            return
        groups = optimizer.param_groups
        self._count, self._saved = len(groups), []
        for ids, steps in active:
            for home in groups[: self._count]:
                mine = [p for p in home["params"] if id(p) in ids]
                if not mine:
                    continue
                self._saved.append((home, home["params"]))
                home["params"] = [p for p in home["params"] if id(p) not in ids]
                base = home.get("initial_lr", home["lr"])
                # Options' lr is a base lr: it follows the home group's schedule (lr / initial_lr).
                lr = self.options["lr"] * home["lr"] / base if "lr" in self.options and base else home["lr"]
                options = {k: v for k, v in home.items() if k not in _OWN}
                groups.append({**options, **self.options, "params": mine, "lr": lr * self.factor(steps)})

    def _after_step(self, *_: Any) -> None:
        if self._saved is not None:
            self._restore()
            for key, (ids, steps) in self.entries.items():
                self.entries[key] = (ids, steps + 1)

    def _restore(self) -> None:
        if self._saved is None:
            return
        del self.optimizer.param_groups[self._count:]
        for home, params in self._saved:
            home["params"] = params
        self._saved = None

    def state_dict(self) -> dict[int, int]:
        return {key: steps for key, (_, steps) in self.entries.items()}

    def remove(self) -> None:
        self._restore()
        for handle in self._handles:
            handle.remove()
        self._handles = []
