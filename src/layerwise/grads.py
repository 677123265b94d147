"""Every layer's gradient by its real name, cheaply: statistics and anomaly checks.

Statistics are computed from a few per-tensor *primitives* (sum of squares, sum, largest
magnitude, count of non-zeros) with fused kernels on the device, then moved to the host in
one transfer. Pooling primitives makes per-module statistics exact, and summing them across
ranks makes the statistics of sharded (FSDP2 / DTensor) parameters those of the full tensor.
``monitor.py`` builds the training monitor on the same primitives.

    >>> import layerwise as lw, torch
    >>> net = torch.nn.Linear(2, 1)
    >>> net(torch.tensor([[3.0, 4.0]])).sum().backward()
    >>> lw.grad_stats(net, stats=["norm", "zero_frac"]).to_dict()
    {'weight': {'norm': 5.0, 'zero_frac': 0.0}, 'bias': {'norm': 1.0, 'zero_frac': 0.0}}
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO

import torch
import torch.distributed as dist
from rich.table import Table
from torch import Tensor, nn

from ._hooks import Hooks
from ._tensors import pick, use_foreach
from ._term import console
from .errors import GradError, NonFiniteGradError
from .select import Selector, closest, select

__all__ = ["STATS", "GradCheck", "GradStats", "NonFiniteWatch", "check_grads", "grad_stats", "watch_nonfinite"]

#: The statistics :func:`grad_stats` and :class:`GradMonitor` know, in their default order.
STATS = ("norm", "mean", "std", "max_abs", "zero_frac")

# The primitives each statistic is derived from. They pool exactly over tensors, shards and
# modules: max_abs by taking the maximum, the others by summing. max_abs is kept last so that
# the summed ones are one contiguous block of rows.
_PRIMITIVES = ("sumsq", "sum", "nonzero", "max_abs")
_NEEDS = {"norm": {"sumsq"}, "mean": {"sum"}, "std": {"sum", "sumsq"}, "max_abs": {"max_abs"}, "zero_frac": {"nonzero"}}


# --------------------------------------------------------------------------- primitives


def _stat_names(stats: str | Iterable[str]) -> tuple[str, ...]:
    names = tuple(dict.fromkeys((stats,) if isinstance(stats, str) else stats))
    for name in names:
        if name not in STATS:
            near = closest(str(name), STATS, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise GradError(f"unknown statistic {name!r}{hint}. Valid: {', '.join(STATS)}.")
    if not names:
        raise GradError(f"no statistic asked for. Valid: {', '.join(STATS)}.")
    return names


def _needed(stats: Iterable[str], *extra: str) -> tuple[str, ...]:
    """The primitives behind ``stats``, in canonical order; ``sumsq`` always (it decides "dead")."""
    wanted = {"sumsq", *extra}.union(*(_NEEDS[s] for s in stats))
    return tuple(p for p in _PRIMITIVES if p in wanted)


# On CPU torch's foreach ops are a C++ loop over per-tensor kernels, and for these two it calls
# slow ones: on 144 tensors / 9.5 M elements, norm(ord=inf) takes 25 ms where aminmax takes
# 1.5 ms, and norm(ord=0) 8.3 ms where count_nonzero takes 4.6 ms (torch 2.13, 2 cores; rerun by
# benchmarks/bench_grad_stats.py). On CUDA _foreach_norm fuses ord 2 and inf into a few launches
# for all tensors (ord 0 runs per tensor there too).
_LOOP_ON_CPU = {"max_abs", "nonzero"}


def _kernel(primitive: str, xs: list[Tensor], acc: torch.dtype, fused: bool) -> Tensor:
    """One primitive of each tensor in ``xs`` (one device and dtype, none empty), as a 1-D tensor."""
    if primitive == "sumsq":
        norms = torch._foreach_norm(xs, 2, dtype=acc) if fused else [torch.linalg.vector_norm(x, dtype=acc) for x in xs]
        return torch.stack(norms).double().square()
    if primitive == "sum":
        # torch has no fused signed sum; 2·Σrelu(x) − Σ|x| would need a copy of every gradient.
        return torch.stack([x.sum(dtype=acc) for x in xs])
    if primitive == "nonzero":
        return torch.stack(torch._foreach_norm(xs, 0, dtype=acc) if fused else [torch.count_nonzero(x) for x in xs])
    if fused:
        return torch.stack(torch._foreach_norm(xs, math.inf, dtype=acc))
    lo, hi = zip(*(torch.aminmax(x) for x in xs))
    return torch.maximum(torch.stack(hi), torch.stack(lo).neg())


def _unshard(tensors: Sequence[Tensor], names: Sequence[str]) -> tuple[list[Tensor], list[tuple | None]]:
    """Local tensors, and for each the (mesh, sharded mesh dims) its primitives must be reduced over."""
    local: list[Tensor] = [t.detach() for t in tensors]
    shards: list[tuple | None] = [None] * len(local)
    if not (dist.is_available() and dist.is_initialized()):
        return local, shards
    from torch.distributed.tensor import DTensor

    for i, (t, name) in enumerate(zip(local, names)):
        if isinstance(t, DTensor):
            if any(p.is_partial() for p in t.placements):
                raise GradError(f"{name!r} is a DTensor with placements {t.placements}: a Partial one is not reduced "
                                "yet. Compute statistics once the gradients are reduced (after backward).")
            dims = tuple(d for d, p in enumerate(t.placements) if p.is_shard())
            local[i], shards[i] = t.to_local(), ((t.device_mesh, dims) if dims else None)
    return local, shards


@dataclass
class _Prims:
    """Primitives of some tensors: per device, the tensors' indices and a (primitives, tensors) float64 block."""

    needed: tuple[str, ...]
    count: int
    blocks: list[tuple[list[int], Tensor]]

    def tensors(self) -> list[Tensor]:
        return [block for _, block in self.blocks]

    def load(self, blocks: Sequence[Tensor]) -> None:
        self.blocks = [(cols, block) for (cols, _), block in zip(self.blocks, blocks)]

    def values(self) -> dict[str, Tensor]:
        """Primitive name -> (count,) tensor, in the tensors' order (call once the blocks are on the host)."""
        out = torch.full((len(self.needed), self.count), math.nan, dtype=torch.float64)
        for cols, block in self.blocks:
            out[:, cols] = block
        return dict(zip(self.needed, out))


