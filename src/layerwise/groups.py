"""Optimizer parameter groups from per-layer rules: learning rates, weight decay, layer-wise LR decay."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

import torch
from rich.table import Table
from torch import nn

from ._layer_ids import layer_ids
from ._tensors import require_flag, require_module
from ._term import console
from .errors import OptionError, OptionTypeError, SelectionError
from .select import Selector, Walk, closest, describe, resolve

__all__ = ["add_param_group", "param_groups"]

Rules = Mapping[Any, Mapping[str, Any]] | Sequence[tuple[Any, Mapping[str, Any]]]

# Group keys that are not optimizer options but that optimizers carry along: a group's name
# (Lightning, torch's named groups), timm's scheduler and hybrid-optimizer conventions.
_GROUP_KEYS = frozenset({"name", "param_names", "initial_lr", "lr_scale", "use_fallback"})
_FLOAT32_MAX = torch.finfo(torch.float32).max
_NON_NEGATIVE = ("lr", "weight_decay", "momentum", "dampening", "eps", "lr_decay", "initial_accumulator_value")


def _as_selectors(key: Any) -> tuple[Selector, ...]:
    return tuple(key) if isinstance(key, (tuple, list)) else (key,)


def _known_options(optimizer: Any) -> tuple[str, frozenset[str] | None]:
    """The optimizer's name and the options its groups take (None: it takes any keyword)."""
    if optimizer is None:
        return "", None
    if isinstance(optimizer, torch.optim.Optimizer):
        return type(optimizer).__name__, frozenset(optimizer.defaults) | _GROUP_KEYS
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        signature = inspect.signature(optimizer)
        if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
            return optimizer.__name__, None
        return optimizer.__name__, frozenset(signature.parameters) - {"params"} | _GROUP_KEYS
    raise OptionTypeError(f"optimizer={optimizer!r} must be a torch.optim.Optimizer class (torch.optim.AdamW) "
                          "or instance, to check the options against")


def _real(value: Any) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype.is_floating_point:
        return float(value)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def check_options(options: Mapping[str, Any], where: str, optimizer: Any = None) -> None:
    """Refuse, naming ``where`` and the option, an unknown option name or a value the optimizer would refuse late."""
    name, known = _known_options(optimizer)
    for key, value in options.items():
        if not isinstance(key, str):
            raise OptionTypeError(f"{where} sets {key!r}; an option is named by a string, such as 'lr'")
        if key in ("params", "names"):
            raise OptionError(f"{where} sets {key!r}; the selector chooses the parameters")
        if known is not None and key not in known:
            hint = closest(key, sorted(known), 1)
            raise OptionError(f"{where} sets {key!r}, which {name} does not take"
                              + (f" (did you mean {hint[0]!r}?)" if hint else "")
                              + f". {name} takes: {', '.join(sorted(known - _GROUP_KEYS))}.")
        if key in _NON_NEGATIVE:
            number = _real(value)
            if number is None:
                raise OptionTypeError(f"{where} sets {key}={value!r}; {key} takes a number, e.g. {key}=1e-3")
            if not 0 <= number <= _FLOAT32_MAX:  # beyond it, torch fails at the first float32 step
                raise OptionError(f"{where} sets {key}={value!r}; {key} takes a finite number >= 0")
        elif key == "betas":
            pair = [_real(b) for b in value] if isinstance(value, (tuple, list)) else []
            if len(pair) != 2 or any(b is None or not 0 <= b < 1 for b in pair):
                raise OptionError(f"{where} sets betas={value!r}; betas takes two numbers in [0, 1), e.g. (0.9, 0.999)")


