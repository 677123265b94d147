"""Every layer's gradient by its real name, cheaply: statistics and anomaly checks.

Statistics are computed by the private gradient engine (``_grad_engine.py``) from a few
per-tensor *primitives* (sum of squares, sum, largest magnitude, count of non-zeros) on the
device, then moved to the host in one transfer. Pooling primitives makes per-module statistics
exact, and reducing them across ranks makes the statistics of sharded (FSDP2 / HSDP DTensor)
parameters those of the full tensor. ``monitor.py`` builds the training monitor on the same engine.

    >>> import layerwise as lw, torch
    >>> net = torch.nn.Linear(2, 1)
    >>> net(torch.tensor([[3.0, 4.0]])).sum().backward()
    >>> lw.grad_stats(net, stats=["norm", "zero_frac"]).to_dict()
    {'weight': {'norm': 5.0, 'zero_frac': 0.0}, 'bias': {'norm': 1.0, 'zero_frac': 0.0}}
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO

import torch
from rich.table import Table
from torch import Tensor, nn

from ._grad_engine import (
    STATS,
    chosen,
    derive,
    gradients,
    local_primitives,
    local_tensors,
    needed,
    pool,
    reduce_shards,
    refuse_complex,
    stat_names,
    to_host,
)
from ._hooks import Hooks
from ._tensors import pick, require_flag, require_module
from ._term import console
from .errors import GradError, NonFiniteGradError, NotFoundError
from .select import Selector, closest

__all__ = ["STATS", "GradCheck", "GradStats", "NonFiniteWatch", "check_grads", "grad_stats", "watch_nonfinite"]


# --------------------------------------------------------------------------- grad_stats


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


def _measure(names: list[str], params: list[nn.Parameter], need: tuple[str, ...], foreach: bool | None,
             compile: bool | None = None) -> tuple[list[int], Tensor]:
    """The indices of the parameters that have a gradient, and their gradients' primitives: a
    (need, len(indices)) float64 block on the host."""
    grads, have = gradients(params)
    grads = local_tensors(grads, pick(names, have))
    prims = local_primitives(*grads, need, foreach, compile)
    reduce_shards(prims)
    if any(block.device.type != "cpu" for block in prims.tensors()):  # a CPU block is already float64 and ours
        prims.load(to_host(prims.tensors()))
    return have, prims.block()


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

    def __init__(self, rows: list[str], columns: dict[str, list[float]], present: list[bool], numel: dict[str, int],
                 stats: tuple[str, ...], no_grad: list[str], dead: list[str], nonfinite: list[str], frozen: set[str],
                 title: str):
        self.stats, self.no_grad, self.dead, self.nonfinite = stats, no_grad, dead, nonfinite
        self._names, self._columns, self._present = rows, columns, present
        self._numel, self._frozen, self._title = numel, frozen, title

    @functools.cached_property
    def _rows(self) -> dict[str, dict[str, float] | None]:
        # Built when first read: a training loop that logs a few values never pays for every dict.
        columns = [self._columns[s] for s in self.stats]
        return {name: dict(zip(self.stats, (c[r] for c in columns))) if self._present[r] else None
                for r, name in enumerate(self._names)}

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
            raise NotFoundError(f"{name!r} is not a row of these statistics{hint}")
        row = self._rows[name]
        return None if row is None else dict(row)

    def __len__(self) -> int:
        return len(self._names)

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
               foreach: bool | None = None, compile: bool | None = None) -> GradStats:
    """Statistics of every layer's gradient, under the parameters' real names.

    ``stats`` are any of ``norm`` (L2), ``mean``, ``std`` (Bessel-corrected, as ``torch.std``),
    ``max_abs`` and ``zero_frac``. With no selector every trainable parameter is reported;
    selectors report exactly what they select, frozen parameters included. A parameter
    whose ``.grad`` is None is reported as such, never skipped. ``by="module"`` pools the
    parameters of each module, and ``by=k`` those sharing their first ``k`` name segments;
    pooled statistics equal those of the concatenated gradients. ``std`` comes from float32
    sums of x and x² (one pass, exact pooling): its relative error grows like 1e-7·(mean/std)²,
    so it means nothing where ``|mean|`` exceeds about 1000 × std (gradients sit near zero mean).

    Each gradient is read as few times as the device allows: on CUDA fused ``torch._foreach_*``
    kernels per dtype, on CPU every statistic of a tensor while it is in cache; norms alone are
    one pass (on CPU a BLAS dot per large tensor; ``foreach`` as in ``clip_grad_norm_``). All
    results reach the host in one transfer. Sparse gradients count their implicit zeros; complex
    ones get ``norm``, ``max_abs`` and ``zero_frac`` of ``|z|`` (``mean``/``std`` are refused by
    name). For sharded parameters (FSDP2 ``fully_shard``, HSDP, DTensor) the statistics are
    those of the full tensors, with one collective: every rank must call this together.

    ``compile`` picks the kernels. On CPU (float32, float64, bfloat16) a small C loop reads each
    gradient once for all statistics, every gradient in one call: on the benchmark model the five
    statistics cost 1.6-2.0 flat norms instead of 2.8-4.5 (norms alone 1.3-1.8 instead of
    1.45-2.0, Python included). Tensor subclasses and negative views keep torch's kernels. By
    default (``None``) it runs where layerwise was installed with it (``setup.py`` builds it where
    a C compiler and Python's headers are; nothing is compiled at run time), else torch's kernels
    do. ``True``
    builds it now if needed, with the system's C compiler (``$CC``, else ``cc``) in about a
    second into ``~/.cache/layerwise`` (or ``$LAYERWISE_CACHE_DIR``), and elsewhere uses
    ``torch.compile`` (Triton on GPUs; inductor's C++ for float16 on CPU) for gradients of at
    least 2^18 elements: seconds per dtype and device on the first call, less from inductor's
    on-disk cache; without a working compiler it raises :class:`MissingExtraError` naming what is
    missing. ``False``: torch's kernels only. Results are the same: counts and ``max_abs``
    exactly, sums within 1e-5 (float32, 16-bit) or 1e-13 (float64) of the sum of their terms'
    magnitudes (the C loop adds in float64 where a float32 sum would overflow; torch's fused
    float32 norm of ``foreach=True`` drifts to 3e-4 on a tensor of 5M elements). Figures:
    ``benchmarks/README.md``.

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
    require_module(model, "grad_stats")
    stats = stat_names(stats)
    require_flag(compile, "compile", "grad_stats", none=True)
    require_flag(foreach, "foreach", "grad_stats", none=True)
    _grouper(by)  # checked before any work
    names, params, memo = chosen(model, selectors)
    layout = memo.get(("layout", by))
    if layout is None:  # what depends on the choice alone, kept with it
        layout = memo[("layout", by)] = _Layout(names, params, by)
    need = needed(stats)
    if "sum" in need:
        refuse_complex(names, [p.grad for p in params], "a signed mean or std")
    have, block = _measure(names, params, need, foreach, compile)
    every = len(have) == len(params)
    if layout.group is None:  # one row per parameter: nothing to pool
        present = [True] * len(names) if every else [p.grad is not None for p in params]
        columns = dict(zip(need, block.tolist()))
        if not every:
            columns = {k: _spread(v, have, len(names)) for k, v in columns.items()}
        numel = layout.sizes
    else:
        group = layout.group if every else layout.group[have]
        values, pooled = pool(dict(zip(need, block)), layout.numel if every else layout.numel[have], group,
                              len(layout.rows))
        columns, numel = {k: v.tolist() for k, v in values.items()}, pooled.tolist()
        present = [False] * len(layout.rows)
        for r in group.tolist():
            present[r] = True
    derived = derive(columns, numel, stats)
    sumsq = columns["sumsq"]
    dead = [s == 0 for s in sumsq]
    finite = [math.isfinite(s) and math.isfinite(m) for s, m in zip(sumsq, columns.get("max_abs", sumsq))]
    rows = layout.rows
    return GradStats(
        rows, derived, present, numel=layout.row_numel, stats=stats,
        no_grad=[] if every else [n for n, p in zip(names, params) if p.grad is None],
        dead=[row for row, ok, d in zip(rows, present, dead) if ok and d],
        nonfinite=[row for row, ok, f in zip(rows, present, finite) if ok and not f],
        frozen=layout.frozen, title=layout.title)


def _spread(values: list[float], at: list[int], count: int) -> list[float]:
    """``values`` at indices ``at`` of ``count`` rows, NaN in the others."""
    out = [math.nan] * count
    for i, v in zip(at, values):
        out[i] = v
    return out


class _Layout:
    """The rows of :func:`grad_stats` for one choice of parameters and one ``by``: built once per choice."""

    def __init__(self, names: list[str], params: list[nn.Parameter], by: str | int):
        group_of = _grouper(by)
        keys = [group_of(n) for n in names]
        self.rows = list(dict.fromkeys(keys))
        self.sizes = [float(p.numel()) for p in params]
        self.numel = torch.tensor(self.sizes, dtype=torch.float64)
        index = {row: r for r, row in enumerate(self.rows)}
        self.group = None if by == "param" else torch.tensor([index[k] for k in keys], dtype=torch.long)
        row_numel: dict[str, int] = defaultdict(int)
        for k, p in zip(keys, params):
            row_numel[k] += p.numel()
        self.row_numel = dict(row_numel)
        self.frozen = {k for k, p in zip(keys, params) if not p.requires_grad}
        self.title = "Gradients" if by == "param" else f"Gradients by {by if isinstance(by, str) else f'depth {by}'}"


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
    require_module(model, "check_grads")
    require_flag(foreach, "foreach", "check_grads", none=True)
    names, params, _ = chosen(model, selectors)
    have, block = _measure(names, params, ("max_abs",), foreach)
    finite = map(math.isfinite, block[0].tolist())
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
        _, block = _measure(pick(self._names, order), pick(self._params, order), ("max_abs",), None)
        finite = list(map(math.isfinite, block[0].tolist()))
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
    require_module(model, "watch_nonfinite")
    names, params, _ = chosen(model, selectors)
    return NonFiniteWatch(list(names), list(params))
