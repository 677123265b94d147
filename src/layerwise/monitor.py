"""GradMonitor: per-layer gradient statistics through training, written to sinks, plotted.

Built on the primitives of ``grads.py``: between log steps the monitor costs a counter
increment; on a log step it measures on the device and moves results to the host in one
transfer, only when a sink writes, a non-finite check needs them, or they are asked for.
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._tensors import pick
from .errors import GradError, NonFiniteGradError
from .grads import STATS, _chosen, _derive, _needed, _primitives, _Prims, _stat_names, _to_host, _unscale, _unshard
from .select import Selector, select

__all__ = ["CSVSink", "GradMonitor", "Histogram", "JSONLSink", "Sink", "TensorBoardSink"]

_BINS = 64  # TensorBoard histogram buckets
_MAX_PENDING = 64  # log steps a GradMonitor keeps on the device before moving them to the host


# --------------------------------------------------------------------------- sinks


class Histogram(NamedTuple):
    """One gradient's histogram, in the arguments of ``SummaryWriter.add_histogram_raw``."""

    min: float
    max: float
    num: int
    sum: float
    sum_squares: float
    bucket_limits: list[float]
    bucket_counts: list[float]


class Sink(Protocol):
    """What :class:`GradMonitor` writes to: ``write`` gets one log step's rows (one dict per layer)
    and, if the sink has ``histograms = True``, each layer's :class:`Histogram`; ``close`` ends it."""

    def write(self, step: int, rows: list[dict[str, Any]], histograms: dict[str, Histogram] | None) -> None: ...

    def close(self) -> None: ...


def _writable_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise GradError(f"cannot write {str(path)!r}: folder {str(folder)!r} does not exist. Create it first.")
    if path.is_dir():
        raise GradError(f"cannot write {str(path)!r}: it is a folder. Pass a file path.")
    if not os.access(path if path.exists() else folder, os.W_OK):
        raise GradError(f"cannot write {str(path)!r}: permission denied.")
    return path


def _writable_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise GradError(f"cannot write into {str(path)!r}: {str(existing)!r} is not a writable folder.")
    return path


class _FileSink:
    """A text file opened at the first write (so ranks other than 0 never create it), flushed at every write."""

    histograms = False

    def __init__(self, path: str | os.PathLike):
        self.path = _writable_file(path)
        self._file: IO[str] | None = None

    def _open(self) -> IO[str]:
        if self._file is None:
            self._file = open(self.path, "w", newline="")
        return self._file

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class CSVSink(_FileSink):
    """Write the monitor's rows to a CSV file (replacing it): a header, then one line per layer and log step.

    Example:
        >>> import layerwise as lw, torch, tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "grads.csv"
        >>> net = torch.nn.Linear(2, 1)
        >>> net(torch.ones(1, 2)).sum().backward()
        >>> with lw.GradMonitor(net, stats=["norm"], sinks=[lw.CSVSink(path)]) as monitor:
        ...     monitor.step()
        >>> path.read_text().splitlines()[0]
        'step,layer,grad_norm,weight_norm,dead'
    """

    def write(self, step: int, rows: list[dict[str, Any]], histograms: dict[str, Histogram] | None = None) -> None:
        first = self._file is None
        writer = csv.DictWriter(self._open(), fieldnames=list(rows[0]))
        if first:
            writer.writeheader()
        writer.writerows(rows)
        self._file.flush()