def _rule_list(rules: Rules | None, optimizer: Any) -> list[tuple[tuple[Selector, ...], dict[str, Any]]]:
    if rules is None:
        return []
    if not isinstance(rules, (Mapping, Sequence)) or isinstance(rules, str):
        raise OptionTypeError(f"rules must be {{selector: {{option: value}}}} or a list of (selector, options) pairs; "
                              f"got {type(rules).__name__}")
    items = rules.items() if isinstance(rules, Mapping) else rules
    out = []
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], Mapping)):
            raise OptionTypeError(f"a rule is (selector, {{option: value}}); got {item!r}")
        key, options = item
        check_options(options, f"rule {', '.join(map(describe, _as_selectors(key)))}", optimizer)
        out.append((_as_selectors(key), dict(options)))
    return out


def default_no_decay(model: nn.Module, walk: Walk | None = None) -> set[int]:
    """The ``id`` of each parameter that timm's ``param_groups_weight_decay`` (and BEiT) keep from decay:
    1-D tensors, names ending in ``.bias``, and names matching the model's ``no_weight_decay()``,
    as fnmatch patterns, not selectors: ``*`` crosses dots there, a module path is no parameter
    name, and FocalNet's ``{''}`` matches nothing. Names holding one of the model's
    ``no_weight_decay_keywords()`` (Swin's, SimMIM's: ``relative_position_bias_table``) too, as
    their ``set_weight_decay`` does."""
    patterns, keywords = _model_names(model, "no_weight_decay"), _model_names(model, "no_weight_decay_keywords")
    return {id(p) for names, p in resolve(walk or Walk(model)).groups
            if p.ndim <= 1 or any(n.endswith(".bias") or any(fnmatchcase(n, pat) for pat in patterns)
                                  or any(k in n for k in keywords) for n in names)}


def _model_names(model: nn.Module, method: str) -> list[str]:
    """What ``model.no_weight_decay()`` (or ``..._keywords()``) gives: strings, or an error naming it."""
    found = getattr(model, method, None)
    names = list((found() if callable(found) else found) or ())
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        kind = "name parts (strings, as in Swin)" if method.endswith("keywords") else "names (strings, fnmatch patterns as in timm)"
        raise OptionTypeError(f"{type(model).__name__}.{method}() gave {bad[0]!r}: it must give parameter {kind}")
    return names


def _no_decay_ids(model: nn.Module, walk: Walk, no_decay: str | Iterable[Selector] | None) -> set[int]:
    if no_decay is None:
        return set()
    if no_decay == "default":
        return default_no_decay(model, walk)
    if isinstance(no_decay, str):
        no_decay = [no_decay]
    return {id(p) for _, p in resolve(walk, *no_decay).groups}


def _key(options: Mapping[str, Any]) -> str:
    return repr(sorted(options.items()))


