"""What the demo prints, mirrored into ``report.md``, and its figures."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from .data import optional

ROLLUP_ABOVE = 30  # a heat map with more rows than this is rolled up per module


@dataclass
class Report:
    """What the demo prints, mirrored into ``report.md``; checks make the run fail if one is false."""

    out: Path
    console: Console
    lines: list[str] = field(default_factory=list)
    checks: list[tuple[str, bool]] = field(default_factory=list)

    def section(self, title: str, text: str) -> None:
        self.console.rule(f"[bold]{title}")
        self.console.print(text)
        self.lines += ["", f"## {title}", "", text, ""]

    def say(self, text: str) -> None:
        self.console.print(text)
        self.lines += [text, ""]

    def table(self, table: Any) -> None:
        """Print a rich renderable (a table) and keep its text rendering for the report."""
        self.console.print(table)
        recorder = Console(width=160, record=True, file=io.StringIO())
        recorder.print(table)
        self.lines += ["```", recorder.export_text().rstrip(), "```", ""]

    def code(self, text: str) -> None:
        self.lines += ["```python", text.strip(), "```", ""]

    def check(self, label: str, ok: bool) -> None:
        self.console.print(f"  [{'green' if ok else 'red'}]{'✓' if ok else '✗'}[/] {label}")
        self.lines.append(f"- {'✅' if ok else '❌'} {label}")
        self.checks.append((label, ok))

    def figure(self, name: str, caption: str) -> Path:
        self.lines += [f"![{caption}]({name})", ""]
        return self.out / name

    def write(self) -> Path:
        """Write ``report.md`` atomically, with the permissions any new file gets (0644 under umask 022)."""
        path = self.out / "report.md"
        tmp = self.out / f".report.md.{os.getpid()}"
        with open(tmp, "x") as f:  # open() honours the umask, unlike mkstemp's 0600
            f.write("\n".join(["# layerwise demo", ""] + self.lines) + "\n")
        os.replace(tmp, path)
        return path


def _figure(width: float, height: float) -> Any:
    # matplotlib.figure.Figure needs no pyplot state nor global backend.
    return optional("matplotlib.figure").Figure(figsize=(width, height), layout="constrained")


def plot_curves(path: Path, curves: dict[str, tuple[int, list[float]]]) -> None:
    """Training loss of every run, each drawn from the step it started at (fine-tunes start where the base ended)."""
    fig = _figure(8, 3.8)
    ax = fig.subplots()
    for label, (start, values) in curves.items():
        window = max(1, len(values) // 40)
        smooth = torch.tensor(values[: len(values) // window * window]).view(-1, window).mean(1)
        ax.plot(start + (torch.arange(len(smooth)) + 0.5) * window, smooth, label=label)
    ax.set_xlabel("optimizer step (counting the training each run started from)")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)


def plot_connectivity(path: Path, alphas: Sequence[float], accuracies: Sequence[float],
                      points: dict[str, float]) -> None:
    """Test accuracy along the straight line from model a (α=0) through their average (α=½) to b (α=1)."""
    fig = _figure(7, 3.5)
    ax = fig.subplots()
    ax.plot(alphas, [100 * a for a in accuracies], marker="o", label="(1 − α)·a + α·b")
    for label, alpha in (("a", 0.0), ("average", 0.5), ("b", 1.0)):
        i = min(range(len(alphas)), key=lambda k: abs(alphas[k] - alpha))
        ax.annotate(label, (alphas[i], 100 * accuracies[i]), textcoords="offset points", xytext=(0, 8), ha="center")
    for label, value in points.items():
        ax.axhline(100 * value, linestyle=":", color="gray")
        ax.annotate(label, (0.0, 100 * value), textcoords="offset points", xytext=(4, 3), fontsize="small")
    ax.margins(y=0.15)  # room for the labels above the points
    ax.set_xlabel("α along the line from a to b")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize="small", loc="lower center")
    fig.savefig(path, dpi=110)


def grad_norm_grid(history: list[dict[str, Any]], rollup_above: int = ROLLUP_ABOVE
                   ) -> tuple[list[str], list[int], torch.Tensor]:
    """(rows, steps, norms): one row per layer, or per module (its tensors' norms pooled, √Σ‖g‖²)
    when there are more than ``rollup_above`` layers. A layer with no gradient at a step is NaN."""
    steps = sorted({row["step"] for row in history})
    layers = list(dict.fromkeys(row["layer"] for row in history))
    owner = {n: n.rpartition(".")[0] or n for n in layers} if len(layers) > rollup_above else {n: n for n in layers}
    rows = list(dict.fromkeys(owner.values()))
    at_row, at_step = {r: i for i, r in enumerate(rows)}, {s: i for i, s in enumerate(steps)}
    squares = torch.full((len(rows), len(steps)), math.nan, dtype=torch.float64)
    for row in history:
        if row["grad_norm"] is not None:
            i, j = at_row[owner[row["layer"]]], at_step[row["step"]]
            squares[i, j] = torch.nan_to_num(squares[i, j]) + row["grad_norm"] ** 2
    return rows, steps, squares.sqrt()


def plot_grad_heatmap(path: Path, history: list[dict[str, Any]]) -> None:
    """log10 gradient norm, layers (or modules) × logged steps."""
    rows, steps, norms = grad_norm_grid(history)
    fig = _figure(9, 1.5 + 0.22 * len(rows))
    ax = fig.subplots()
    image = ax.imshow(torch.where(norms > 0, norms.log10(), math.nan).numpy(), aspect="auto",
                      interpolation="nearest", cmap="viridis")
    fig.colorbar(image, ax=ax, label="log10 gradient norm")
    ax.set_yticks(range(len(rows)), labels=rows, fontsize="small")
    every = max(1, len(steps) // 12)
    ax.set_xticks(range(0, len(steps), every), labels=[str(s) for s in steps[::every]])
    ax.set_xlabel("optimizer step")
    fig.savefig(path, dpi=110)
