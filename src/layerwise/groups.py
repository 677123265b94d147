"""Optimizer parameter groups from per-layer rules: learning rates, weight decay, layer-wise LR decay."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from rich.table import Table
from torch import nn

from ._term import console
from .select import SelectionError, Selector, Walk, describe, parse, resolve, select

__all__ = ["add_param_group", "param_groups"]

Rules = Mapping[Any, Mapping[str, Any]] | Sequence[tuple[Any, Mapping[str, Any]]]


def _as_selectors(key: Any) -> tuple[Selector, ...]:
    return tuple(key) if isinstance(key, (tuple, list)) else (key,)


def _rule_list(rules: Rules | None) -> list[tuple[tuple[Selector, ...], dict[str, Any]]]:
    if rules is None:
        return []
    items = rules.items() if isinstance(rules, Mapping) else rules
    out = []
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], Mapping)):
            raise ValueError(f"a rule is (selector, {{option: value}}); got {item!r}")
        key, options = item
        if "params" in options or "names" in options:
            raise ValueError(f"rule {key!r} sets 'params'/'names'; the selector chooses the parameters")
        out.append((_as_selectors(key), dict(options)))
    return out


def _block_ids(model: nn.Module, walk: Walk, layers: Selector) -> tuple[dict[int, int], int]:
    """Layer id of every parameter (by id) for layer-wise decay, and the number of blocks L."""
    if not isinstance(layers, str) or parse(layers).kind == "re":
        raise SelectionError(f"layers={layers!r} must be a module path pattern like 'encoder.layers.*' "
                             "or a type selector like 'type:TransformerEncoderLayer'")
    # A block is a module the pattern reaches with no reached module above it.
    blocks: set[str] = set()
    for path, _ in resolve(walk, layers, missing_ok=True).modules:
        parts = path.split(".")
        if not any(".".join(parts[:k]) in blocks for k in range(len(parts))):
            blocks.add(path)

    def block(name: str) -> str | None:
        parts = name.split(".")
        return next((p for p in (".".join(parts[:k]) for k in range(len(parts))) if p in blocks), None)

    everything = resolve(walk).selection()
    order: dict[str, int] = {}
    assigned: list[tuple[int, int | None]] = []
    for names, p in zip(everything.aliases(), everything.params()):
        key = next((b for b in map(block, names) if b is not None), None)
        if key is not None and key not in order:
            order[key] = len(order) + 1
        assigned.append((id(p), order.get(key) if key is not None else None))
    if not order:
        raise SelectionError(f"layers={layers!r} matches no numbered blocks of {type(model).__name__}; "
                             "give the pattern of the repeated blocks, e.g. 'encoder.layers.*' or 'blocks.*'")
    n_blocks = len(order)
    ids: dict[int, int] = {}
    seen_block = 0
    for pid, layer in assigned:
        if layer is not None:
            seen_block = layer
            ids[pid] = layer
        else:
            # Before the first block: embeddings (0). After the last: final norm and head (L + 1).
            # Between blocks: the block before.
            ids[pid] = 0 if seen_block == 0 else (n_blocks + 1 if seen_block == n_blocks else seen_block)
    return ids, n_blocks


def _no_decay_ids(model: nn.Module, walk: Walk, no_decay: str | Iterable[Selector] | None) -> set[int]:
    if no_decay is None:
        return set()
    if no_decay == "default":
        ids = {id(p) for p in model.parameters() if p.ndim <= 1}
        names = getattr(model, "no_weight_decay", lambda: ())()
        if names:
            ids |= {id(p) for p in resolve(walk, *names, missing_ok=True).selection().params()}
        return ids
    if isinstance(no_decay, str):
        no_decay = [no_decay]
    return {id(p) for p in resolve(walk, *no_decay).selection().params()}


def _key(options: Mapping[str, Any]) -> str:
    return repr(sorted(options.items()))


def param_groups(model: nn.Module, rules: Rules | None = None, *, lr: float | None = None,
                 weight_decay: float | None = None, no_decay: str | Iterable[Selector] | None = "default",
                 layer_decay: float | None = None, layers: Selector | None = None,
                 verbose: bool = False) -> list[dict[str, Any]]:
    """Param groups for any ``torch.optim`` optimizer, from per-layer rules.

    ``rules`` is ``{selector: {option: value}}`` or a list of ``(selector, options)`` pairs (a
    tuple key holds several selectors). Rules apply in order and a later rule overrides only
    the options it names (a cascade). ``lr`` and ``weight_decay`` are the base options.
    Frozen parameters are left out, a shared parameter appears once, every trainable
    parameter lands in exactly one group, and parameters whose final options are equal share
    a group. Each group carries ``"names"``: one name per parameter, aligned with
    ``"params"`` (``lw.shared`` lists a tied parameter's other names).

    No decay: parameters with ``ndim <= 1`` (biases, norm weights) and those named by the
    model's ``no_weight_decay()`` (timm's convention) get ``weight_decay=0.0`` after the rules;
    ``no_decay=`` takes selectors to use instead, ``no_decay=None`` turns it off.

    Layer-wise LR decay (BEiT, ELECTRA, timm): with ``layer_decay=d, layers="encoder.layers.*"``
    the blocks the pattern matches are layers 1..L in model order; parameters before the first
    block (embeddings, cls token) are layer 0 and those after the last (final norm, head) L + 1.
    Each group gets ``lr_scale = d ** (L + 1 - layer_id)`` and ``lr`` multiplied by it. (timm's
    schedulers multiply by ``lr_scale`` themselves: with them, take the groups' ``lr_scale`` and
    give every group the base lr, or the scale is applied twice.)

    Example:
        >>> import layerwise as lw, torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        >>> groups = lw.param_groups(net, {"**": {"lr": 1e-3}, "1": {"lr": 1e-2}}, weight_decay=0.05)
        >>> [(g["names"], g["lr"], g["weight_decay"]) for g in groups]
        [(['0.weight'], 0.001, 0.05), (['0.bias'], 0.001, 0.0), (['1.weight'], 0.01, 0.05), (['1.bias'], 0.01, 0.0)]
        >>> opt = torch.optim.AdamW(groups)
    """
    walk = Walk(model)  # every rule and the layer ids resolve against this one walk
    everything = resolve(walk).selection()
    trainable = [(name, p) for name, p in everything if p.requires_grad]
    options: dict[int, dict[str, Any]] = {id(p): {} for _, p in trainable}
    base = {k: v for k, v in (("lr", lr), ("weight_decay", weight_decay)) if v is not None}
    for opts in options.values():
        opts.update(base)

    for selectors, rule in _rule_list(rules):
        chosen = resolve(walk, *selectors).selection()
        hit = [p for p in chosen.params() if id(p) in options]
        if not hit:
            warnings.warn(f"rule {', '.join(map(describe, selectors))} matches only frozen parameters "
                          f"({', '.join(chosen.names()[:5])}); it changes no group", stacklevel=2)
        for p in hit:
            options[id(p)].update(rule)

    for pid in _no_decay_ids(model, walk, no_decay) & options.keys():
        options[pid]["weight_decay"] = 0.0

    if layer_decay is not None or layers is not None:
        if layer_decay is None or layers is None:
            raise ValueError("layer-wise LR decay needs both layer_decay=<factor> and layers=<block pattern>, "
                             "e.g. layer_decay=0.75, layers='encoder.layers.*'")
        layer_of, n_blocks = _block_ids(model, walk, layers)
        for name, p in trainable:
            opts = options[id(p)]
            if "lr" not in opts:
                raise ValueError(f"layer-wise LR decay scales a learning rate, but {name} has none: "
                                 "pass lr=... or give it one through a rule")
            scale = layer_decay ** (n_blocks + 1 - layer_of[id(p)])
            opts.update(lr=opts["lr"] * scale, lr_scale=scale)

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


def _extend_scheduler(scheduler: Any, group: dict[str, Any]) -> None:
    """Give an LR scheduler what it keeps per param group for a group added after it was built."""
    from torch.optim import lr_scheduler

    if isinstance(scheduler, (lr_scheduler.SequentialLR, lr_scheduler.ChainedScheduler)):
        for inner in scheduler._schedulers:
            _extend_scheduler(inner, group)
    elif isinstance(scheduler, (lr_scheduler.OneCycleLR, lr_scheduler.CyclicLR)):
        raise ValueError(f"{type(scheduler).__name__} keeps a schedule per param group that cannot be extended: "
                         "build the optimizer with every parameter (frozen ones are skipped until they get "
                         "a gradient) and unfreeze in place, which adds no group")
    for name, value in (("base_lrs", group["initial_lr"]), ("_last_lr", group["lr"])):
        if isinstance(getattr(scheduler, name, None), list):
            getattr(scheduler, name).append(value)
    for name in ("lr_lambdas", "min_lrs"):  # LambdaLR / MultiplicativeLR, ReduceLROnPlateau: as the first group
        values = getattr(scheduler, name, None)
        if isinstance(values, list) and values:
            values.append(values[0])


def add_group(optimizer: torch.optim.Optimizer, named: Sequence[tuple[str, torch.Tensor]], options: Mapping[str, Any],
              schedulers: Sequence[Any] = ()) -> dict[str, Any]:
    """Add ``(name, parameter)`` pairs as one group; refuse any the optimizer holds; extend the schedulers."""
    held = group_index(optimizer)
    twice = [f"{name} is already in param group {held[id(p)]}" for name, p in named if id(p) in held]
    if twice:
        raise ValueError("cannot add to the optimizer: " + "; ".join(twice)
                         + ". A parameter may be in one group only; select the others.")
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

    Refuses a parameter the optimizer already holds, naming it and its group. Options you do
    not give come from the optimizer's defaults. An LR ``scheduler`` (or a list of them) built
    on the optimizer is extended to the new group, which torch's schedulers otherwise refuse
    at their next ``step()``; the new group follows the schedule of the first group. Returns
    the new group.

    Example:
        >>> import layerwise as lw, torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        >>> opt = torch.optim.SGD(net[0].parameters(), lr=0.1)
        >>> lw.add_param_group(opt, net, "1", lr=0.01)["names"]
        ['1.weight', '1.bias']
        >>> lw.add_param_group(opt, net, "1.bias")
        Traceback (most recent call last):
        ...
        ValueError: cannot add to the optimizer: 1.bias is already in param group 1. ...
    """
    chosen = select(model, *selectors)
    named = [(name, p) for name, p in chosen if p.requires_grad]
    if not named:
        raise ValueError(f"every parameter selected by {', '.join(map(describe, selectors))} is frozen; "
                         "unfreeze them first (lw.unfreeze)")
    schedulers = [] if scheduler is None else list(scheduler) if isinstance(scheduler, (list, tuple)) else [scheduler]
    return add_group(optimizer, named, options, schedulers)
