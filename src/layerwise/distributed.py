"""Averaging parameters across processes, built on ``torch.distributed``'s model-averaging utilities."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.model_averaging import utils as averaging

from ._tensors import buckets, pick, require_int, require_module
from .errors import DistributedError, OptionTypeError, StateError
from .select import Selection, Selector, as_selectors
from .select import select as _select

__all__ = ["PeriodicAverager", "average_parameters"]


def _require_process_group() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise StateError("torch.distributed is not initialized: call torch.distributed.init_process_group "
                             "(e.g. under torchrun) before averaging across processes")


def agree(selection: Selection, group: dist.ProcessGroup | None = None, what: str = "average") -> None:
    """Check that every rank selected the same parameters (names, shapes, dtypes), or raise on every rank.

    One all-reduce of four integers: each rank contributes a 124-bit hash of its selection and its
    negation, reduced with MAX; the ranks agree exactly when max == -max(-h), i.e. max == min.
    Only when they differ are the selections gathered, so the :class:`~layerwise.DistributedError`
    (the same on every rank) names the first differences.
    """
    spec = [(name, tuple(p.shape), str(p.dtype)) for name, p in selection]
    digest = hashlib.blake2b(repr(spec).encode(), digest_size=16).digest()
    words = torch.tensor([int.from_bytes(digest[i:i + 8], "little") >> 2 for i in (0, 8)], dtype=torch.int64)
    backend = str(dist.get_backend(group))
    device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
    both = torch.cat([words, -words]).to(device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    if torch.equal(both[:2], -both[2:]):
        return
    specs: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(specs, spec, group=group)
    raise DistributedError(f"the ranks selected different parameters to {what}: " + _differences(specs)
                           + "; every rank must build the same model and pass the same selectors")


def _differences(specs: Sequence[list[tuple[str, tuple[int, ...], str]]]) -> str:
    ref = {name: (shape, dtype) for name, shape, dtype in specs[0]}
    problems = []
    for rank, spec in enumerate(specs[1:], 1):
        mine = {name: (shape, dtype) for name, shape, dtype in spec}
        problems += [f"rank {rank} lacks {n}" for n in ref if n not in mine]
        problems += [f"rank {rank} has {n}, rank 0 does not" for n in mine if n not in ref]
        problems += [f"{n} is {ref[n][0]} {ref[n][1]} on rank 0 but {mine[n][0]} {mine[n][1]} on rank {rank}"
                     for n in ref if n in mine and mine[n] != ref[n]]
        if not problems and list(mine) != list(ref):
            problems.append(f"rank {rank} lists them in another order")
    return "; ".join(problems[:8]) + (f" (and {len(problems) - 8} more)" if len(problems) > 8 else "")


def _refuse_sharded(selection: Selection, caller: str) -> None:
    sharded = [name for name, p in selection if hasattr(p, "_local_tensor")]
    if sharded:  # each rank holds other elements of them: a mean over ranks would mix unrelated shards
        raise DistributedError(f"{caller}: {', '.join(sharded[:3])}{' ...' if len(sharded) > 3 else ''} "
                               "are sharded (DTensor, e.g. FSDP2's fully_shard): each rank holds a different "
                               "shard, so there is one copy to keep, not replicas to average. Leave them out "
                               "of the selection")


def _check_group(group: Any, caller: str) -> None:
    if group is not None and not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise OptionTypeError(f"{caller}: group must be a torch.distributed ProcessGroup or None (the default "
                              f"group), not {type(group).__name__}")


@torch.no_grad()
def average_parameters(model: nn.Module, *selectors: Selector, group: dist.ProcessGroup | None = None) -> None:
    """Replace the selected parameters (all with no selector) by their mean over the processes of ``group``.

    One all-reduce per device/dtype bucket, through torch's own
    ``torch.distributed.algorithms.model_averaging.utils.average_parameters`` (which flattens a
    bucket into one buffer; as there, the parameters are rebound to contiguous views of the
    averaged buffer, keeping their identity but not a channels-last layout). Bucketing by dtype
    avoids its silent up-casting of mixed dtypes. Shared parameters are averaged once. The ranks first
    agree that they selected the same names, shapes and dtypes (one all-reduce of four integers):
    otherwise each raises the same :class:`~layerwise.DistributedError` naming the differences.

    Example (under ``torchrun --nproc-per-node 2``)::

        >>> lw.average_parameters(model, "encoder")  # doctest: +SKIP
    """
    require_module(model, "average_parameters")
    _check_group(group, "average_parameters")
    _require_process_group()
    selection = _select(model, *selectors)
    _refuse_sharded(selection, "average_parameters")
    agree(selection, group)
    params = selection.params()
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
        require_module(model, "PeriodicAverager")
        for name, value, low in (("period", period, 1), ("warmup_steps", warmup_steps, 0)):
            require_int(value, name, "PeriodicAverager", low, "steps")
        _check_group(group, "PeriodicAverager")  # now, not at the first averaging step
        self.model, self.period, self.warmup_steps, self.group = model, period, warmup_steps, group
        self.selectors = as_selectors(select)
        selection = _select(model, *self.selectors)  # fail now, not at the first averaging step
        _refuse_sharded(selection, "PeriodicAverager")
        if dist.is_available() and dist.is_initialized():
            agree(selection, group)
        self.steps = 0

    def step(self) -> bool:
        """Count one step; average if the schedule says so. Returns whether it averaged."""
        due = self.steps >= self.warmup_steps and (self.steps - self.warmup_steps) % self.period == 0
        if due:
            average_parameters(self.model, *self.selectors, group=self.group)
        self.steps += 1
        return due

    def state_dict(self) -> dict[str, int]:
        """The step counter: ``{"steps": n}``."""
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume the schedule from :meth:`state_dict`; a malformed state changes nothing."""
        steps = state.get("steps") if isinstance(state, dict) else None
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise StateError(f"PeriodicAverager state {state!r} must be {{'steps': n}} with an int n >= 0, "
                             "as state_dict() returns")
        self.steps = steps