def param_groups(model: nn.Module, rules: Rules | None = None, *, lr: float | None = None,
                 weight_decay: float | None = None, no_decay: str | Iterable[Selector] | None = "default",
                 layer_decay: float | None = None, layers: Selector | None = None,
                 optimizer: type[torch.optim.Optimizer] | torch.optim.Optimizer | None = None,
                 verbose: bool = False) -> list[dict[str, Any]]:
    """Param groups for any ``torch.optim`` optimizer, from per-layer rules.

    ``rules`` is ``{selector: {option: value}}`` or a list of ``(selector, options)`` pairs (a
    tuple key holds several selectors). Rules apply in order and a later rule overrides only
    the options it names (a cascade). ``lr`` and ``weight_decay`` are the base options.
    Frozen parameters are left out, a shared parameter appears once, every trainable
    parameter lands in exactly one group, and parameters whose final options are equal share
    a group. Each group carries ``"names"``: one name per parameter, aligned with
    ``"params"`` (``lw.shared`` lists a tied parameter's other names).

    Options are checked when given: ``lr``, ``weight_decay``, ``momentum``, ``eps`` finite
    numbers >= 0, ``betas`` two numbers in [0, 1); with ``optimizer=`` (a class such as
    ``torch.optim.AdamW``, or an instance) an option it does not take (``lrr``) is an error.

    No decay: as timm's ``param_groups_weight_decay``, parameters with ``ndim <= 1`` (biases,
    norm weights), names ending in ``.bias``, and names matching the model's ``no_weight_decay()``
    (fnmatch patterns: ``*`` crosses dots) or holding one of its ``no_weight_decay_keywords()``
    (Swin's) get ``weight_decay=0.0`` after the rules;
    ``no_decay=`` takes selectors to use instead, ``no_decay=None`` turns it off.

    Layer-wise LR decay (BEiT, ELECTRA, timm), ``layer_decay=d`` in (0, 1]: with
    ``layers="encoder.layers.*"`` the blocks the pattern matches are layers 1..L in model order;
    parameters before the first block (embeddings, cls token) are layer 0, those between two
    blocks (a stage's downsample) the later block's, the final norm right after the last block
    (a sibling of the blocks' container: a ViT's ``norm``, a Llama's ``model.norm``; not a
    global-pool ``fc_norm``) closes it, the rest (head, its own norm included) is L + 1: timm's
    numbering of ViTs and ConvNeXts. Without
    ``layers=``, a model with timm's ``group_matcher()`` numbers its own layers exactly as timm's
    ``param_groups_layer_decay`` does (frozen parameters aside: they shift no trained layer).
    Each group's ``lr`` is multiplied by ``d ** (top - layer_id)``. The groups carry no
    ``lr_scale``: ``lr`` is the intended rate, so torch's schedulers (which scale each group's
    initial lr) and timm's (which would multiply by ``lr_scale`` a second time) both give it.

    Example:
        >>> import layerwise as lw, torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        >>> groups = lw.param_groups(net, {"**": {"lr": 1e-3}, "1": {"lr": 1e-2}}, weight_decay=0.05)
        >>> [(g["names"], g["lr"], g["weight_decay"]) for g in groups]
        [(['0.weight'], 0.001, 0.05), (['0.bias'], 0.001, 0.0), (['1.weight'], 0.01, 0.05), (['1.bias'], 0.01, 0.0)]
        >>> opt = torch.optim.AdamW(groups)
        >>> lw.param_groups(net, {"1": {"lrr": 0.1}}, optimizer=torch.optim.AdamW)
        Traceback (most recent call last):
        ...
        layerwise.errors.OptionError: rule '1' sets 'lrr', which AdamW does not take (did you mean 'lr'?). ...
    """
    require_module(model, "param_groups")
    require_flag(verbose, "verbose", "param_groups")
    base = {k: v for k, v in (("lr", lr), ("weight_decay", weight_decay)) if v is not None}
    check_options(base, "param_groups", optimizer)
    rule_list = _rule_list(rules, optimizer)
    if layer_decay is not None:
        factor, accepted = _real(layer_decay), "the factor between a layer's lr and the next's, a number in (0, 1]"
        if factor is None:
            raise OptionTypeError(f"layer_decay={layer_decay!r}: {accepted}, e.g. 0.75")
        if not 0 < factor <= 1:
            raise OptionError(f"layer_decay={layer_decay!r}: {accepted}, e.g. 0.75")
    if not (no_decay is None or isinstance(no_decay, (str, Iterable))):
        raise OptionTypeError(f"no_decay={no_decay!r}: give selectors (no_decay=['head', '**.bias']), "
                              "'default' (1-D parameters and the model's no_weight_decay()) or None")
    if layers is not None and layer_decay is None:
        raise OptionError("layers= says which blocks layer-wise LR decay numbers; give the factor too: layer_decay=0.75")

    walk = Walk(model)  # every rule resolves against this one walk
    everything = resolve(walk).selection()
    trainable = [(name, p) for name, p in everything if p.requires_grad]
    options: dict[int, dict[str, Any]] = {id(p): dict(base) for _, p in trainable}
    for selectors, rule in rule_list:
        chosen = resolve(walk, *selectors).selection()
        hit = [p for p in chosen.params() if id(p) in options]
        if not hit:
            warnings.warn(f"rule {', '.join(map(describe, selectors))} matches only frozen parameters "
                          f"({', '.join(chosen.names()[:5])}); it changes no group", stacklevel=2)
        for p in hit:
            options[id(p)].update(rule)

    for pid in _no_decay_ids(model, walk, no_decay) & options.keys():
        options[pid]["weight_decay"] = 0.0

    if layer_decay is not None:
        layer_of, top = layer_ids(model, layers, [name for name, _ in trainable])
        for name, p in trainable:
            opts = options[id(p)]
            if "lr" not in opts:
                raise OptionError(f"layer-wise LR decay scales a learning rate, but {name} has none: "
                                  "pass lr=... or give it one through a rule")
            opts["lr"] = opts["lr"] * factor ** (top - layer_of[name])

    groups: dict[str, dict[str, Any]] = {}
    for name, p in trainable:
        opts = options[id(p)]
        group = groups.setdefault(_key(opts), {"params": [], "names": [], **opts})
        group["params"].append(p)
        group["names"].append(name)
    result = list(groups.values())
    if verbose:
        explain_groups(result)
    return result


