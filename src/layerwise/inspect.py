"""The per-layer table of a model: shapes, trainable or frozen, sharing, optimizer group, lr, weight decay,
rolled up to modules at any depth."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import IO, Any

import torch
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.segment import Segment
from rich.table import Table
from rich.text import Text
from torch import nn

from ._tensors import require_flag
from ._term import console, require_stream
from .audit import audit as audit_setup
from .errors import OptionError, OptionTypeError
from .groups import group_index
from .select import Selector, Walk, resolve

__all__ = ["show"]

_INDENT = "  "  # values under their name, in the narrow layout
_FROZEN_NOTE = "frozen rows get no gradient: their group's lr and weight decay do not apply to them"


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
    except Exception as e:  # the inputs do not fit the model; its own error stays chained
        raise OptionError(f"show(inputs=...): {type(model).__name__}'s forward failed on them "
                          f"({type(e).__name__}: {e}); pass what model(inputs) takes, a tuple for several "
                          "arguments") from e
    finally:
        for h in handles:
            h.remove()
        for m, mode in zip(modules, modes):
            m.training = mode
    return calls


class LayerTable(list):
    """The rows of :func:`show`: a plain list of dicts that also renders as its rich table.

    ``trainable`` and ``total`` count the selected parameters (a shared one once), ``depth`` is
    the roll-up depth (None: one row per parameter), ``empty`` says why there is no row.
    """

    def __init__(self, rows: Sequence[dict[str, Any]], title: str, trainable: int, total: int,
                 extra: Sequence[str] = (), depth: int | None = None, empty: str = ""):
        super().__init__(rows)
        self.title, self.trainable, self.total, self.extra = title, trainable, total, tuple(extra)
        self.depth, self.empty = depth, empty

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        frozen = self.total - self.trainable
        yield Text(f"{self.title}: trainable {self.trainable:,} · frozen {frozen:,} · total {self.total:,} "
                   "parameters (shared ones counted once)")
        if not self:
            yield Text(self.empty, style="yellow")
            return
        headers, cells = _columns(self)
        notes = [_FROZEN_NOTE] if any(not r["trainable"] and r.get("group") is not None for r in self) else []
        wide = _table(["name", *headers], [[r["name"], *c] for r, c in zip(self, cells)])
        # Measured without the console's limit (Measurement.get clamps to it).
        if Measurement.get(console, options.update(max_width=1 << 20), wide).maximum <= options.max_width:
            yield wide
        else:  # too narrow for full names beside the values: each name on a line of its own, above its values
            if "dtype" in headers and len({r["dtype"] for r in self}) == 1:  # one dtype: said once, below
                at = headers.index("dtype")
                notes.insert(0, f"every tensor is {self[0]['dtype']}")
                headers, cells = headers[:at] + headers[at + 1:], [c[:at] + c[at + 1:] for c in cells]
            values = _table([h.replace(" ", "\n") for h in headers], cells, box=None, collapse_padding=True,
                            pad_edge=False)
            lines = console.render_lines(values, options.update_width(options.max_width - len(_INDENT)), pad=False)
            heading = len(lines) - len(cells)  # values never wrap: one line per row, after the header's
            for line in lines[:heading]:
                yield from (Segment(_INDENT), *line, Segment.line())
            for row, line in zip(self, lines[heading:]):
                yield from console.render(Text(row["name"], style="bold", overflow="fold"), options)
                yield from (Segment(_INDENT), *line, Segment.line())
        yield from (Text(note, style="dim") for note in notes)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], **options: Any) -> Table:
    table = Table(**options)
    for i, header in enumerate(headers):
        # Values are never cut; headers wrap instead (they are words).
        table.add_column(header, justify="left" if i == 0 or header in ("shape", "dtype", "shared with") else "right",
                         no_wrap=True)
    for row in rows:
        table.add_row(*row)
    return table


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _columns(rows: LayerTable) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of every column but the name."""
    first = rows[0]
    if rows.depth is not None:
        headers = ["tensors", "numel", "trainable"]
        cells = [[str(r["tensors"]), f"{r['numel']:,}",
                  "[green]all[/]" if r["trainable"] == 1 else "[blue]frozen[/]" if r["trainable"] == 0
                  else f"{r['trainable']:.0%}"] for r in rows]
        if "lr_min" in first:
            headers.append("lr")
            for r, c in zip(rows, cells):
                low, high = r["lr_min"], r["lr_max"]
                c.append("-" if low is None else f"{low:.3g}" if low == high else f"{low:.3g}–{high:.3g}")
    else:
        headers = ["shape", "numel", "dtype", "trainable"]
        cells = [["×".join(map(str, r["shape"])) or "scalar", f"{r['numel']:,}", r["dtype"],
                  "[green]yes[/]" if r["trainable"] else "[red]frozen, stale .grad[/]" if r["stale_grad"]
                  else "[blue]frozen[/]"] for r in rows]
        if any(r["shared_with"] for r in rows):
            headers.append("shared with")
            for r, c in zip(rows, cells):
                c.append(", ".join(r["shared_with"]))
        if "calls" in first:
            headers.append("calls / forward")
            for r, c in zip(rows, cells):
                c.append(f"[bold]{r['calls']}[/]" if r["calls"] > 1 else str(r["calls"]))
        if "group" in first:
            headers += ["group", "lr", "weight decay"]
            for r, c in zip(rows, cells):
                if r["group"] is None:
                    c += ["[red]not in optimizer[/]" if r["trainable"] else "-", "", ""]
                else:
                    c += [str(r["group"]), _number(r["lr"]), "" if r["weight_decay"] is None else _number(r["weight_decay"])]
    for column in rows.extra:
        headers.append(column.replace("_", " "))
        for r, c in zip(rows, cells):
            c.append(_number(r[column]))
    return headers, cells


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


