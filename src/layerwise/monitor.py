"""GradMonitor: per-layer gradient statistics through training, written to sinks, plotted.

Built on the primitives of ``grads.py``: between log steps the monitor costs a counter
increment; on a log step it measures on the device and moves results to the host in one
transfer, only when a sink writes, a non-finite check needs them, or they are asked for.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import _pages
from ._grad_engine import (
    STATS,
    Prims,
    chosen,
    copy_primitives,
    derive,
    distance_primitives,
    gradients,
    histogram,
    local_primitives,
    local_tensors,
    needed,
    reduce_shards,
    refuse_complex,
    stat_names,
    to_host,
    unscale,
)
from ._tensors import laid_out_alike, pick, require_flag, require_int, require_module
from .errors import GradError, NonFiniteGradError, OptionError, OptionTypeError
from .select import Selector, select
from .sinks import Histogram, Sink, checked_sinks, plot_grad_norms, writable_file

__all__ = ["GradMonitor"]

_BINS = 64  # TensorBoard histogram buckets
_MAX_PENDING = 64  # log steps a GradMonitor keeps on the device before moving them to the host


# --------------------------------------------------------------------------- the monitor


@dataclass
class _Record:
    """One log step, on the device until a transfer moves it to the host."""

    step: int
    have: Sequence[int]  # indices of the monitored parameters that had a gradient
    grad: Prims
    weight: Prims
    hist: list[Tensor]
    scale: Tensor | None  # the GradScaler scale the gradients still carry
    delta: Prims | None = None  # ‖Δw‖² across the optimizer step

    def _parts(self) -> list[list[Tensor]]:
        return [self.grad.tensors(), self.weight.tensors(), self.delta.tensors() if self.delta else [], self.hist,
                [] if self.scale is None else [self.scale]]

    def tensors(self) -> list[Tensor]:
        return [t for part in self._parts() for t in part]

    def load(self, host: list[Tensor]) -> None:
        """Put back what :meth:`tensors` gave, once moved to the host."""
        rest = iter(host)
        grad, weight, delta, self.hist, scale = ([next(rest) for _ in part] for part in self._parts())
        self.grad.load(grad)
        self.weight.load(weight)
        if self.delta:
            self.delta.load(delta)
        self.scale = scale[0] if scale else None


class GradMonitor:
    """Per-layer gradient statistics through training, with no host sync between log steps.

    Every ``every``-th step (the first included) the monitor computes, on the device, the
    ``stats`` of each layer's gradient (columns ``grad_<stat>``), its weight norm, with an
    ``optimizer`` the update-to-weight ratio ‖Δw‖/‖w‖ across the step, and ``dead`` (gradient
    entirely zero). Other steps cost one counter increment. Measurements stay on the device
    and reach the host in batches, one transfer each: when the oldest is ``flush_every`` steps
    old, at :meth:`flush` / :attr:`history` / :meth:`remove`; the sinks then get every log step
    in order. The one per-step exception is ``on_nonfinite="raise"`` (the default): to stop
    the optimizer step it reads one flag per log step (a host sync on CUDA); "warn" and
    "ignore" never wait for the device. Under ``torch.distributed`` every rank computes (one
    collective per log step for sharded parameters) and rank 0 writes.

    Steps: given an ``optimizer`` the monitor hooks its ``step()``, so it counts optimizer
    steps and gradient accumulation logs once per step; ``step(closure)`` (Lightning, LBFGS)
    is measured after the closure's backward. Without an optimizer, call :meth:`step` after
    each ``backward()``. ``on_nonfinite`` ("raise", "warn", "ignore") acts on a log step whose
    gradients hold NaN/inf, naming the layers and the step: "raise" before the optimizer
    updates the weights, "warn" when the step reaches the host. The measurement of Δw copies
    the monitored weights on log steps.

    Sparse gradients (``Embedding(sparse=True)``) are measured by their stored values, the
    implicit zeros counted. Complex gradients get ``norm``, ``max_abs`` (of ``|z|``) and
    ``zero_frac``; asking for ``mean`` or ``std`` of one is refused by name.

    Mixed precision: with an ``optimizer``, call ``scaler.step(optimizer)`` as usual. The hooks
    run inside it once the gradients are unscaled; a step the scaler skips for inf/NaN never
    reaches them and is not counted. (A fused optimizer gets still-scaled gradients and skips
    such steps itself: the monitor divides by the scale, counts the step and only records its
    non-finite gradients.) Without an optimizer, call :meth:`step` after ``scaler.unscale_``,
    or pass ``scaler=`` and call it right after ``backward()``: the statistics are then divided
    by the scale on the device, and non-finite gradients only recorded (the scaler skips those steps).

    Sharded parameters (FSDP2 ``fully_shard``, HSDP, DTensor) get the statistics of the full tensors.
    ``compile`` as in :func:`grad_stats`: native CPU kernels (by default where installed with layerwise) read the
    gradients, copy the weight snapshot and measure ‖Δw‖ in one pass each.

    Example:
        >>> import layerwise as lw, torch
        >>> net = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> with lw.GradMonitor(net, every=2, stats=["norm"], optimizer=opt) as monitor:
        ...     for _ in range(3):
        ...         opt.zero_grad()
        ...         net(torch.tensor([[3.0, 4.0]])).sum().backward()
        ...         opt.step()
        >>> [(row["step"], row["layer"], row["grad_norm"]) for row in monitor.history]
        [(0, 'weight', 5.0), (0, 'bias', 1.0), (2, 'weight', 5.0), (2, 'bias', 1.0)]
    """

    def __init__(self, model: nn.Module, *selectors: Selector, every: int = 50, stats: str | Iterable[str] = STATS,
                 sinks: Sequence[Sink] = (), optimizer: torch.optim.Optimizer | None = None,
                 on_nonfinite: str = "raise", scaler: torch.amp.GradScaler | None = None, foreach: bool | None = None,
                 flush_every: int = 50, compile: bool | None = None):
        require_module(model, "GradMonitor")
        for option, value in (("every", every), ("flush_every", flush_every)):
            require_int(value, option, "GradMonitor", 1, "every n-th step")
        require_flag(compile, "compile", "GradMonitor", none=True)
        require_flag(foreach, "foreach", "GradMonitor", none=True)
        if on_nonfinite not in ("raise", "warn", "ignore"):
            raise OptionError(f"on_nonfinite={on_nonfinite!r}: use 'raise', 'warn' or 'ignore'.")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):  # not at the first log step
            raise OptionTypeError(f"optimizer={optimizer!r:.80}: pass the torch.optim.Optimizer whose steps to count")
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise OptionTypeError(f"scaler={scaler!r:.80}: pass the torch.amp.GradScaler that scales the loss")
        sinks = checked_sinks(sinks)
        if optimizer is not None and scaler is not None:
            raise GradError("pass scaler= only without optimizer=: with an optimizer the monitor runs inside "
                            "scaler.step(optimizer), where it finds the gradients unscaled.")
        names, params, _ = chosen(model, selectors)
        self.names, self._params = list(names), list(params)
        if not self._params:
            raise GradError(f"nothing to monitor: {type(model).__name__} has no trainable parameter. "
                            "Select frozen ones explicitly to watch them anyway.")
        self.stats = stat_names(stats)
        self.every, self.optimizer, self.scaler, self.foreach = every, optimizer, scaler, foreach
        self.flush_every, self.compile = flush_every, compile
        self.on_nonfinite = on_nonfinite
        self.sinks: tuple[Sink, ...] = tuple(sinks)
        self.steps = 0
        self._model = model
        self._with_histograms = any(getattr(s, "histograms", False) for s in self.sinks)
        if self._with_histograms and any(local_tensors(self._params, self.names)[1]):
            raise GradError("gradient histograms of sharded (DTensor) parameters are not supported: "
                            "use TensorBoardSink(histograms=False), or select unsharded parameters.")
        self._needed = needed(self.stats, *(("max_abs",) if on_nonfinite == "warn" else ()),  # "raise": see _measure
                              *(("sum",) if self._with_histograms else ()))
        if "sum" in self._needed:
            refuse_complex(self.names, self._params, "a signed mean, std or histogram")
        self._pending: list[_Record] = []  # measured, still on the device
        self._done: list[_Record] = []  # on the host: rows are built when asked for, to keep memory small
        self._current: _Record | None = None
        self._snapshot: list[Tensor] | None = None  # the weights before the optimizer step
        self._weight: Prims | None = None  # their norms, measured while copying them
        self._buffers: list[Tensor] | None = None  # snapshots' memory, kept at every=1
        self._handles = [] if optimizer is None else [optimizer.register_step_pre_hook(self._before_step),
                                                      optimizer.register_step_post_hook(self._after_step)]

    # -- counting steps

    def step(self) -> None:
        """Count one step without an optimizer (call it after ``backward()``); on log steps, measure."""
        if self.optimizer is not None:
            raise GradError("this monitor counts optimizer steps through hooks on optimizer.step(); "
                            "do not also call monitor.step().")
        if self.steps % self.every == 0:
            scaled = self.scaler is not None and self.scaler.is_enabled()
            # The public get_scale() syncs with the host; the scale tensor itself does not.
            self._finish(self._measure(self.scaler._get_scale_async() if scaled else None, scaled))
        self.steps += 1

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> tuple | None:
        if self.steps % self.every:
            return None
        # Inside scaler.step(), a fused optimizer gets still-scaled gradients, the scale in
        # `grad_scale`, and `found_inf`: it then skips a non-finite step by itself.
        scale, scaler_in_charge = getattr(optimizer, "grad_scale", None), hasattr(optimizer, "found_inf")
        with torch.no_grad():
            weights, shards = local_tensors(self._params, self.names)
            buffers = self._buffers if self.every == 1 else None  # reused (in huge pages: _pages) when every step logs
            if buffers is None or not all(map(laid_out_alike, buffers, weights)):  # e.g. after model.to(dtype)
                buffers = _pages.packed_like(weights) if self.every == 1 else [torch.empty_like(w) for w in weights]
            # The snapshot's copy gives the weight norms: the weights are not read twice.
            self._weight = copy_primitives(buffers, weights, shards, self.foreach, self.compile)
            self._snapshot, self._buffers = buffers, buffers if self.every == 1 else None
        # The hook sees step()'s own arguments: (optimizer, closure?) and its keywords.
        closure = args[1] if len(args) > 1 else kwargs.get("closure")
        if closure is None:
            self._current = self._measure(scale, scaler_in_charge)
            return None

        # step(closure) (Lightning, LBFGS) computes the gradients inside step(), after this hook:
        # measure right after the closure's first call, still before the update.
        def measured_closure() -> Any:
            loss = closure()
            if self._current is None and self._snapshot is not None:
                self._current = self._measure(scale, scaler_in_charge)
            return loss

        if len(args) > 1:
            return (args[0], measured_closure, *args[2:]), kwargs
        return args, {**kwargs, "closure": measured_closure}

    @torch.no_grad()
    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        record, snapshot = self._current, self._snapshot
        self._current = self._snapshot = self._weight = None
        if record is not None and snapshot is not None:
            weights, shards = local_tensors(self._params, self.names)
            record.delta = distance_primitives(snapshot, weights, shards, self.foreach, self.compile)
            reduce_shards(record.delta)
            self._finish(record)
        self.steps += 1

    # -- measuring

    @torch.no_grad()
    def _measure(self, scale: Tensor | None, scaler_in_charge: bool) -> _Record:
        grads, have = gradients(self._params)
        grads, grad_shards = local_tensors(grads, pick(self.names, have))
        grad = local_primitives(grads, grad_shards, self._needed, self.foreach, self.compile)
        weight, self._weight = self._weight, None  # measured with the snapshot, if one was taken
        if weight is None:
            weight = local_primitives(*local_tensors(self._params, self.names), ("sumsq",), self.foreach, self.compile)
        reduce_shards(grad, weight)  # one collective for both, if any parameter is sharded
        hist = []
        if self._with_histograms:
            hist = [histogram(g, _BINS, self._params[i].numel() - g.numel()) for i, g in zip(have, grads)]
        record = _Record(self.steps, have, grad, weight, hist, None if scale is None else scale.detach().reshape(1))
        if self.on_nonfinite != "raise" or scaler_in_charge:
            return record
        # The one host read of a log step: a flag, so that the optimizer step can still be stopped.
        row = -1 if "max_abs" in grad.needed else 0  # max |x|, else Σx² (which may also have overflowed)
        finite = torch.cat([block[row] for block in grad.tensors()]).isfinite().all() if have else True
        if not bool(finite) and row == 0:  # max |x| decides, and names the layers
            needed = (*grad.needed, "max_abs")
            record.grad = grad = local_primitives(grads, grad_shards, needed, self.foreach, self.compile)
            reduce_shards(grad)
            finite = torch.cat([block[-1] for block in grad.tensors()]).isfinite().all()
        if not bool(finite):
            self._pending.append(record)
            self.flush()
            self.steps += 1  # the step counts as taken: the next one gets the next number
            self._snapshot = None
            raise NonFiniteGradError(self._nonfinite_message(record), self._nonfinite(record), record.step)
        return record

    def _nonfinite(self, record: _Record) -> list[str]:
        finite = record.grad.values()["max_abs"].isfinite().tolist()
        return [self.names[i] for i, ok in zip(record.have, finite) if not ok]

    def _nonfinite_message(self, record: _Record) -> str:
        return (f"non-finite gradient at step {record.step} in {', '.join(self._nonfinite(record))}. Run "
                "lw.watch_nonfinite(model) to find the layer where it first appears, and check the learning rate "
                "and the loss.")

    def _finish(self, record: _Record) -> None:
        self._pending.append(record)
        # Results wait on the device and travel in batches: one transfer per flush_every steps.
        if record.step + self.every - self._pending[0].step >= self.flush_every:
            self.flush()

    def _rows(self, record: _Record) -> list[dict[str, Any]]:
        grad = record.grad.values()
        unscale(grad, record.scale)
        columns = {k: v.tolist() for k, v in grad.items()}
        derived = derive(columns, [float(self._params[i].numel()) for i in record.have], self.stats)
        weight = record.weight.values()["sumsq"].sqrt().tolist()
        delta = record.delta.values()["sumsq"].sqrt().tolist() if record.delta else None
        column = {i: j for j, i in enumerate(record.have)}
        rows = []
        for i, name in enumerate(self.names):
            j = column.get(i)
            row: dict[str, Any] = {"step": record.step, "layer": name}
            row.update((f"grad_{s}", None if j is None else derived[s][j]) for s in self.stats)
            row["weight_norm"] = weight[i]
            if self.optimizer is not None:
                row["update_ratio"] = delta[i] / weight[i] if delta is not None and weight[i] > 0 else None
            row["dead"] = None if j is None else columns["sumsq"][j] == 0
            rows.append(row)
        return rows

    def _histograms(self, record: _Record) -> dict[str, Histogram]:
        grad = record.grad.values()
        unscale(grad, record.scale)
        scale = 1.0 if record.scale is None else float(record.scale)
        out = {}
        for j, (i, h) in enumerate(zip(record.have, record.hist)):
            lo, hi = float(h[0]) / scale, float(h[1]) / scale
            limits = [lo + (hi - lo) * (k + 1) / _BINS for k in range(_BINS)]
            out[self.names[i]] = Histogram(lo, hi, self._params[i].numel(), float(grad["sum"][j]),
                                           float(grad["sumsq"][j]), limits, h[2:].tolist())
        return out

    # -- results

    def flush(self) -> None:
        """Move every measured log step to the host (one transfer), into :attr:`history` and the sinks."""
        pending, self._pending = self._pending, []
        parts = [r.tensors() for r in pending]
        host = iter(to_host([t for part in parts for t in part]))
        for record, part in zip(pending, parts):
            record.load([next(host) for _ in part])
        for record in pending:
            if self.on_nonfinite == "warn" and "max_abs" in record.grad.needed and self._nonfinite(record):
                warnings.warn(self._nonfinite_message(record), RuntimeWarning, stacklevel=2)
            if self.sinks and (not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0):
                rows = self._rows(record)
                histograms = self._histograms(record) if self._with_histograms else None
                for sink in self.sinks:
                    sink.write(record.step, rows, histograms if getattr(sink, "histograms", False) else None)
            record.hist = []
            self._done.append(record)

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every logged row so far (one dict per layer and log step), as the sinks receive them."""
        self.flush()
        return [row for record in self._done for row in self._rows(record)]

    def plot(self, path: str | os.PathLike, *selectors: Selector) -> Path:
        """Write a PNG: a layers × log steps heat map of log10 gradient norm, and the norm over steps
        of the layers the selectors pick (default: up to four, spread from first to last).

        Needs the ``plot`` extra (matplotlib; no global backend is touched) and "norm" in ``stats``.

        Example:
            >>> import layerwise as lw, torch, tempfile, pathlib
            >>> net = torch.nn.Linear(2, 1)
            >>> monitor = lw.GradMonitor(net, every=1)
            >>> for _ in range(3):
            ...     net(torch.ones(1, 2)).sum().backward()
            ...     monitor.step()
            >>> png = monitor.plot(pathlib.Path(tempfile.mkdtemp()) / "grads.png")
            >>> png.read_bytes()[:4]
            b'\\x89PNG'
        """
        if "norm" not in self.stats:
            raise GradError("GradMonitor.plot draws gradient norms: monitor with 'norm' in stats.")
        path = writable_file(path)
        rows = self.history
        if not rows:
            raise GradError(f"nothing to plot into {str(path)!r} yet: no step has been logged.")
        steps = sorted({row["step"] for row in rows})
        layer_at, step_at = {n: i for i, n in enumerate(self.names)}, {s: i for i, s in enumerate(steps)}
        norms = torch.full((len(self.names), len(steps)), math.nan, dtype=torch.float64)
        for row in rows:
            if row["grad_norm"] is not None:
                norms[layer_at[row["layer"]], step_at[row["step"]]] = row["grad_norm"]
        if selectors:
            picked = set(select(self._model, *selectors).names())
            lines = [i for i, n in enumerate(self.names) if n in picked]
        else:
            lines = sorted({round(k * (len(self.names) - 1) / 3) for k in range(4)})
        return plot_grad_norms(path, self.names, steps, norms, lines)

    def remove(self) -> None:
        """Unhook from the optimizer, flush, and close the sinks. Safe to call again."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._current, self._snapshot, self._buffers, self._weight = [], None, None, None, None
        self.flush()
        for sink in self.sinks:
            sink.close()
        self.sinks = ()

    def __enter__(self) -> GradMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (f"GradMonitor({len(self.names)} layers, every={self.every}, steps={self.steps}, "
                f"stats={list(self.stats)}, sinks={[type(s).__name__ for s in self.sinks]})")