def explain_groups(groups: Sequence[Mapping[str, Any]], file: Any = None) -> None:
    """Print one line per group: its size, options and first parameter names (nanoGPT's decay split, generalized)."""
    table = Table(title="param groups", title_justify="left")
    options = sorted({k for g in groups for k in g if k not in ("params", "names")})
    for header in ["group", "tensors", "parameters", *options, "names"]:
        table.add_column(header, justify="left" if header == "names" else "right")
    for i, g in enumerate(groups):
        names = ", ".join(g["names"][:3]) + (f", … (+{len(g['names']) - 3})" if len(g["names"]) > 3 else "")
        table.add_row(str(i), str(len(g["params"])), f"{sum(p.numel() for p in g['params']):,}",
                      *[f"{g[k]:.4g}" if isinstance(g.get(k), float) else str(g.get(k, "")) for k in options], names)
    console(file).print(table)


def group_index(optimizer: torch.optim.Optimizer) -> dict[int, int]:
    """The param group index of each parameter (by ``id``) that ``optimizer`` holds."""
    return {id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}


def check_schedulers(schedulers: Sequence[Any], optimizer: Any = None, *, extended: bool = True) -> None:
    """Refuse, before anything changes, what is no LR scheduler of ``optimizer`` (it would be left behind
    silently) and, where it will be ``extended``, one that cannot follow a group added after it was built."""
    from torch.optim import lr_scheduler

    for scheduler in schedulers:
        owner = getattr(scheduler, "optimizer", None)  # torch's, ReduceLROnPlateau, timm's: all keep it
        if not hasattr(owner, "param_groups"):
            raise OptionTypeError(f"scheduler={scheduler!r:.60} is not an LR scheduler (torch.optim.lr_scheduler's or "
                                  "timm's, built on the optimizer): it has no optimizer")
        if optimizer is not None and optimizer not in (owner, getattr(owner, "optimizer", None)):  # or a wrapper's
            raise OptionError(f"scheduler={type(scheduler).__name__} schedules another optimizer: pass the scheduler "
                              "built on this one")
        if not extended:
            continue
        if isinstance(scheduler, (lr_scheduler.SequentialLR, lr_scheduler.ChainedScheduler)):
            check_schedulers(scheduler._schedulers)
        elif isinstance(scheduler, (lr_scheduler.OneCycleLR, lr_scheduler.CyclicLR)):
            raise OptionError(f"scheduler={type(scheduler).__name__} keeps a schedule per param group that cannot be "
                              "extended: build the optimizer with every parameter (frozen ones are skipped until "
                              "they get a gradient) and unfreeze in place, which adds no group")


