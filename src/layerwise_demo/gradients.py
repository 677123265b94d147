"""Sections 5 and 6: every layer's gradient by its real name, and assigning or reshaping gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from rich.table import Table
from torch import nn

import layerwise as lw

from .data import batches, train
from .report import ROLLUP_ABOVE, plot_grad_heatmap
from .sections import Run, clone


def gradients(run: Run, base: nn.Module) -> None:
    run.report.section(
        "5. Every layer's gradient, by its real name",
        "`model.lstm1.weight.grad` fails: an `nn.LSTM` has no `weight`; its parameters are `weight_ih_l0`, "
        "`weight_hh_l0`, `bias_ih_l0` and `bias_hh_l0`. `lw.grad_stats` reports every layer under its real "
        "name with fused kernels and one transfer to the host; `lw.GradMonitor` does it through training, "
        "hooked on the optimizer, writing to CSV/JSONL/TensorBoard.")
    model = clone(base)
    try:
        lw.grad_stats(model, "lstm1.weight")
    except lw.SelectionError as e:
        run.report.say(f"Asking for `lstm1.weight` says: *{str(e).split(' (Pass')[0]}*")
    batch = next(batches(run.train, 256, torch.Generator().manual_seed(run.seed)))
    F.cross_entropy(model(batch.a, batch.b), batch.y).backward()
    stats = lw.grad_stats(model)
    run.report.table(stats)
    expected = {name: p.grad.norm().item() for name, p in model.named_parameters()}
    run.report.check("every parameter is reported under its real name", [name for name, _ in stats] == list(expected))
    run.report.check("each norm equals p.grad.norm() (to 1e-5)",
                     all(abs(row["norm"] - expected[name]) <= 1e-5 * max(1.0, expected[name]) for name, row in stats))
    run.report.check("lw.check_grads: every gradient is present and finite", lw.check_grads(model).ok)

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with lw.GradMonitor(model, every=5, optimizer=optimizer, sinks=[lw.CSVSink(run.report.out / "grad_stats.csv")]
                        ) as monitor:
        monitor.steps = run.base_steps  # number the steps as the base model's training continued
        run.curves["monitored"] = (run.base_steps, train(model, optimizer, run.train, 1, seed=run.seed + 20,
                                                         bar=run.bar, label="5. training under a GradMonitor"))
    history = monitor.history
    plot_grad_heatmap(run.report.figure("grad_norms.png", "Gradient norm of every layer through training (log10)"),
                      history)
    logged = sorted({row["step"] for row in history})
    run.report.say(f"The monitor logged steps {logged[0]}, {logged[1]}, ... {logged[-1]} ({len(logged)} log steps, "
                   f"{len(history)} rows) into `grad_stats.csv`; `grad_norms.png` draws them as a heat map, "
                   f"one row per tensor (per module for models of more than {ROLLUP_ABOVE} tensors).")
    run.report.check("the monitor logged every 5th optimizer step",
                     logged == [s for s in range(run.base_steps, monitor.steps) if s % 5 == 0])


def surgery(run: Run, base: nn.Module) -> None:
    run.report.section(
        "6. Assigning a gradient to a layer directly, and reshaping gradients",
        "`lw.set_grad` gives a layer the gradient you choose: checked (shape, frozen, finite) before "
        "anything changes, cast and copied, never aliased. `lw.scale_grad` multiplies a layer's gradient "
        "during backward, through tensor hooks, so it composes with gradient accumulation and DDP.")
    run.report.code('lw.set_grad(model, "linear.weight", value)\n'
                    'with lw.scale_grad(model, "lstm1", "lstm2", factor=0.5):\n    loss.backward()')
    model = clone(base)
    lr = 2.0 ** -4  # a power of two: lr * value is exact, so the update can be compared bit for bit
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    value = torch.linspace(-1, 1, model.linear.weight.numel()).view_as(model.linear.weight)
    optimizer.zero_grad(set_to_none=True)
    lw.set_grad(model, "linear.weight", value)
    before = model.linear.weight.detach().clone()
    optimizer.step()
    run.report.check("after set_grad and one SGD step, linear.weight == w_old - lr * value exactly",
                     torch.equal(model.linear.weight.detach(), before - lr * value))
    run.report.check("no other parameter received a gradient",
                     all(p.grad is None for n, p in model.named_parameters() if n != "linear.weight"))

    batch = next(batches(run.train, 256, torch.Generator().manual_seed(run.seed)))
    model = clone(base)
    F.cross_entropy(model(batch.a, batch.b), batch.y).backward()
    plain = lw.grad_stats(model, stats="norm").to_dict()
    model.zero_grad()
    with lw.scale_grad(model, "lstm1", "lstm2", factor=0.5):
        F.cross_entropy(model(batch.a, batch.b), batch.y).backward()
    halved = lw.grad_stats(model, stats="norm").to_dict()
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
