"""`layerwise demo`: the mission's techniques on a Siamese LSTM over scikit-learn's digits.

Each 8×8 digit is read as a sequence of 8 rows; one LSTM stack encodes both images of a
pair and a linear head says whether they show the same digit. Every section prints what it
did and a verification, and the run writes a report folder (``report.md`` and figures).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from .inspect import show
from ._term import console as make_console
from ._term import progress

__all__ = ["SiameseLSTM", "digit_pairs", "run"]


# --------------------------------------------------------------------------- data and model


@dataclass
class Pairs:
    a: torch.Tensor  # (n, 8, 8): image rows as a sequence
    b: torch.Tensor
    y: torch.Tensor  # 1 if both show the same digit

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: torch.Tensor) -> Pairs:
        return Pairs(self.a[index], self.b[index], self.y[index])

    def to(self, device: torch.device | str) -> Pairs:
        return Pairs(self.a.to(device), self.b.to(device), self.y.to(device))


def _optional(module: str, extra: str = "demo"):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ImportError(f"the demo needs {module.split('.')[0]}: pip install 'layerwise[{extra}]'") from None


def _pairs_from(images: torch.Tensor, labels: torch.Tensor, n: int, gen: torch.Generator) -> Pairs:
    """``n`` pairs, half showing the same digit, half different ones."""
    first = torch.randint(len(images), (n,), generator=gen)
    by_digit = [torch.nonzero(labels == d).flatten() for d in range(10)]
    same = torch.rand(n, generator=gen) < 0.5
    second = torch.empty(n, dtype=torch.long)
    for i in range(n):
        digit = int(labels[first[i]])
        if not same[i]:
            digit = (digit + int(torch.randint(1, 10, (1,), generator=gen))) % 10
        pool = by_digit[digit]
        second[i] = pool[torch.randint(len(pool), (1,), generator=gen)]
    return Pairs(images[first], images[second], (labels[first] == labels[second]).long())


def digit_pairs(seed: int = 0, n_train: int = 4000, n_test: int = 1000) -> tuple[Pairs, Pairs]:
    """Train and test pairs of scikit-learn's bundled digits, drawn from disjoint images."""
    datasets = _optional("sklearn.datasets")
    digits = datasets.load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=gen)
    cut = int(0.7 * len(images))
    train, test = order[:cut], order[cut:]
    return (_pairs_from(images[train], labels[train], n_train, gen),
            _pairs_from(images[test], labels[test], n_test, gen))


