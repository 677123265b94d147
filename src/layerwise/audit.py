"""What is wrong with a model + optimizer + scheduler set-up, each finding with its fix.

Every check is a bug people have shipped (the thread is named in the check's docstring line
below); a clean set-up gives an empty list. Nothing is changed: a scheduler is stepped on a
snapshot that is restored before ``audit`` returns.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from rich.table import Table
from torch import nn

from ._ddp import built_before_sharding
from ._layer_ids import unmatched_before_blocks
from ._tensors import require_module
from ._term import console
from .errors import OptionTypeError
from .groups import check_schedulers, default_no_decay
from .select import select

__all__ = ["Finding", "Findings", "audit"]

_REL = 1e-6  # two learning rates closer than this are the same


@dataclass(frozen=True)
class Finding:
    """One problem: which ``check`` found it, the ``names`` of the parameters concerned, what is wrong and the fix.

    Example:
        >>> from layerwise.audit import Finding
        >>> f = Finding("not-in-optimizer", ("head.weight",), "no optimizer updates it", "add it")
        >>> f.check, f.names
        ('not-in-optimizer', ('head.weight',))
    """

    check: str
    names: tuple[str, ...]
    problem: str
    fix: str


class Findings(list):
    """The findings of :func:`audit`: a plain list (empty when the set-up is clean) that prints as a table.

    Example:
        >>> import layerwise as lw, torch
        >>> net = torch.nn.Linear(2, 2)
        >>> print(lw.audit(net, torch.optim.SGD(net.parameters(), lr=0.1)))
        audit: no findings
    """

    def __rich__(self) -> Table | str:
        if not self:
            return "audit: no findings"
        table = Table(title=f"audit: {len(self)} finding{'s' * (len(self) > 1)}", title_justify="left", show_lines=True)
        for header in ("check", "parameters", "problem", "fix"):
            table.add_column(header, overflow="fold")
        for f in self:
            names = ", ".join(f.names[:4]) + (f" … (+{len(f.names) - 4})" if len(f.names) > 4 else "")
            table.add_row(f.check, names, f.problem, f.fix)
        return table

    def __str__(self) -> str:
        out = console()
        with out.capture() as captured:
            out.print(self)
        return captured.get().rstrip("\n")

    def __repr__(self) -> str:
        return f"Findings({list.__repr__(self)})"


def audit(model: nn.Module, optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
          scheduler: Any = None) -> Findings:
    """Check a training set-up and return what is wrong, each :class:`Finding` naming the parameters and the fix.

    ``optimizer`` is one optimizer or a list (a GAN's); ``scheduler`` a torch LR scheduler, a timm
    scheduler (anything with timm's ``base_values`` and ``lr_scale`` rule) or None. The checks:

    - ``not-in-optimizer``: a trainable parameter no optimizer updates (unfrozen later but never
      added: Lightning ``BaseFinetuning`` without ``unfreeze_and_add_param_group``).
    - ``not-in-model``: the optimizer was built before ``fully_shard`` replaced the parameters: it
      holds only tensors the model no longer uses.
    - ``stale-grad``: a frozen parameter in an optimizer that still holds a ``.grad``: momentum and
      weight decay keep moving it (fairseq #4702, sparseml #965).
    - ``duplicate``: a parameter held twice, updated twice per step (Lightning #6879).
    - ``weight-decay``: a bias, a norm weight (any 1-D parameter) or a parameter the model's
      ``no_weight_decay()`` names (timm's rule, as ``lw.param_groups``), under weight decay
      (transformers PR #10598: norms named ``ln_1`` missed by a ``"LayerNorm.weight"`` name list).
      Embedding tables are left alone: the Trainer and nanoGPT decay them on purpose.
    - ``lr-scale-twice`` / ``lr-scale-ignored``: groups carry ``lr_scale`` and, one scheduler step
      later, their lr is not the intended ``base lr * lr_scale``: the lr already held the scale
      and the scheduler multiplies again, or nothing reads ``lr_scale`` at all (timm PR #2532,
      MAE #216).
    - ``lr-scale-top``: layer decay whose top trained layer has ``lr_scale < 1``: it counted
      layers that are not trained, such as a frozen copy (timm #2691).
    - ``not-scheduled``: a group the scheduler does not follow, added after it was built
      (transformers #20029).
    - ``fallback-layer``: a parameter that no rule of the model's timm ``group_matcher()``
      matches, although blocks follow it, so layer decay gives it the head's lr (timm #2712).
    - ``ddp-not-synced``: under ``DistributedDataParallel``, a trainable parameter the wrapper
      does not all-reduce: it was frozen when the model was wrapped (Lightning #20340).

    Example:
        >>> import layerwise as lw, torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
        >>> findings = lw.audit(net, torch.optim.AdamW(net[0].parameters()))
        >>> [(f.check, f.names) for f in findings]
        [('not-in-optimizer', ('1.weight', '1.bias')), ('weight-decay', ('0.bias',))]
        >>> lw.audit(net, torch.optim.AdamW(lw.param_groups(net, lr=1e-3)))
        Findings([])
    """
    require_module(model, "audit")
    optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    if not optimizers or not all(isinstance(o, torch.optim.Optimizer) for o in optimizers):
        raise OptionTypeError(f"audit takes a torch.optim.Optimizer (or a list of them); got {optimizer!r}")
    ddp = model if isinstance(model, nn.parallel.DistributedDataParallel) else None
    inner = ddp.module if ddp is not None else model
    everything = select(inner)
    name_of = {id(p): name for name, p in everything}
    groups = [g for o in optimizers for g in o.param_groups]

    def names(params: Iterable[torch.Tensor]) -> tuple[str, ...]:
        return tuple(name_of.get(id(p), f"<not in {type(inner).__name__}: {tuple(p.shape)}>") for p in params)

    findings = Findings()

    def add(check: str, params: Sequence[torch.Tensor], problem: str, fix: str) -> None:
        if params:
            findings.append(Finding(check, names(params), problem, fix))

    held = [p for g in groups for p in g["params"]]
    held_ids = {id(p) for p in held}
    add("not-in-optimizer", [p for _, p in everything if p.requires_grad and id(p) not in held_ids],
        "trainable, but no optimizer updates it",
        "add them with lw.add_param_group(optimizer, model, ...), or freeze them (lw.freeze)")
    add("not-in-model", held if built_before_sharding(inner, held) else [],
        "held by the optimizer, but fully_shard replaced these parameters after it was built: training moves "
        "nothing the model computes with",
        "build the optimizer after fully_shard")
    add("stale-grad", [p for p in held if not p.requires_grad and p.grad is not None],
        "frozen but holds a .grad: the optimizer's momentum and weight decay keep moving it",
        "freeze with lw.freeze (it clears .grad), or optimizer.zero_grad(set_to_none=True)")
    seen: set[int] = set()
    add("duplicate", [p for p in held if id(p) in seen or seen.add(id(p))],
        "in the optimizer twice: updated twice per step",
        "build the groups with lw.param_groups, which puts every parameter in exactly one group")

    no_decay = default_no_decay(inner)
    add("weight-decay", [p for g in groups if g.get("weight_decay", 0) for p in g["params"] if id(p) in no_decay],
        "a bias, norm weight or no_weight_decay() parameter under weight decay: it is pulled toward 0",
        "lw.param_groups(model, ..., weight_decay=wd) gives them weight_decay=0.0 (1-D, .bias and no_weight_decay(), as timm)")

    check_schedulers([scheduler] if scheduler is not None else [], extended=False)  # not silently skipped
    findings += _scheduler_findings(optimizers, scheduler, names)
    if len({g["lr"] * g.get("lr_scale", 1) for g in groups}) > 1:  # some decay: a fallback layer matters
        params = dict(everything)
        fallen = [n for n in unmatched_before_blocks(inner, list(params)) if id(params[n]) in held_ids]
        if fallen:
            findings.append(Finding("fallback-layer", tuple(fallen),
                                    "matched by no rule of group_matcher() although blocks follow: layer decay "
                                    "gives it the head's lr", "add it to the stem's rule in group_matcher() "
                                    "(timm #2712), or give it an lr with a rule of lw.param_groups"))
    if ddp is not None:
        synced = _ddp_synced(ddp)
        if synced is not None:
            add("ddp-not-synced", [p for _, p in everything if p.requires_grad and id(p) not in synced],
                "trainable, but DistributedDataParallel does not all-reduce it (frozen when the model was "
                "wrapped): the ranks drift apart", "wrap after unfreezing, or freeze after wrapping with "
                "find_unused_parameters=True so the wrapper knows every parameter")
    return findings


def _ddp_synced(ddp: nn.parallel.DistributedDataParallel) -> set[int] | None:
    """Ids of the parameters the wrapper's reducer all-reduces (None where torch does not say)."""
    try:
        buckets = ddp.reducer._get_zeros_like_grad_buckets()
    except (AttributeError, RuntimeError):
        return None
    return {id(p) for bucket in buckets for p in bucket.parameters()}


def _step_lrs(optimizers: Sequence[torch.optim.Optimizer], scheduler: Any, scale: float = 1.0) -> list[float]:
    """Each group's lr one scheduler step from now (with every ``lr_scale`` times ``scale``), then undo it all."""
    groups = [g for o in optimizers for g in o.param_groups]
    saved_groups = [{k: v for k, v in g.items() if k != "params"} for g in groups]
    schedulers, i = [scheduler], 0
    while i < len(schedulers):  # SequentialLR and ChainedScheduler step the ones they hold
        schedulers += getattr(schedulers[i], "_schedulers", [])
        i += 1
    saved = [{k: list(v) if isinstance(v, list) else v for k, v in vars(s).items()} for s in schedulers]
    try:
        for g in groups:
            if "lr_scale" in g:
                g["lr_scale"] *= scale
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
            if hasattr(scheduler, "base_values"):  # timm: stateless, told the step
                (scheduler.step(1) if getattr(scheduler, "t_in_epochs", True) else scheduler.step_update(1))
            else:
                scheduler.step()
        return [g["lr"] for g in groups]
    finally:
        for g, values in zip(groups, saved_groups):
            g.update(values)
        for s, values in zip(schedulers, saved):
            vars(s).clear()
            vars(s).update(values)


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= _REL * max(abs(a), abs(b))


def _scheduler_findings(optimizers: Sequence[torch.optim.Optimizer], scheduler: Any, names: Any) -> list[Finding]:
    groups = [g for o in optimizers for g in o.param_groups]
    findings = []
    followed = getattr(scheduler, "base_lrs", getattr(scheduler, "base_values", None))
    own = getattr(getattr(scheduler, "optimizer", None), "param_groups", groups)  # a GAN's: one optimizer each
    if isinstance(followed, list) and len(followed) < len(own):
        late = [p for g in own[len(followed):] for p in g["params"]]
        findings.append(Finding("not-scheduled", names(late), f"in a param group added after the "
                                f"{type(scheduler).__name__} was built: it keeps its lr while the others follow "
                                "the schedule", "add it with lw.add_param_group(..., scheduler=scheduler), "
                                "which extends the scheduler"))
    scaled = [i for i, g in enumerate(groups) if g.get("lr_scale", 1) != 1]
    if not scaled:
        return findings
    if max(g.get("lr_scale", 1) for g in groups) < 1:
        findings.append(Finding("lr-scale-top", names(p for g in groups for p in g["params"] if "lr_scale" in g),
                                "no trained layer has lr_scale 1: the layer decay counted layers that are not "
                                "trained (a frozen module numbered above the blocks)", "number only trained "
                                "layers: lw.param_groups(model, lr=..., layer_decay=...) leaves frozen parameters out"))
    if scheduler is None or isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):  # it scales no group
        now = [g["lr"] for g in groups]
        applies = False
    else:
        try:
            now = _step_lrs(optimizers, scheduler)
            applies = not all(_close(a, b) for a, b in zip(now, _step_lrs(optimizers, scheduler, scale=2.0)))
        except (ValueError, IndexError, TypeError, RuntimeError, ZeroDivisionError):  # past its end (OneCycleLR)
            return findings
    # Does each group's own lr already hold its scale? Then lr / lr_scale is the same across groups.
    base = [g.get("initial_lr", g["lr"]) for g in groups]
    holds = sum(_close(base[i] / groups[i]["lr_scale"], base[scaled[0]] / groups[scaled[0]]["lr_scale"]) for i in scaled)
    bare = sum(_close(base[i], base[scaled[0]]) for i in scaled)
    if holds == bare:  # one scale, or no pattern: nothing to say
        return findings
    params = [p for i in scaled for p in groups[i]["params"]]
    who = type(scheduler).__name__ if scheduler is not None else "no scheduler"
    if holds > bare and applies:
        i = scaled[0]
        findings.append(Finding("lr-scale-twice", names(params), f"lr already holds lr_scale and {who} multiplies "
                                f"by it again: {names(groups[i]['params'])[0]} gets {now[i]:.3g}, intended "
                                f"{now[i] / groups[i]['lr_scale']:.3g}", "drop lr_scale from the groups "
                                "(lw.param_groups puts the scale in lr only), or give every group the base lr"))
    elif bare > holds and not applies:
        findings.append(Finding("lr-scale-ignored", names(params), f"lr_scale is read by nothing ({who} ignores it): every layer gets "
                                f"the same lr ({now[scaled[0]]:.3g}), layer decay has no effect",
                                "lw.param_groups(model, lr=..., layer_decay=...) puts the scale in lr, "
                                "which every scheduler follows; or use a timm scheduler"))
    return findings
