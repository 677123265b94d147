"""Where :class:`GradMonitor` writes: CSV, JSON Lines and TensorBoard sinks, and its plot.

A sink is any object with ``write(step, rows, histograms)`` and ``close()`` (:class:`Sink`);
a new one goes here. Files are opened at the first write, so ranks other than 0 (which never
write) never create them.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple, Protocol

from torch import Tensor

from .errors import GradError, MissingExtraError, OptionTypeError

__all__ = ["CSVSink", "Histogram", "JSONLSink", "Sink", "TensorBoardSink"]


class Histogram(NamedTuple):
    """One gradient's histogram, in the arguments of ``SummaryWriter.add_histogram_raw``.

    Example:
        >>> import layerwise as lw
        >>> h = lw.Histogram(-1.0, 1.0, 4, 0.0, 2.0, [0.0, 1.0], [2.0, 2.0])
        >>> h.num, h.bucket_counts
        (4, [2.0, 2.0])
    """

    min: float
    max: float
    num: int
    sum: float
    sum_squares: float
    bucket_limits: list[float]
    bucket_counts: list[float]


class Sink(Protocol):
    """What :class:`GradMonitor` writes to: ``write`` gets one log step's rows (one dict per layer)
    and, if the sink has ``histograms = True``, each layer's :class:`Histogram`; ``close`` ends it.

    Example:
        >>> import layerwise as lw, torch
        >>> class Printer:  # any object with these two methods is a sink
        ...     def write(self, step, rows, histograms=None):
        ...         print(step, [(r["layer"], r["grad_norm"]) for r in rows])
        ...     def close(self):
        ...         pass
        >>> net = torch.nn.Linear(2, 1)
        >>> net(torch.tensor([[3.0, 4.0]])).sum().backward()
        >>> with lw.GradMonitor(net, stats="norm", sinks=[Printer()]) as monitor:
        ...     monitor.step()
        0 [('weight', 5.0), ('bias', 1.0)]
    """

    def write(self, step: int, rows: list[dict[str, Any]], histograms: dict[str, Histogram] | None) -> None: ...

    def close(self) -> None: ...


def _usable(path: Any) -> Path:
    """``path`` as a Path if a file could be made there; checked now, not at the first log step mid-training."""
    if not isinstance(path, (str, os.PathLike)):
        raise OptionTypeError(f"a sink writes to a path (a str or os.PathLike), not {type(path).__name__} {path!r:.80}")
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        pass
    except (OSError, ValueError) as e:  # a name over the file system's limit, a NUL byte
        raise GradError(f"cannot write {str(path)!r}: {getattr(e, 'strerror', None) or e}.") from None
    return Path(path)


def checked_sinks(sinks: Any) -> tuple[Sink, ...]:
    """``sinks`` as a tuple once each is known to be a sink: a wrong one would fail only at the first log step."""
    if isinstance(sinks, (str, bytes)) or hasattr(sinks, "write") or not isinstance(sinks, Iterable):
        raise OptionTypeError(f"sinks takes a list of sinks, not {type(sinks).__name__}: pass sinks=[...]")
    sinks = tuple(sinks)
    bad = [type(s).__name__ for s in sinks if not (callable(getattr(s, "write", None))
                                                   and callable(getattr(s, "close", None)))]
    if bad:
        raise OptionTypeError(f"sinks: {', '.join(bad)} is not a sink (an object with write(step, rows, "
                              "histograms) and close(), such as CSVSink, JSONLSink or TensorBoardSink)")
    return sinks


def writable_file(path: str | os.PathLike) -> Path:
    path = _usable(path)
    folder = path.parent
    if not folder.is_dir():
        raise GradError(f"cannot write {str(path)!r}: folder {str(folder)!r} does not exist. Create it first.")
    if path.is_dir():
        raise GradError(f"cannot write {str(path)!r}: it is a folder. Pass a file path.")
    if not os.access(path if path.exists() else folder, os.W_OK):
        raise GradError(f"cannot write {str(path)!r}: permission denied.")
    return path


def _writable_dir(path: str | os.PathLike) -> Path:
    path = _usable(path)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise GradError(f"cannot write into {str(path)!r}: {str(existing)!r} is not a writable folder.")
    return path


class _FileSink:
    """A text file opened at the first write (so ranks other than 0 never create it), flushed at every write."""

    histograms = False

    def __init__(self, path: str | os.PathLike):
        self.path = writable_file(path)
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
            raise MissingExtraError("TensorBoardSink needs tensorboard: pip install 'layerwise[tensorboard]'") from None
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




def plot_grad_norms(path: str | os.PathLike, names: Sequence[str], steps: Sequence[int], norms: Tensor,
                    lines: Sequence[int]) -> Path:
    """Write :meth:`GradMonitor.plot`'s PNG: a heat map of ``norms`` (layers × steps, NaN for none) and
    the curves of the layers at indices ``lines``."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingExtraError("GradMonitor.plot needs matplotlib: pip install 'layerwise[plot]'") from None
    n_layers = len(names)
    fig = Figure(figsize=(10, 4 + min(0.16 * n_layers, 24)), layout="constrained")
    heat, curves = fig.subplots(2, 1, height_ratios=[max(2.0, min(0.16 * n_layers, 24)), 3])
    image = heat.imshow(norms.where(norms > 0, math.nan).log10().numpy(), aspect="auto", interpolation="nearest",
                        cmap="viridis")
    fig.colorbar(image, ax=heat, label="log10 gradient norm")
    every_k = max(1, n_layers // 40)
    heat.set_yticks(range(0, n_layers, every_k), labels=list(names[::every_k]), fontsize="small")
    every_s = max(1, len(steps) // 12)
    heat.set_xticks(range(0, len(steps), every_s), labels=[str(s) for s in steps[::every_s]])
    heat.set_xlabel("step")
    for i in lines:
        curves.plot(steps, norms[i].numpy(), marker="." if len(steps) < 50 else None, label=names[i])
    curves.set_yscale("log")
    curves.set_xlabel("step")
    curves.set_ylabel("gradient norm")
    curves.legend(fontsize="small")
    fig.savefig(path, dpi=100)
    return Path(path)