def _primitives(local: Sequence[Tensor], shards: Sequence[tuple | None], needed: tuple[str, ...],
                foreach: bool | None) -> _Prims:
    """The ``needed`` primitives of each tensor, computed and kept on its device.

    Sharded tensors are reduced across their mesh (SUM, and MAX for max_abs) in two collectives
    per mesh. Empty tensors (a rank's empty shard) count as one zero, which leaves every sum
    and maximum unchanged; element counts come from the caller, not from here.
    """
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, (x, shard) in enumerate(zip(local, shards)):
        groups[(x.device, x.dtype, shard)].append(i)
    blocks: dict[tuple, Tensor] = {}
    for key, idx in groups.items():
        device, dtype, _ = key
        xs = [x if x.numel() else x.new_zeros(1) for x in pick(local, idx)]
        acc, fused = torch.promote_types(dtype, torch.float32), use_foreach(xs, device, foreach)
        default_cpu = foreach is None and device.type == "cpu"
        blocks[key] = torch.stack([_kernel(p, xs, acc, fused and not (default_cpu and p in _LOOP_ON_CPU)).double()
                                   for p in needed])

    by_mesh: dict[tuple, list[tuple]] = defaultdict(list)
    for key in blocks:
        if key[2] is not None:
            by_mesh[key[2]].append(key)
    n_sum = len(needed) - ("max_abs" in needed)
    for (mesh, dims), keys in by_mesh.items():
        for op, rows in ((dist.ReduceOp.SUM, slice(0, n_sum)), (dist.ReduceOp.MAX, slice(n_sum, None))):
            parts = [blocks[k][rows] for k in keys]
            if parts[0].shape[0] == 0:
                continue
            flat = torch.cat(parts, dim=1)
            for d in dims:
                dist.all_reduce(flat, op=op, group=mesh.get_group(d))
            for k, part in zip(keys, flat.split([p.shape[1] for p in parts], dim=1)):
                blocks[k][rows] = part

    per_device: dict[torch.device, tuple[list[int], list[Tensor]]] = defaultdict(lambda: ([], []))
    for key, idx in groups.items():
        cols, parts = per_device[key[0]]
        cols += idx
        parts.append(blocks[key])
    return _Prims(needed, len(local), [(cols, torch.cat(parts, dim=1)) for cols, parts in per_device.values()])