def _module_at(name: str, depth: int) -> str:
    """The module ``depth`` levels deep that holds parameter ``name`` (the parameter itself when shallower)."""
    path = name.split(".")
    return ".".join(path[:depth]) if len(path) > depth else name.rpartition(".")[0] or name


def _rollup(rows: list[dict[str, Any]], depth: int, extra: Sequence[str]) -> list[dict[str, Any]]:
    """One row per module ``depth`` levels deep: counts, trainable share, lr range, pooled gradient norms."""
    pooled: dict[str, dict[str, Any]] = {}
    for r in rows:
        m = pooled.setdefault(_module_at(r["name"], depth),
                              {"tensors": 0, "numel": 0, "trainable_numel": 0, "lrs": [], "squares": {}})
        m["tensors"] += 1
        m["numel"] += r["numel"]
        m["trainable_numel"] += r["numel"] if r["trainable"] else 0
        if r.get("lr") is not None and r["trainable"]:
            m["lrs"].append(r["lr"])
        for column in extra:
            if r[column] is not None:
                m["squares"][column] = m["squares"].get(column, 0.0) + r[column] ** 2
    out = []
    for name, m in pooled.items():
        row: dict[str, Any] = {"name": name, "tensors": m["tensors"], "numel": m["numel"],
                               "trainable": m["trainable_numel"] / m["numel"] if m["numel"] else 0.0}
        if rows and "group" in rows[0]:
            row.update(lr_min=min(m["lrs"], default=None), lr_max=max(m["lrs"], default=None))
        for column in extra:  # the norm of the module's parameters taken as one vector
            row[column] = math.sqrt(m["squares"][column]) if column in m["squares"] else None
        out.append(row)
    return out


def _check_show_options(file: Any, monitor: Any, ema: Any, **flags: Any) -> None:
    """The keyword options of :func:`show` are what they say, before anything runs or prints."""
    for name, value in flags.items():
        require_flag(value, name, "show")
    require_stream(file, "show")
    if monitor is not None:
        from .monitor import GradMonitor
        if not isinstance(monitor, GradMonitor):
            raise OptionTypeError(f"show: monitor= takes a layerwise.GradMonitor, got {type(monitor).__name__}")
    if ema is not None:
        from .ema import EMA
        if not isinstance(ema, EMA):
            raise OptionTypeError(f"show: ema= takes a layerwise.EMA, got {type(ema).__name__}")


def show(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *selectors: Selector,
         inputs: Any = None, monitor: Any = None, ema: Any = None, trainable_only: bool = False,
         depth: int | None = None, file: IO[str] | None = None, quiet: bool = False,
         audit: bool = False, scheduler: Any = None) -> LayerTable:
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

    Selectors choose the rows and the totals count what they chose, a shared parameter once;
    ``trainable_only=True`` (an adapter's weights among a frozen base model) hides frozen rows.
    ``depth=k`` rolls the rows up to the modules ``k`` levels deep: tensors, numel, trainable
    share, the lr range of the trainable ones and the gradient norm of the module's parameters
    pooled (√Σ‖g‖²). Names are never cut: where the values leave too little room, each name is
    printed on a line of its own above them.

    ``audit=True`` (with an ``optimizer``, and its LR ``scheduler`` if any) prints what
    :func:`~layerwise.audit` finds in the set-up under the table; the result's ``findings`` holds them.

    Example:
        >>> import layerwise as lw, torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        >>> net[0].requires_grad_(False)  # doctest: +ELLIPSIS
        Linear(...)
        >>> opt = torch.optim.SGD([net[1].weight, net[1].bias], lr=0.1)
        >>> rows = lw.show(net, opt, quiet=True)
        >>> [(r["name"], r["trainable"], r["lr"]) for r in rows]
        [('0.weight', False, None), ('0.bias', False, None), ('1.weight', True, 0.1), ('1.bias', True, 0.1)]
        >>> [(r["name"], r["numel"], r["trainable"]) for r in lw.show(net, depth=1, quiet=True)]
        [('0', 20, 0.0), ('1', 10, 1.0)]
    """
    if optimizer is not None and not hasattr(optimizer, "param_groups"):
        selectors, optimizer = (optimizer, *selectors), None  # show(model, "encoder"): a selector, no optimizer
    _check_show_options(file, monitor, ema, quiet=quiet, trainable_only=trainable_only, audit=audit)
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int)):
        raise OptionTypeError(f"depth={depth!r}: pass an integer number of module levels (depth=1: top modules).")
    if depth is not None and depth < 1:
        raise OptionError(f"depth={depth}: roll up to modules at least 1 level deep, or pass depth=None for "
                          "one row per parameter.")
    walk = Walk(model)  # one walk: the rows and the modules that own them
    chosen = resolve(walk, *selectors).selection()
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

    trainable = sum(r["numel"] for r in rows if r["trainable"])
    total = chosen.numel()
    if trainable_only:
        rows = [r for r in rows if r["trainable"]]
    empty = "no parameter selected" if not len(chosen) else \
        f"no trainable parameter among the {len(chosen)}{' selected' if selectors else ''} tensors: all are frozen"
    if depth is not None:
        extra = {c: v for c, v in extra.items() if c.startswith("grad_norm")}  # ratios do not pool
        rows = _rollup(rows, depth, list(extra))
    if audit and optimizer is None:
        raise OptionError("show(..., audit=True) audits a model with its optimizer: pass the optimizer too")
    table = LayerTable(rows, type(model).__name__, trainable, total, extra, depth, empty)
    table.findings = audit_setup(model, optimizer, scheduler) if audit else None
    out = console(file, quiet=quiet)
    out.print(table)
    if table.findings is not None:
        out.print(table.findings)
    return table
