"""The per-layer table of a model: shapes, trainable or frozen, sharing, optimizer group, lr, weight decay."""

from __future__ import annotations

from collections.abc import Sequence
from typing import IO, Any

import torch
from rich.table import Table
from torch import nn

from ._term import console
from .groups import group_index
from .select import Selector, Walk, resolve

__all__ = ["show"]


def count_calls(model: nn.Module, inputs: Any) -> dict[int, int]:
    """How many times each module (by id) runs in one forward of ``inputs``, without touching its state."""
    calls: dict[int, int] = {}
    modules = list(model.modules())

    def count(module: nn.Module, _args: Any) -> None:
        calls[id(module)] = calls.get(id(module), 0) + 1

    handles = [m.register_forward_pre_hook(count) for m in modules]
    modes = [m.training for m in modules]
    try:
        model.eval()  # eval so that normalization statistics stay as they are
        with torch.no_grad():
            model(*inputs) if isinstance(inputs, tuple) else model(inputs)
    finally:
        for h in handles:
            h.remove()
        for m, mode in zip(modules, modes):
            m.training = mode
    return calls


class LayerTable(list):
    """The rows of :func:`show`: a plain list of dicts that also renders as its rich table."""

    def __init__(self, rows: Sequence[dict[str, Any]], title: str, trainable: int, total: int,
                 extra: Sequence[str] = ()):
        super().__init__(rows)
        self.title, self.trainable, self.total, self.extra = title, trainable, total, tuple(extra)

    def __rich__(self) -> Table:
        return _table(self)


def _monitor_columns(monitor: Any) -> dict[str, dict[str, float | None]]:
    """The last logged gradient norm (and update ratio) of each layer of a GradMonitor."""
    rows = monitor.history
    if not rows:
        return {}
    last = max(row["step"] for row in rows)
    latest = [row for row in rows if row["step"] == last]
    columns = {f"grad_norm@{last}": {row["layer"]: row.get("grad_norm") for row in latest}}
    if any("update_ratio" in row for row in latest):
        columns[f"update_ratio@{last}"] = {row["layer"]: row.get("update_ratio") for row in latest}
    return columns


@torch.no_grad()
def _ema_column(model: nn.Module, ema: Any) -> dict[str, dict[str, float | None]]:
    """How far each weight is from its EMA: ‖w − w_ema‖ / ‖w‖."""
    live = dict(model.named_parameters(remove_duplicate=False))
    distance = {}
    for name, shadow in zip(ema.names, ema.shadow):
        w = live[name].detach().to(shadow.dtype)
        norm = w.norm()
        distance[name] = ((w - shadow).norm() / norm).item() if norm > 0 else None
    return {"ema_distance": distance}