def _extend_scheduler(scheduler: Any, group: dict[str, Any]) -> None:
    """Give an LR scheduler what it keeps per param group for a group added after it was built."""
    for inner in getattr(scheduler, "_schedulers", ()):  # SequentialLR, ChainedScheduler
        _extend_scheduler(inner, group)
    # torch's base_lrs and _last_lr, timm's base_values: the new group's own initial and current lr.
    for name, value in (("base_lrs", group["initial_lr"]), ("base_values", group["initial_lr"]), ("_last_lr", group["lr"])):
        if isinstance(getattr(scheduler, name, None), list):
            getattr(scheduler, name).append(value)
    for name in ("lr_lambdas", "min_lrs"):  # LambdaLR / MultiplicativeLR, ReduceLROnPlateau: as the first group
        values = getattr(scheduler, name, None)
        if isinstance(values, list) and values:
            values.append(values[0])


def add_group(optimizer: torch.optim.Optimizer, named: Sequence[tuple[str, torch.Tensor]], options: Mapping[str, Any],
              schedulers: Sequence[Any] = ()) -> dict[str, Any]:
    """Add ``(name, parameter)`` pairs as one group, all or nothing.

    Every check (a parameter the optimizer holds, an option it does not take or a bad value,
    a scheduler that cannot follow) runs before the optimizer or a scheduler changes.
    """
    held = group_index(optimizer)
    twice = [f"{name} is already in param group {held[id(p)]}" for name, p in named if id(p) in held]
    if twice:
        raise SelectionError("cannot add to the optimizer: " + "; ".join(twice)
                             + ". A parameter may be in one group only; select the others.")
    check_options(options, "add_param_group", optimizer)
    check_schedulers(schedulers, optimizer)
    group = {"params": [p for _, p in named], "names": [n for n, _ in named], **options}
    if optimizer.param_groups and "param_names" in optimizer.param_groups[0]:
        group["param_names"] = list(group["names"])  # torch requires all groups or none to be named
    optimizer.add_param_group(group)
    added = optimizer.param_groups[-1]
    if schedulers:
        added.setdefault("initial_lr", added["lr"])
        for scheduler in schedulers:
            _extend_scheduler(scheduler, added)
    return added


def add_param_group(optimizer: torch.optim.Optimizer, model: nn.Module, *selectors: Selector,
                    scheduler: Any = None, **options: Any) -> dict[str, Any]:
    """Add the selected trainable parameters to ``optimizer`` as one new group with ``options``.

    All or nothing: a parameter the optimizer already holds (named with its group), an option
    the optimizer does not take or a bad value, or a scheduler that cannot follow the new group
    is refused before the optimizer or any scheduler changes. Options you do not give come from
    the optimizer's defaults. An LR ``scheduler`` (torch's or timm's, or a list of them) built
    on the optimizer is extended to the new group, which torch's schedulers otherwise refuse at
    their next ``step()``; the new group follows the schedule of the first group from its own
    lr. Returns the new group.

    Example:
        >>> import layerwise as lw, torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        >>> opt = torch.optim.SGD(net[0].parameters(), lr=0.1)
        >>> lw.add_param_group(opt, net, "1", lr=0.01)["names"]
        ['1.weight', '1.bias']
        >>> lw.add_param_group(opt, net, "1.bias")
        Traceback (most recent call last):
        ...
        layerwise.errors.SelectionError: cannot add to the optimizer: 1.bias is already in param group 1. ...
    """
    require_module(model, "add_param_group")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise OptionTypeError(f"add_param_group takes a torch.optim.Optimizer, got {type(optimizer).__name__}")
    chosen = resolve(model, *selectors).selection()
    named = [(name, p) for name, p in chosen if p.requires_grad]
    if not named:
        raise SelectionError(f"every parameter selected by {', '.join(map(describe, selectors))} is frozen; "
                             "unfreeze them first (lw.unfreeze)")
    schedulers = [] if scheduler is None else list(scheduler) if isinstance(scheduler, (list, tuple)) else [scheduler]
    return add_group(optimizer, named, options, schedulers)