def _to_host(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Copy small tensors to the host as float64, with one transfer per device."""
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        by_device[t.device].append(i)
    out: list[Tensor] = [torch.empty(0)] * len(tensors)
    for idx in by_device.values():
        flat = torch.cat([tensors[i].reshape(-1).double() for i in idx]).cpu()
        for i, part in zip(idx, flat.split([tensors[i].numel() for i in idx])):
            out[i] = part.view(tensors[i].shape)
    return out


def _unscale(values: dict[str, Tensor], scale: Tensor | None) -> None:
    if scale is not None:
        for name, power in (("sum", 1), ("sumsq", 2), ("max_abs", 1)):
            if name in values:
                values[name] = values[name] / scale ** power


def _derive(values: dict[str, Tensor], numel: Tensor, stats: Sequence[str]) -> dict[str, Tensor]:
    """Statistics from primitives; ``std`` with Bessel's correction, like ``torch.std``."""
    out = {}
    for stat in stats:
        if stat == "norm":
            out[stat] = values["sumsq"].sqrt()
        elif stat == "mean":
            out[stat] = values["sum"] / numel
        elif stat == "std":
            var = (values["sumsq"] - values["sum"].square() / numel).clamp_min(0) / (numel - 1)
            out[stat] = torch.where(numel > 1, var.sqrt(), math.nan)
        elif stat == "max_abs":
            out[stat] = values["max_abs"]
        else:
            out[stat] = 1 - values["nonzero"] / numel
    return out


def _pool(values: dict[str, Tensor], numel: Tensor, group: Tensor, count: int) -> tuple[dict[str, Tensor], Tensor]:
    pooled = {}
    for name, v in values.items():
        if name == "max_abs":
            pooled[name] = torch.zeros(count, dtype=v.dtype).scatter_reduce(0, group, v, "amax", include_self=False)
        else:
            pooled[name] = torch.zeros(count, dtype=v.dtype).index_add(0, group, v)
    return pooled, torch.zeros(count, dtype=numel.dtype).index_add(0, group, numel)


# --------------------------------------------------------------------------- grad_stats


def _chosen(model: nn.Module, selectors: Sequence[Selector]) -> tuple[list[str], list[nn.Parameter]]:
    """The parameters to look at: those selected, or with no selector every trainable one."""
    pairs = [(n, p) for n, p in select(model, *selectors) if selectors or p.requires_grad]
    return [n for n, _ in pairs], [p for _, p in pairs]


def _grouper(by: str | int) -> Callable[[str], str]:
    if by == "param":
        return lambda name: name
    if by == "module":
        # A parameter at the root of the model has no owning module path; it is its own group.
        return lambda name: name.rpartition(".")[0] or name
    if isinstance(by, int) and not isinstance(by, bool) and by >= 1:
        return lambda name: ".".join(name.split(".")[:by])
    raise GradError(f"by={by!r}: group by 'param', 'module', or a depth k >= 1 (the first k name segments, "
                    "e.g. by=3 groups 'encoder.layers.0.attn.weight' under 'encoder.layers.0').")


class GradStats:
    """Gradient statistics per parameter or group, as :func:`grad_stats` returns them.

    Iterating yields ``(name, stats)`` in model order, where ``stats`` maps each statistic to a
    float, or is None for a row without gradient (its parameters are listed in ``no_grad``).
    ``dead`` lists the rows whose gradient is entirely zero, ``nonfinite`` those holding NaN or
    inf. ``print()`` renders the table.

    Example:
        >>> import layerwise as lw, torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.Linear(2, 1))
        >>> net[0](torch.zeros(1, 2)).sum().backward()
        >>> result = lw.grad_stats(net, stats="max_abs")
        >>> list(result)
        [('0.weight', {'max_abs': 0.0}), ('0.bias', {'max_abs': 1.0}), ('1.weight', None), ('1.bias', None)]
        >>> result.dead, result.no_grad
        (['0.weight'], ['1.weight', '1.bias'])
    """

    def __init__(self, rows: dict[str, dict[str, float] | None], numel: dict[str, int], stats: tuple[str, ...],
                 no_grad: list[str], dead: list[str], nonfinite: list[str], frozen: set[str], title: str):
        self.stats, self.no_grad, self.dead, self.nonfinite = stats, no_grad, dead, nonfinite
        self._rows, self._numel, self._frozen, self._title = rows, numel, frozen, title

    def to_dict(self) -> dict[str, dict[str, float] | None]:
        """Name -> statistic -> float (None for no gradient), in model order."""
        return {name: None if row is None else dict(row) for name, row in self._rows.items()}

    def print(self, file: IO[str] | None = None) -> None:
        """Print the table to ``file`` (default: standard output)."""
        console(file).print(self)

    def __iter__(self) -> Iterator[tuple[str, dict[str, float] | None]]:
        return iter(self.to_dict().items())

    def __getitem__(self, name: str) -> dict[str, float] | None:
        if name not in self._rows:
            near = closest(name, list(self._rows))
            hint = f"; closest: {', '.join(near)}" if near else ""
            raise KeyError(f"{name!r} is not a row of these statistics{hint}")
        row = self._rows[name]
        return None if row is None else dict(row)

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        return (f"GradStats({len(self)} rows, stats={list(self.stats)}, {len(self.no_grad)} without gradient, "
                f"{len(self.dead)} dead)")

    def __rich__(self) -> Table:
        table = Table(title=f"{self._title}: {len(self)} rows · {len(self.no_grad)} parameters without gradient · "
                      f"{len(self.dead)} dead", title_justify="left")
        table.add_column("name")
        table.add_column("numel", justify="right")
        for stat in self.stats:
            table.add_column(stat, justify="right")
        table.add_column("")
        for name, row in self._rows.items():
            if row is None:
                note = "[blue]frozen[/]" if name in self._frozen else "[yellow]no grad[/]"
                table.add_row(name, f"{self._numel[name]:,}", *("-" for _ in self.stats), note)
                continue
            cells = [f"{row[s]:.1%}" if s == "zero_frac" else f"{row[s]:.3g}" for s in self.stats]
            note = "[red]non-finite[/]" if name in self.nonfinite else "[red]dead[/]" if name in self.dead else ""
            table.add_row(name, f"{self._numel[name]:,}", *cells, note)
        return table


@torch.no_grad()
def grad_stats(model: nn.Module, *selectors: Selector, stats: str | Iterable[str] = STATS, by: str | int = "param",
               foreach: bool | None = None) -> GradStats:
    """Statistics of every layer's gradient, under the parameters' real names.

    ``stats`` are any of ``norm`` (L2), ``mean``, ``std`` (Bessel-corrected, as ``torch.std``),
    ``max_abs`` and ``zero_frac``. With no selector every trainable parameter is reported;
    selectors report exactly what they select, frozen parameters included. A parameter
    whose ``.grad`` is None is reported as such, never skipped. ``by="module"`` pools the
    parameters of each module, and ``by=k`` those sharing their first ``k`` name segments;
    pooled statistics equal those of the concatenated gradients. ``std`` comes from float32
    sums of x and x² (one pass, exact pooling): its relative error grows like 1e-7·(mean/std)²,
    so it means nothing where ``|mean|`` exceeds about 1000 × std (gradients sit near zero mean).

    Each primitive is one fused ``torch._foreach_*`` kernel per device and dtype (``foreach``
    as in ``torch.nn.utils.clip_grad_norm_``; on CPU max_abs and zero_frac default to faster
    per-tensor kernels, and torch has no fused signed sum), and all results reach the host in
    one transfer. For sharded parameters (FSDP2 ``fully_shard``, DTensor) the statistics are
    those of the full tensors: every rank must call this together.

    Example:
        >>> import layerwise as lw, torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> net[0].requires_grad_(False)  # doctest: +ELLIPSIS
        Linear(...)
        >>> net(torch.ones(1, 2)).sum().backward()
        >>> lw.grad_stats(net).to_dict().keys()
        dict_keys(['1.weight', '1.bias'])
        >>> lw.grad_stats(net, "**", stats="norm", by="module")["0"] is None
        True
    """
    stats = _stat_names(stats)
    group_of = _grouper(by)
    names, params = _chosen(model, selectors)
    have = [i for i, p in enumerate(params) if p.grad is not None]
    local, shards = _unshard([params[i].grad for i in have], pick(names, have))
    prims = _primitives(local, shards, _needed(stats), foreach)
    prims.load(_to_host(prims.tensors()))

    rows = list(dict.fromkeys(group_of(n) for n in names))
    index = {row: r for r, row in enumerate(rows)}
    group = torch.tensor([index[group_of(names[i])] for i in have], dtype=torch.long)
    numel = torch.tensor([float(params[i].numel()) for i in have], dtype=torch.float64)
    pooled, pooled_numel = _pool(prims.values(), numel, group, len(rows))
    derived = {s: v.tolist() for s, v in _derive(pooled, pooled_numel, stats).items()}
    dead = (pooled["sumsq"] == 0).tolist()
    finite = (pooled["sumsq"].isfinite() & pooled.get("max_abs", pooled["sumsq"]).isfinite()).tolist()
    present = set(group.tolist())

    numels: dict[str, int] = defaultdict(int)
    for n, p in zip(names, params):
        numels[group_of(n)] += p.numel()
    return GradStats(
        rows={row: {s: derived[s][r] for s in stats} if r in present else None for r, row in enumerate(rows)},
        numel=dict(numels), stats=stats,
        no_grad=[n for n, p in zip(names, params) if p.grad is None],
        dead=[row for r, row in enumerate(rows) if r in present and dead[r]],
        nonfinite=[row for r, row in enumerate(rows) if r in present and not finite[r]],
        frozen={group_of(n) for n, p in zip(names, params) if not p.requires_grad},
        title="Gradients" if by == "param" else f"Gradients by {by if isinstance(by, str) else f'depth {by}'}")


# --------------------------------------------------------------------------- anomaly checks


@dataclass(frozen=True)
class GradCheck:
    """What :func:`check_grads` found: parameters with a NaN/inf gradient, and trainable ones without gradient.

    Example:
        >>> import layerwise as lw, torch
        >>> net = torch.nn.Linear(2, 1)
        >>> print(lw.check_grads(net))
        no gradient: weight, bias
    """

    nonfinite: list[str]
    no_grad: list[str]

    @property
    def ok(self) -> bool:
        """True when every checked parameter has a gradient, and a finite one."""
        return not self.nonfinite and not self.no_grad

    def __str__(self) -> str:
        found = [f"{what}: {', '.join(names)}" for what, names in
                 (("non-finite gradient", self.nonfinite), ("no gradient", self.no_grad)) if names]
        return "; ".join(found) or "every gradient is present and finite"


@torch.no_grad()
def check_grads(model: nn.Module, *selectors: Selector, foreach: bool | None = None) -> GradCheck:
    """Name every parameter whose gradient holds NaN or inf, and every one that received none.

    One fused pass over the gradients and one transfer to the host. Parameters are chosen as
    by :func:`grad_stats`: every trainable one, or exactly those the selectors select. With
    sharded parameters every rank must call it (it all-reduces).

    Example:
        >>> import layerwise as lw, torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> net[1](torch.tensor([[1.0, float("nan")]])).sum().backward()
        >>> result = lw.check_grads(net)
        >>> result.ok, result.nonfinite, result.no_grad
        (False, ['1.weight'], ['0.weight', '0.bias'])
    """
    names, params = _chosen(model, selectors)
    have = [i for i, p in enumerate(params) if p.grad is not None]
    local, shards = _unshard([params[i].grad for i in have], pick(names, have))
    prims = _primitives(local, shards, ("max_abs",), foreach)
    prims.load(_to_host(prims.tensors()))
    finite = prims.values()["max_abs"].isfinite().tolist()
    return GradCheck(nonfinite=[names[i] for i, ok in zip(have, finite) if not ok],
                     no_grad=[names[i] for i, p in enumerate(params) if p.grad is None])


class NonFiniteWatch(Hooks):
    """The handle :func:`watch_nonfinite` returns: ``remove()`` it (any number of times), or use it in ``with``.

    Example:
        >>> import layerwise as lw, torch
        >>> net = torch.nn.Linear(2, 1)
        >>> with lw.watch_nonfinite(net) as watch:
        ...     net(torch.ones(1, 2)).sum().backward()  # finite: nothing happens
        >>> watch.remove()  # already removed by `with`; harmless
    """

    def __init__(self, names: list[str], params: list[nn.Parameter]):
        self._names, self._params = names, params
        self._task = -1
        self._order: list[int] = []
        super().__init__(p.register_post_accumulate_grad_hook(lambda _, i=i: self._ready(i))
                         for i, p in enumerate(params) if p.requires_grad)

    def _ready(self, i: int) -> None:
        # Hooks only note the order in which gradients arrive; one check runs at the end of backward.
        task = torch._C._current_graph_task_id()
        if task != self._task:
            self._task, self._order = task, []
            torch.autograd.Variable._execution_engine.queue_callback(self._check)
        self._order.append(i)

    @torch.no_grad()
    def _check(self) -> None:
        order, self._order = self._order, []
        local, shards = _unshard([self._params[i].grad for i in order], pick(self._names, order))
        prims = _primitives(local, shards, ("max_abs",), None)
        prims.load(_to_host(prims.tensors()))
        finite = prims.values()["max_abs"].isfinite().tolist()
        bad = [self._names[i] for i, ok in zip(order, finite) if not ok]
        if bad:
            then = f" (then, in backward order: {', '.join(bad[1:])})" if bad[1:] else ""
            raise NonFiniteGradError(
                f"the gradient of {bad[0]!r} holds NaN or inf: it is the first parameter, in backward order, to go "
                f"non-finite{then}. Look for log, sqrt, division or exp overflow in that layer's forward, or for a "
                "learning rate large enough to blow the weights up.", bad)


def watch_nonfinite(model: nn.Module, *selectors: Selector) -> NonFiniteWatch:
    """Raise during ``backward()`` naming the first parameter whose gradient became NaN or inf.

    "First" is in the order gradients arrive in backward, so it points at the layer where the
    NaN/inf arises rather than the many layers it then spreads to (under FSDP2: the order of
    the sharded groups' gradient reductions). The cost is a Python call per parameter, and
    one pass over the gradients with one host sync per backward, far below
    ``torch.autograd.detect_anomaly``. Parameters are chosen as by :func:`grad_stats`.
    Returns a handle to ``remove()``, also a context manager.

    Example:
        >>> import layerwise as lw, torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.Linear(1, 1))
        >>> watch = lw.watch_nonfinite(net)
        >>> try:  # a NaN input: the last layer's weight gradient is the first to hold NaN
        ...     net(torch.tensor([[float("nan")]])).sum().backward()
        ... except lw.NonFiniteGradError as e:
        ...     print(e.names)
        ['1.weight', '0.weight']
        >>> watch.remove()
    """
    return NonFiniteWatch(*_chosen(model, selectors))
