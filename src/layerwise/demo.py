"""`layerwise demo`: the mission's techniques on a Siamese LSTM over scikit-learn's digits.

Each 8×8 digit is read as a sequence of 8 rows; one LSTM stack encodes both images of a
pair and a linear head says whether they show the same digit. Every section prints what it
did and a verification, and the run writes a report folder (``report.md`` and figures).
"""

from __future__ import annotations

import copy
import io
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
from rich.table import Table
from torch import nn

from ._term import console as make_console
from ._term import progress
from .average import average
from .ema import EMA
from .freeze import freeze
from .grads import check_grads, grad_stats
from .groups import param_groups
from .inspect import show
from .monitor import CSVSink, GradMonitor
from .select import SelectionError
from .surgery import scale_grad, set_grad

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


def digit_pairs(seed: int = 0, n_train: int = 6000, n_test: int = 1000) -> tuple[Pairs, Pairs]:
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

    def __init__(self, hidden: int = 48):
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
          after_step: Callable[[int], None] | None = None, batch_size: int = 64,
          set_to_none: bool = True) -> list[float]:
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
            optimizer.zero_grad(set_to_none=set_to_none)
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
    ax.set_xlabel("step (of each run)")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
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


def _clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def section_freezing(run: Run, base: nn.Module) -> None:
    run.report.section(
        "2. Freezing interleaved layers",
        "`lstm1` trains, `lstm2` and the BatchNorm after it are frozen, `linear` trains. A hand-written "
        "freeze (`requires_grad = False`) leaves BatchNorm in train mode, so every forward pass moves its "
        "running statistics; and where gradients are zeroed rather than set to None "
        "(`zero_grad(set_to_none=False)`, the default before PyTorch 2.0), the stale zero gradients let "
        "AdamW's weight decay keep shrinking the \"frozen\" weights. `lw.freeze` clears the gradients and "
        "keeps the frozen norm in eval mode.")
    run.report.code('lw.freeze(model, "lstm2", "norm")')
    epochs = max(1, run.epochs // 2)

    hand = _clone(base)
    hand_opt = torch.optim.AdamW(hand.parameters(), lr=1e-3, weight_decay=0.05)
    train(hand, hand_opt, run.train, 1, seed=run.seed + 1, bar=run.bar, label="2. before freezing (hand-written)",
          set_to_none=False)
    hand_before = {k: v.clone() for k, v in hand.state_dict().items()}
    hand.lstm2.requires_grad_(False)
    hand.norm.requires_grad_(False)
    train(hand, hand_opt, run.train, epochs, seed=run.seed + 2, bar=run.bar, label="2. hand-written freeze",
          set_to_none=False)
    hand_after = hand.state_dict()

    def drift(keys: list[str]) -> float:
        return max((hand_after[k] - hand_before[k]).abs().max().item() for k in keys)

    weights = [n for n, _ in hand.named_parameters() if n.startswith(("lstm2.", "norm."))]
    statistics = ["norm.running_mean", "norm.running_var"]
    weight_drift, stats_drift = drift(weights), drift(statistics)

    model = _clone(base)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    train(model, opt, run.train, 1, seed=run.seed + 1, bar=run.bar, label="2. before freezing (layerwise)")
    frozen_sel = freeze(model, "lstm2", "norm")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run.curves["interleaved freeze"] = train(model, opt, run.train, epochs, seed=run.seed + 2, bar=run.bar,
                                             label="2. training with lstm2 and norm frozen")
    after = model.state_dict()
    frozen_keys = [k for k in before if k.startswith(("lstm2.", "norm."))]
    run.report.table(show(model, opt, quiet=True))
    run.report.say(f"Froze {len(frozen_sel)} tensors ({frozen_sel.numel():,} parameters); trained {epochs} "
                   f"more epoch(s) with AdamW (weight decay 0.05). The hand-written freeze let the frozen "
                   f"weights drift by up to {weight_drift:.2e} and the BatchNorm statistics by {stats_drift:.2e}.")
    run.report.check(f"all {len(frozen_keys)} frozen tensors (LSTM weights and BatchNorm parameters, running "
                     "statistics and counter) are bit-identical after training",
                     all(torch.equal(before[k], after[k]) for k in frozen_keys))
    run.report.check("lstm1 and linear moved", all(not torch.equal(before[k], after[k]) for k in
                                                    ("lstm1.weight_ih_l0", "lstm1.weight_hh_l0", "linear.weight")))
    run.report.check("the hand-written freeze did move the frozen weights and statistics",
                     weight_drift > 0 and stats_drift > 0)
    run.results["freeze_accuracy"] = accuracy(model, run.test)


def section_learning_rates(run: Run, base: nn.Module) -> None:
    run.report.section(
        "3. A learning rate per layer",
        "The LSTMs get a tenth of the head's learning rate. `lw.param_groups` turns rules into param "
        "groups for any optimizer: later rules override earlier ones, biases and norm weights get no "
        "weight decay, every trainable parameter lands in exactly one group.")
    rules = {"**": {"lr": 0.05}, ("lstm1", "lstm2"): {"lr": 0.005}}
    run.report.code('groups = lw.param_groups(model, {"**": {"lr": 0.05}, ("lstm1", "lstm2"): {"lr": 0.005}},\n'
                    '                         weight_decay=1e-4)\noptimizer = torch.optim.SGD(groups)')
    model = _clone(base)
    groups = param_groups(model, rules, weight_decay=1e-4)
    optimizer = torch.optim.SGD(groups)
    run.report.table(show(model, optimizer, quiet=True))

    # One plain SGD step, then read each layer's learning rate back off the update it made.
    batch = next(batches(run.train, 64, torch.Generator().manual_seed(run.seed)))
    F.cross_entropy(model(batch.a, batch.b), batch.y).backward()
    before = {n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters()}
    optimizer.step()
    rows = []
    for group in optimizer.param_groups:
        for name, p in zip(group["names"], group["params"]):
            w, g = before[name]
            effective = ((w - p.detach()).norm() / (g + group["weight_decay"] * w).norm()).item()
            rows.append((name, group["lr"], effective, group["weight_decay"]))
    table = Table(title="learning rate read back from one SGD step: ‖Δw‖ / ‖g + wd·w‖", title_justify="left")
    for header in ("parameter", "lr set", "lr measured", "weight decay"):
        table.add_column(header, justify="left" if header == "parameter" else "right")
    for name, lr, effective, wd in rows:
        table.add_row(name, f"{lr:g}", f"{effective:.6g}", f"{wd:g}")
    run.report.table(table)
    run.report.check("every parameter's measured step size equals its group's lr (to 1e-4)",
                     all(abs(eff - lr) <= 1e-4 * lr for _, lr, eff, _ in rows))
    run.report.check("LSTM parameters train at a tenth of the head's rate",
                     all(lr == (0.005 if n.startswith("lstm") else 0.05) for n, lr, _, _ in rows))
    run.report.check("biases and norm weights have no weight decay",
                     all((wd == 0.0) == (before[n][0].ndim <= 1) for n, _, _, wd in rows))
    run.curves["per-layer lr"] = train(model, optimizer, run.train, max(1, run.epochs // 2), seed=run.seed + 3,
                                       bar=run.bar, label="3. training with per-layer learning rates")
    run.results["per_layer_lr_accuracy"] = accuracy(model, run.test)


def section_averaging(run: Run, base: nn.Module) -> None:
    run.report.section(
        "4. Averaging two fine-tuned models into a third",
        "Two copies of the trained model are fine-tuned on different halves of the data, then averaged "
        "parameter by parameter into a new model. `lw.average` averages floating tensors in float32, "
        "copies integer buffers (BatchNorm's `num_batches_tracked`) instead of averaging them, reports "
        "every key, shape or dtype difference at once, and loads the result strictly. `lw.EMA` keeps a "
        "fused exponential moving average of one run.")
    run.report.code("average = lw.average([model_a, model_b], into=SiameseLSTM())\n"
                    "ema = lw.EMA(model_a, decay=0.95, warmup=20)   # ema.update() after each step\n"
                    "with ema.swapped(model_a):\n    evaluate(model_a)")
    halves = torch.randperm(len(run.train), generator=torch.Generator().manual_seed(run.seed)).chunk(2)
    epochs = max(1, run.epochs // 2)
    tuned, emas = [], []
    for label, half in zip("ab", halves):
        model = _clone(base)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        ema = EMA(model, decay=0.95, warmup=20)
        run.curves[f"fine-tune {label}"] = train(model, optimizer, run.train.subset(half), epochs,
                                                 seed=run.seed + 10 + len(tuned), bar=run.bar,
                                                 label=f"4. fine-tuning copy {label} on half {label}",
                                                 after_step=lambda _, ema=ema: ema.update())
        tuned.append(model)
        emas.append(ema)
    a, b = tuned
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in tuned]
    merged = SiameseLSTM(hidden=base.linear.in_features // 4).to(run.device)
    average([a, b], into=merged)
    with emas[0].swapped(a):
        ema_accuracy = accuracy(a, run.test)
    scores = {"model a": accuracy(a, run.test), "model b": accuracy(b, run.test),
              "average of a and b": accuracy(merged, run.test), "EMA of run a": ema_accuracy}
    table = Table(title="test accuracy", title_justify="left")
    table.add_column("model")
    table.add_column("accuracy", justify="right")
    for name, acc in scores.items():
        table.add_row(name, f"{acc:.1%}")
    run.report.table(table)
    run.results["average_accuracies"] = scores

    sd_a, sd_b, sd_m = a.state_dict(), b.state_dict(), merged.state_dict()
    run.report.check("every floating tensor of the average is the mean of the two",
                     all(torch.allclose(sd_m[k], (sd_a[k] + sd_b[k]) / 2, atol=1e-6)
                         for k in sd_m if sd_m[k].is_floating_point()))
    run.report.check("the integer BatchNorm counter is copied, not averaged",
                     torch.equal(sd_m["norm.num_batches_tracked"], sd_a["norm.num_batches_tracked"]))
    run.report.check("the two parents are unchanged", all(torch.equal(before[i][k], m.state_dict()[k])
                                                           for i, m in enumerate(tuned) for k in before[i]))
    distances = {name: ((sd_a[name] - sd_m[name]).norm() / sd_m[name].norm()).item()
                 for name, _ in merged.named_parameters()}
    _plot_distances(run.report.figure("average_distances.png", "Per-layer relative distance of each parent to "
                                      "the average"), distances)
    run.report.say(f"Largest per-layer relative distance of a parent to the average: "
                   f"{max(distances.values()):.2%} ({max(distances, key=distances.get)}).")


def _plot_distances(path: Path, distances: dict[str, float]) -> None:
    plt = _optional("matplotlib.pyplot")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(distances)
    ax.barh(range(len(names)), [distances[n] for n in names])
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("‖parent − average‖ / ‖average‖  (both parents: equal by symmetry)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section_gradients(run: Run, base: nn.Module) -> None:
    run.report.section(
        "5. Every layer's gradient, by its real name",
        "`model.lstm1.weight.grad` fails: an `nn.LSTM` has no `weight`; its parameters are `weight_ih_l0`, "
        "`weight_hh_l0`, `bias_ih_l0` and `bias_hh_l0`. `lw.grad_stats` reports every layer under its real "
        "name with fused kernels and one transfer to the host; `lw.GradMonitor` does it through training, "
        "hooked on the optimizer, writing to CSV/JSONL/TensorBoard and plotting a heat map.")
    model = _clone(base)
    try:
        grad_stats(model, "lstm1.weight")
    except SelectionError as e:
        run.report.say(f"Asking for `lstm1.weight` says: *{str(e).split(' (Pass')[0]}*")
    batch = next(batches(run.train, 256, torch.Generator().manual_seed(run.seed)))
    F.cross_entropy(model(batch.a, batch.b), batch.y).backward()
    stats = grad_stats(model)
    run.report.table(stats)
    expected = {name: p.grad.norm().item() for name, p in model.named_parameters()}
    run.report.check("every parameter is reported under its real name",
                     [name for name, _ in stats] == list(expected))
    run.report.check("each norm equals p.grad.norm() (to 1e-5)",
                     all(abs(row["norm"] - expected[name]) <= 1e-5 * max(1.0, expected[name]) for name, row in stats))
    run.report.check("lw.check_grads: every gradient is present and finite", check_grads(model).ok)

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    csv_path = run.report.out / "grad_stats.csv"
    with GradMonitor(model, every=5, optimizer=optimizer, sinks=[CSVSink(csv_path)]) as monitor:
        run.curves["monitored"] = train(model, optimizer, run.train, 1, seed=run.seed + 20, bar=run.bar,
                                        label="5. training under a GradMonitor")
        monitor.plot(run.report.figure("grad_norms.png", "Gradient norm of every layer through training (log10)"))
    logged = sorted({row["step"] for row in monitor.history})
    run.report.say(f"The monitor logged steps {logged[0]}, {logged[1]}, ... {logged[-1]} ({len(logged)} log steps, "
                   f"{len(monitor.history)} rows) into `grad_stats.csv` and drew `grad_norms.png`.")
    run.report.check("the monitor logged every 5th optimizer step", logged == list(range(0, monitor.steps, 5)))


def section_surgery(run: Run, base: nn.Module) -> None:
    run.report.section(
        "6. Assigning a gradient to a layer directly, and reshaping gradients",
        "`lw.set_grad` gives a layer the gradient you choose: checked (shape, frozen, finite) before "
        "anything changes, cast and copied, never aliased. `lw.scale_grad` multiplies a layer's gradient "
        "during backward, through tensor hooks, so it composes with gradient accumulation and DDP.")
    run.report.code('lw.set_grad(model, "linear.weight", value)\n'
                    'with lw.scale_grad(model, "lstm1", "lstm2", factor=0.5):\n    loss.backward()')
    model = _clone(base)
    lr = 2.0 ** -4  # a power of two: lr * value is exact, so the update can be compared bit for bit
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    value = torch.linspace(-1, 1, model.linear.weight.numel()).view_as(model.linear.weight)
    optimizer.zero_grad(set_to_none=True)
    set_grad(model, "linear.weight", value)
    before = model.linear.weight.detach().clone()
    optimizer.step()
    run.report.check("after set_grad and one SGD step, linear.weight == w_old - lr * value exactly",
                     torch.equal(model.linear.weight.detach(), before - lr * value))
    run.report.check("no other parameter received a gradient",
                     all(p.grad is None for n, p in model.named_parameters() if n != "linear.weight"))

    batch = next(batches(run.train, 256, torch.Generator().manual_seed(run.seed)))
    model = _clone(base)
    F.cross_entropy(model(batch.a, batch.b), batch.y).backward()
    plain = grad_stats(model, stats="norm").to_dict()
    model.zero_grad()
    with scale_grad(model, "lstm1", "lstm2", factor=0.5):
        F.cross_entropy(model(batch.a, batch.b), batch.y).backward()
    halved = grad_stats(model, stats="norm").to_dict()
    table = Table(title="gradient norm with scale_grad(model, 'lstm1', 'lstm2', factor=0.5)", title_justify="left")
    for header in ("parameter", "plain", "scaled", "ratio"):
        table.add_column(header, justify="left" if header == "parameter" else "right")
    ratios = {}
    for name in plain:
        ratios[name] = halved[name]["norm"] / plain[name]["norm"]
        table.add_row(name, f"{plain[name]['norm']:.4g}", f"{halved[name]['norm']:.4g}", f"{ratios[name]:.4f}")
    run.report.table(table)
    run.report.check("the LSTMs' gradients are halved and the others untouched",
                     all(abs(r - (0.5 if n.startswith("lstm") else 1.0)) < 1e-5 for n, r in ratios.items()))


def run(out: str | Path = "layerwise-demo", *, seed: int = 0, epochs: int = 10, device: str = "cpu",
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
        base = section_sharing(state)
        section_freezing(state, base)
        section_learning_rates(state, base)
        section_averaging(state, base)
        section_gradients(state, base)
        section_surgery(state, base)
    report.lines += ["", "## Training curves", ""]
    _plot_curves(report.figure("training_curves.png", "Training loss of every run"), state.curves)
    path = report.write()
    failed = [label for label, ok in report.checks if not ok]
    console.print(f"\nReport written to [bold]{path}[/] ({time.perf_counter() - started:.0f} s, "
                  f"{len(report.checks) - len(failed)}/{len(report.checks)} checks passed).")
    state.results.update(checks=report.checks, report=str(path))
    if failed:
        raise RuntimeError(f"demo verification failed: {'; '.join(failed)}")
    return state.results