class JSONLSink(_FileSink):
    """Write the monitor's rows to a JSON Lines file (replacing it), one object per layer and log step.

    A missing gradient is ``null``; non-finite values are ``NaN`` / ``Infinity``, as Python's json writes them.

    Example:
        >>> import layerwise as lw, torch, tempfile, pathlib, json
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "grads.jsonl"
        >>> net = torch.nn.Linear(2, 1)
        >>> net(torch.ones(1, 2)).sum().backward()
        >>> with lw.GradMonitor(net, stats=["max_abs"], sinks=[lw.JSONLSink(path)]) as monitor:
        ...     monitor.step()
        >>> [json.loads(line)["grad_max_abs"] for line in path.read_text().splitlines()]
        [1.0, 1.0]
    """

    def write(self, step: int, rows: list[dict[str, Any]], histograms: dict[str, Histogram] | None = None) -> None:
        file = self._open()
        file.writelines(json.dumps(row) + "\n" for row in rows)
        file.flush()


class TensorBoardSink:
    """Write the monitor's rows as TensorBoard scalars ``<column>/<layer>``, and with ``histograms=True``
    a gradient histogram per layer (computed on the device; whole gradients never reach the host).

    Needs the ``tensorboard`` extra. The event file is created at the first write, on rank 0 only.

    Example:
        >>> import layerwise as lw, torch, tempfile, pathlib
        >>> log_dir = pathlib.Path(tempfile.mkdtemp()) / "run1"
        >>> net = torch.nn.Linear(2, 1)
        >>> net(torch.ones(1, 2)).sum().backward()
        >>> with lw.GradMonitor(net, sinks=[lw.TensorBoardSink(log_dir, histograms=True)]) as monitor:
        ...     monitor.step()
        >>> [p.name.split(".")[0] for p in log_dir.iterdir()]
        ['events']
    """

    def __init__(self, log_dir: str | os.PathLike, histograms: bool = False):
        try:
            import tensorboard  # noqa: F401  (fail now, not at the first log step)
        except ImportError:
            raise ImportError("TensorBoardSink needs tensorboard: pip install 'layerwise[tensorboard]'") from None
        self.log_dir, self.histograms = _writable_dir(log_dir), histograms
        self._writer = None

    def write(self, step: int, rows: list[dict[str, Any]], histograms: dict[str, Histogram] | None = None) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.log_dir))
        for row in rows:
            for key, value in row.items():
                if isinstance(value, float):
                    self._writer.add_scalar(f"{key}/{row['layer']}", value, step)
        for layer, h in (histograms or {}).items():
            if h.num and math.isfinite(h.min) and math.isfinite(h.max):
                self._writer.add_histogram_raw(f"grad/{layer}", **h._asdict(), global_step=step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _histogram(x: Tensor, bins: int) -> Tensor:
    """(min, max, counts of ``bins`` equal buckets) of one tensor, on its device and without a sync."""
    if x.numel() == 0:
        return x.new_zeros(bins + 2, dtype=torch.float32)
    lo, hi = torch.aminmax(x.detach().flatten().float())
    width = ((hi - lo) / bins).clamp_min(torch.finfo(torch.float32).tiny)
    # histc with a fixed range needs no host round trip; the data-dependent range is applied on the device.
    counts = torch.histc(((x.float() - lo) / width).clamp_(0, bins), bins, 0, bins)
    return torch.cat([lo.reshape(1), hi.reshape(1), counts])


def _is_writer() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# --------------------------------------------------------------------------- the monitor


@dataclass
class _Record:
    """One log step, on the device until a transfer moves it to the host."""

    step: int
    have: list[int]  # indices of the monitored parameters that had a gradient
    grad: _Prims
    weight: _Prims
    hist: list[Tensor]
    scale: Tensor | None  # the GradScaler scale the gradients still carry
    delta: _Prims | None = None  # ‖Δw‖² across the optimizer step

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
    entirely zero). Other steps cost one counter increment. Results reach the host, in one
    transfer each time, when ``on_nonfinite`` must check them (before the optimizer step, so
    that it can stop it), when a sink writes, or at :meth:`flush` / :attr:`history`. Under
    ``torch.distributed`` every rank computes and rank 0 writes.

    Steps: given an ``optimizer`` the monitor hooks its ``step()``, so it counts optimizer
    steps and gradient accumulation logs once per step; ``step(closure)`` (Lightning, LBFGS)
    is measured after the closure's backward. Without an optimizer, call :meth:`step` after
    each ``backward()``. ``on_nonfinite`` ("raise", "warn", "ignore") acts on a log step whose
    gradients hold NaN/inf, naming the layers and the step, and raises before the optimizer
    updates the weights. The measurement of Δw copies the monitored weights on log steps.

    Mixed precision: with an ``optimizer``, call ``scaler.step(optimizer)`` as usual. The hooks
    run inside it once the gradients are unscaled; a step the scaler skips for inf/NaN never
    reaches them and is not counted. (A fused optimizer gets still-scaled gradients and skips
    such steps itself: the monitor divides by the scale, counts the step and only records its
    non-finite gradients.) Without an optimizer, call :meth:`step` after ``scaler.unscale_``,
    or pass ``scaler=`` and call it right after ``backward()``: the statistics are then divided
    by the scale on the device, and non-finite gradients only recorded (the scaler skips those steps).

    Sharded parameters (FSDP2 ``fully_shard``, DTensor) get the statistics of the full tensors.

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
                 on_nonfinite: str = "raise", scaler: torch.amp.GradScaler | None = None, foreach: bool | None = None):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise GradError(f"every={every!r}: log every n-th step with an integer n >= 1.")
        if on_nonfinite not in ("raise", "warn", "ignore"):
            raise GradError(f"on_nonfinite={on_nonfinite!r}: use 'raise', 'warn' or 'ignore'.")
        if optimizer is not None and scaler is not None:
            raise GradError("pass scaler= only without optimizer=: with an optimizer the monitor runs inside "
                            "scaler.step(optimizer), where it finds the gradients unscaled.")
        self.names, self._params = _chosen(model, selectors)
        if not self._params:
            raise GradError(f"nothing to monitor: {type(model).__name__} has no trainable parameter. "
                            "Select frozen ones explicitly to watch them anyway.")
        self.stats = _stat_names(stats)
        self.every, self.optimizer, self.scaler, self.foreach = every, optimizer, scaler, foreach
        self.on_nonfinite = on_nonfinite
        self.sinks: tuple[Sink, ...] = tuple(sinks)
        self.steps = 0
        self._model = model
        self._with_histograms = any(getattr(s, "histograms", False) for s in self.sinks)
        if self._with_histograms and any(_unshard(self._params, self.names)[1]):
            raise GradError("gradient histograms of sharded (DTensor) parameters are not supported: "
                            "use TensorBoardSink(histograms=False), or select unsharded parameters.")
        self._needed = _needed(self.stats, *(("max_abs",) if on_nonfinite != "ignore" else ()),
                               *(("sum",) if self._with_histograms else ()))
        self._pending: list[_Record] = []  # measured, still on the device
        self._done: list[_Record] = []  # on the host: rows are built when asked for, to keep memory small
        self._current: _Record | None = None
        self._snapshot: list[Tensor] | None = None
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
            self._snapshot = [w.clone() for w in _unshard(self._params, self.names)[0]]
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
        self._current = self._snapshot = None
        if record is not None and snapshot is not None:
            weights, shards = _unshard(self._params, self.names)
            if self.foreach is False:
                for before, after in zip(snapshot, weights):
                    before.sub_(after)
            else:
                torch._foreach_sub_(snapshot, weights)
            record.delta = _primitives(snapshot, shards, ("sumsq",), self.foreach)
            self._finish(record)
        self.steps += 1

    # -- measuring

    @torch.no_grad()
    def _measure(self, scale: Tensor | None, scaler_in_charge: bool) -> _Record:
        have = [i for i, p in enumerate(self._params) if p.grad is not None]
        grads, grad_shards = _unshard([self._params[i].grad for i in have], pick(self.names, have))
        weights, weight_shards = _unshard(self._params, self.names)
        record = _Record(self.steps, have, _primitives(grads, grad_shards, self._needed, self.foreach),
                         _primitives(weights, weight_shards, ("sumsq",), self.foreach),
                         [_histogram(g, _BINS) for g in grads] if self._with_histograms else [],
                         None if scale is None else scale.detach().reshape(1))
        if self.on_nonfinite == "ignore" or scaler_in_charge:
            return record
        self._materialize([record])
        finite = record.grad.values()["max_abs"].isfinite().tolist()
        bad = [self.names[i] for i, ok in zip(have, finite) if not ok]
        if bad:
            message = (f"non-finite gradient at step {record.step} in {', '.join(bad)}. Run lw.watch_nonfinite(model) "
                       "to find the layer where it first appears, and check the learning rate and the loss.")
            if self.on_nonfinite == "raise":
                self._pending.append(record)
                self.flush()
                self.steps += 1  # the step counts as taken: the next one gets the next number
                self._snapshot = None
                raise NonFiniteGradError(message, bad, record.step)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        return record

    def _finish(self, record: _Record) -> None:
        self._pending.append(record)
        # Sinks get each step at once; otherwise results wait on the device, a bounded number of them.
        if (self.sinks and _is_writer()) or len(self._pending) >= _MAX_PENDING:
            self.flush()

    def _materialize(self, records: list[_Record]) -> None:
        parts = [r.tensors() for r in records]
        host = iter(_to_host([t for part in parts for t in part]))
        for record, part in zip(records, parts):
            record.load([next(host) for _ in part])

    def _rows(self, record: _Record) -> list[dict[str, Any]]:
        grad = record.grad.values()
        _unscale(grad, record.scale)
        numel = torch.tensor([float(self._params[i].numel()) for i in record.have], dtype=torch.float64)
        derived = {s: v.tolist() for s, v in _derive(grad, numel, self.stats).items()}
        sumsq = grad["sumsq"].tolist()
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
            row["dead"] = None if j is None else sumsq[j] == 0
            rows.append(row)
        return rows

    def _histograms(self, record: _Record) -> dict[str, Histogram]:
        grad = record.grad.values()
        _unscale(grad, record.scale)
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
        self._materialize(pending)
        for record in pending:
            if self.sinks and _is_writer():
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
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise ImportError("GradMonitor.plot needs matplotlib: pip install 'layerwise[plot]'") from None
        if "norm" not in self.stats:
            raise GradError("GradMonitor.plot draws gradient norms: monitor with 'norm' in stats.")
        path = _writable_file(path)
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

        n_layers = len(self.names)
        fig = Figure(figsize=(10, 4 + min(0.16 * n_layers, 24)), layout="constrained")
        heat, curves = fig.subplots(2, 1, height_ratios=[max(2.0, min(0.16 * n_layers, 24)), 3])
        image = heat.imshow(torch.where(norms > 0, norms.log10(), math.nan).numpy(), aspect="auto",
                            interpolation="nearest", cmap="viridis")
        fig.colorbar(image, ax=heat, label="log10 gradient norm")
        every_k = max(1, n_layers // 40)
        heat.set_yticks(range(0, n_layers, every_k), labels=self.names[::every_k], fontsize="small")
        every_s = max(1, len(steps) // 12)
        heat.set_xticks(range(0, len(steps), every_s), labels=[str(s) for s in steps[::every_s]])
        heat.set_xlabel("step")
        for i in lines:
            curves.plot(steps, norms[i].numpy(), marker="." if len(steps) < 50 else None, label=self.names[i])
        curves.set_yscale("log")
        curves.set_xlabel("step")
        curves.set_ylabel("gradient norm")
        curves.legend(fontsize="small")
        fig.savefig(path, dpi=100)
        return path

    def remove(self) -> None:
        """Unhook from the optimizer, flush, and close the sinks. Safe to call again."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._current, self._snapshot = [], None, None
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