def show(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *selectors: Selector,
         inputs: Any = None, monitor: Any = None, ema: Any = None, file: IO[str] | None = None,
         quiet: bool = False) -> LayerTable:
    """Print one table of every parameter and return its rows as plain dicts.

    Columns: name, shape, numel, dtype, trainable, the other names of a shared parameter,
    and with an ``optimizer`` its group index, lr and weight decay. Two classic bugs are
    flagged: a trainable parameter missing from the optimizer, and a frozen parameter that
    still holds a ``.grad`` (``stale_grad``: the optimizer's momentum or weight decay will keep
    moving it; ``lw.freeze`` clears it). Pass ``inputs`` (a tensor or a tuple of forward
    arguments) to also count how many times each parameter's module runs per forward, so a
    layer applied to two branches shows ``2``. With a ``monitor`` (:class:`~layerwise.GradMonitor`)
    the last logged gradient norm and update ratio of each layer join the table, with an
    ``ema`` (:class:`~layerwise.EMA`) each weight's relative distance to its average.
    Totals count a shared parameter once. Selectors restrict the rows, not the totals.

    Example:
        >>> import layerwise as lw, torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        >>> net[0].requires_grad_(False)  # doctest: +ELLIPSIS
        Linear(...)
        >>> opt = torch.optim.SGD([net[1].weight, net[1].bias], lr=0.1)
        >>> rows = lw.show(net, opt, quiet=True)
        >>> [(r["name"], r["trainable"], r["lr"]) for r in rows]
        [('0.weight', False, None), ('0.bias', False, None), ('1.weight', True, 0.1), ('1.bias', True, 0.1)]
    """
    if optimizer is not None and not hasattr(optimizer, "param_groups"):
        selectors, optimizer = (optimizer, *selectors), None  # show(model, "encoder"): a selector, no optimizer
    walk = Walk(model)  # one walk: the rows, the totals and the modules that own them
    everything = resolve(walk).selection()
    chosen = resolve(walk, *selectors).selection() if selectors else everything
    in_group = group_index(optimizer) if optimizer is not None else {}
    calls = count_calls(model, inputs) if inputs is not None else None
    owners = dict(zip(walk.paths, walk.modules))
    extra = {**(_monitor_columns(monitor) if monitor is not None else {}),
             **(_ema_column(model, ema) if ema is not None else {})}

    rows = []
    for names, p in zip(chosen.aliases(), chosen.params()):
        row: dict[str, Any] = {
            "name": names[0],
            "shape": tuple(p.shape),
            "numel": p.numel(),
            "dtype": str(p.dtype).removeprefix("torch."),
            "trainable": p.requires_grad,
            # A frozen parameter that still holds a gradient: momentum or weight decay will move it.
            "stale_grad": not p.requires_grad and p.grad is not None,
            "shared_with": list(names[1:]),
        }
        if calls is not None:  # a tied parameter is used by every module that holds it
            holders = {id(owners[n.rpartition(".")[0]]) for n in names}
            row["calls"] = sum(calls.get(h, 0) for h in holders)
        if optimizer is not None:
            g = in_group.get(id(p))
            group = optimizer.param_groups[g] if g is not None else {}
            row.update(group=g, lr=group.get("lr"), weight_decay=group.get("weight_decay"))
        for column, values in extra.items():
            row[column] = next((values[n] for n in names if n in values), None)
        rows.append(row)

    trainable = sum(p.numel() for p in everything.params() if p.requires_grad)
    table = LayerTable(rows, type(model).__name__, trainable, everything.numel(), extra)
    console(file, quiet=quiet).print(table)
    return table


def _table(rows: LayerTable) -> Table:
    with_calls = bool(rows) and "calls" in rows[0]
    with_optimizer = bool(rows) and "group" in rows[0]
    frozen = rows.total - rows.trainable
    table = Table(title=f"{rows.title}: trainable {rows.trainable:,} · frozen {frozen:,} · total {rows.total:,} "
                  "parameters (shared ones counted once)", title_justify="left")
    for header, justify in (("name", "left"), ("shape", "left"), ("numel", "right"), ("dtype", "left"),
                            ("trainable", "center"), ("shared with", "left")):
        table.add_column(header, justify=justify)
    if with_calls:
        table.add_column("calls / forward", justify="right")
    if with_optimizer:
        for header in ("group", "lr", "weight decay"):
            table.add_column(header, justify="right")
    for header in rows.extra:
        table.add_column(header.replace("_", " "), justify="right")
    for r in rows:
        cells = [r["name"], "×".join(map(str, r["shape"])) or "scalar", f"{r['numel']:,}", r["dtype"],
                 "[green]yes[/]" if r["trainable"] else "[red]frozen, stale .grad[/]" if r["stale_grad"] else "[blue]frozen[/]",
                 ", ".join(r["shared_with"])]
        if with_calls:
            cells.append(f"[bold]{r['calls']}[/]" if r["calls"] > 1 else str(r["calls"]))
        if with_optimizer:
            if r["group"] is None:
                cells += ["[red]not in optimizer[/]" if r["trainable"] else "-", "", ""]
            else:
                cells += [str(r["group"]), f"{r['lr']:.3g}", f"{r['weight_decay']:.3g}" if r["weight_decay"] is not None else ""]
        cells += ["-" if r[column] is None else f"{r[column]:.3g}" for column in rows.extra]
        table.add_row(*cells)
    return table
