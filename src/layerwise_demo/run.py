"""The demo from start to end: data, the six sections, the training-curve figure, the report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import layerwise as lw

from .data import digit_pairs
from .gradients import gradients, surgery
from .report import Report, plot_curves
from .sections import Run, freezing, learning_rates, sharing
from .weights import averaging

# The demo's models are tiny (an LSTM of 48 units, batches of 64): more threads only add
# synchronisation, and beside another busy process torch's spinning worker threads compete
# for the cores and slow every op several-fold. One thread is as fast on a quiet machine.
THREADS = 1


def run(out: str | Path = "layerwise-demo", *, seed: int = 0, epochs: int = 10, device: str = "cpu",
        console: Console | None = None, threads: int = THREADS) -> dict[str, Any]:
    """Run every section, write ``out/report.md`` and the figures, and return the measured results.

    Raises :class:`layerwise.VerificationError` if any verification failed (the report is still written).
    """
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    console = console or Console(highlight=False)
    report = Report(out, console)
    train_pairs, test_pairs = digit_pairs(seed)
    dev = torch.device(device)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    bar = Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=Console(stderr=True, quiet=console.quiet))
    try:
        with bar:
            state = Run(report, train_pairs.to(dev), test_pairs.to(dev), seed, epochs, dev, bar)
            base = sharing(state)
            freezing(state, base)
            learning_rates(state, base)
            averaging(state, base)
            gradients(state, base)
            surgery(state, base)
    finally:
        torch.set_num_threads(previous_threads)
    report.section("Training curves", "Each run drawn from the step it started at: the base model from 0, the "
                   "runs built on it from where its training ended.")
    plot_curves(report.figure("training_curves.png", "Training loss of every run"), state.curves)
    path = report.write()
    failed = [label for label, ok in report.checks if not ok]
    console.print(f"\nReport written to [bold]{path}[/] ({time.perf_counter() - started:.0f} s, "
                  f"{len(report.checks) - len(failed)}/{len(report.checks)} checks passed).")
    state.results.update(checks=report.checks, report=str(path),
                         curve_starts={label: start for label, (start, _) in state.curves.items()})
    if failed:
        raise lw.VerificationError(f"demo verification failed: {'; '.join(failed)}")
    return state.results