class SiameseLSTM(nn.Module):
    """Two stacked LSTMs encode each image; the same encoder serves both branches of a pair."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.lstm1 = nn.LSTM(8, hidden, batch_first=True)
        self.lstm2 = nn.LSTM(hidden, hidden, batch_first=True)
        self.norm = nn.BatchNorm1d(hidden)
        self.linear = nn.Linear(4 * hidden, 2)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm1(x)
        h, _ = self.lstm2(h)
        return self.norm(h[:, -1])

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ea, eb = self.encode(a), self.encode(b)
        return self.linear(torch.cat([ea, eb, (ea - eb).abs(), ea * eb], dim=1))


def batches(data: Pairs, size: int, gen: torch.Generator) -> Iterator[Pairs]:
    order = torch.randperm(len(data), generator=gen)
    for i in range(0, len(data), size):
        yield data.subset(order[i:i + size].to(data.y.device))


@torch.no_grad()
def accuracy(model: nn.Module, data: Pairs) -> float:
    was_training = model.training
    model.eval()
    correct = (model(data.a, data.b).argmax(1) == data.y).float().mean().item()
    model.train(was_training)
    return correct


def train(model: nn.Module, optimizer: torch.optim.Optimizer, data: Pairs, epochs: int, *, seed: int,
          bar: Any, label: str, after_backward: Callable[[int], None] | None = None,
          after_step: Callable[[int], None] | None = None, batch_size: int = 64) -> list[float]:
    """A plain training loop; the hooks let sections act between backward and step. Returns losses."""
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * -(-len(data) // batch_size)
    task = bar.add_task(label, total=steps)
    losses = []
    model.train()
    step = 0
    for _ in range(epochs):
        for batch in batches(data, batch_size, gen):
            loss = F.cross_entropy(model(batch.a, batch.b), batch.y)
            optimizer.zero_grad()
            loss.backward()
            if after_backward is not None:
                after_backward(step)
            optimizer.step()
            if after_step is not None:
                after_step(step)
            losses.append(loss.item())
            step += 1
            bar.update(task, advance=1)
    return losses


# --------------------------------------------------------------------------- the report


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
        self.lines += [f"## {title}", "", text, ""]

    def say(self, text: str) -> None:
        self.console.print(text)
        self.lines += [text, ""]

    def table(self, table: Any) -> None:
        """Print a rich renderable (a table) and keep its text rendering for the report."""
        self.console.print(table)
        recorder = Console(width=160, record=True, file=open(os.devnull, "w"))
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
        path = self.out / "report.md"
        fd, tmp = tempfile.mkstemp(dir=self.out, prefix=".report.md.")
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(["# layerwise demo", ""] + self.lines) + "\n")
        os.replace(tmp, path)
        return path


def _plot_curves(path: Path, curves: dict[str, list[float]]) -> None:
    plt = _optional("matplotlib.pyplot")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for label, values in curves.items():
        window = max(1, len(values) // 40)
        smooth = torch.tensor(values).unfold(0, window, window).mean(1) if len(values) >= window else torch.tensor(values)
        ax.plot(torch.arange(len(smooth)) * window, smooth, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- sections


@dataclass
class Run:
    report: Report
    train: Pairs
    test: Pairs
    seed: int
    epochs: int
    device: torch.device
    bar: Any
    curves: dict[str, list[float]] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)


def section_sharing(run: Run) -> SiameseLSTM:
    run.report.section(
        "1. Weight sharing: one encoder, two branches",
        "A Siamese network calls the same LSTMs on both images of a pair. Autograd adds the two "
        "branches' gradients into the one set of weights; `lw.show(model, optimizer, inputs=...)` "
        "lists each parameter once and counts how often its module runs per forward.")
    torch.manual_seed(run.seed)
    model = SiameseLSTM().to(run.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    run.curves["base model"] = train(model, optimizer, run.train, run.epochs, seed=run.seed, bar=run.bar,
                                     label="1. training the Siamese LSTM")
    acc = accuracy(model, run.test)
    run.results["base_accuracy"] = acc
    run.report.say(f"Trained {run.epochs} epochs on {len(run.train):,} pairs: test accuracy {acc:.1%} "
                   f"(chance 50%).")
    sample = (run.test.a[:2], run.test.b[:2])
    rows = show(model, optimizer, inputs=sample, quiet=True)
    run.report.table(rows)
    lstm_rows = [r for r in rows if r["name"].startswith(("lstm1.", "lstm2."))]
    run.report.check("each LSTM parameter appears once in the table",
                     len({r["name"] for r in lstm_rows}) == len(list(model.lstm1.parameters())) + len(list(model.lstm2.parameters())))
    run.report.check("each LSTM runs twice per forward (used by both branches)", all(r["calls"] == 2 for r in lstm_rows))
    run.report.check("the head runs once per forward", all(r["calls"] == 1 for r in rows if r["name"].startswith("linear.")))
    return model


def run(out: str | Path = "layerwise-demo", *, seed: int = 0, epochs: int = 3, device: str = "cpu",
        console: Console | None = None) -> dict[str, Any]:
    """Run every section, write ``out/report.md`` and the figures, and return the measured results.

    Raises ``RuntimeError`` if any verification failed (the report is still written).
    """
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    console = console or make_console()
    report = Report(out, console)
    train_pairs, test_pairs = digit_pairs(seed)
    dev = torch.device(device)
    with progress(make_console(stderr=True, quiet=console.quiet)) as bar:
        state = Run(report, train_pairs.to(dev), test_pairs.to(dev), seed, epochs, dev, bar)
        section_sharing(state)
    _plot_curves(report.figure("training_curves.png", "Training loss of every run"), state.curves)
    path = report.write()
    failed = [label for label, ok in report.checks if not ok]
    console.print(f"\nReport written to [bold]{path}[/] ({time.perf_counter() - started:.0f} s, "
                  f"{len(report.checks) - len(failed)}/{len(report.checks)} checks passed).")
    state.results.update(checks=report.checks, report=str(path))
    if failed:
        raise RuntimeError(f"demo verification failed: {'; '.join(failed)}")
    return state.results
