"""Section 4: averaging two fine-tuned models into a third, and why it works (linear mode connectivity)."""

from __future__ import annotations

import torch
from rich.table import Table
from torch import nn

import layerwise as lw

from .data import SiameseLSTM, accuracy, train
from .report import plot_connectivity
from .sections import Run, clone

ALPHAS = [i / 10 for i in range(11)]


def averaging(run: Run, base: nn.Module) -> None:
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
        model = clone(base)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        ema = lw.EMA(model, decay=0.95, warmup=20)
        run.curves[f"fine-tune {label}"] = (run.base_steps, train(
            model, optimizer, run.train.subset(half), epochs, seed=run.seed + 10 + len(tuned), bar=run.bar,
            label=f"4. fine-tuning copy {label} on half {label}", after_step=lambda _, ema=ema: ema.update()))
        tuned.append(model)
        emas.append(ema)
    a, b = tuned
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in tuned]
    merged = SiameseLSTM(hidden=base.linear.in_features // 4).to(run.device)
    lw.average([a, b], into=merged)
    with emas[0].swapped(a):
        ema_accuracy = accuracy(a, run.test)
    scores = {"model a": accuracy(a, run.test), "model b": accuracy(b, run.test),
              "average of a and b": accuracy(merged, run.test), "EMA of run a": ema_accuracy,
              "base (before fine-tuning)": accuracy(base, run.test)}
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

    # Linear mode connectivity: fine-tunes of one base stay in one basin, so every point on the
    # straight line between them is a good model; the average (α = ½) sits in the middle of it.
    probe = SiameseLSTM(hidden=base.linear.in_features // 4).to(run.device)
    line = []
    for alpha in ALPHAS:
        lw.average([a, b], weights=[1 - alpha, alpha], into=probe)
        line.append(accuracy(probe, run.test))
    run.results["connectivity"] = dict(zip(ALPHAS, line))
    plot_connectivity(run.report.figure("connectivity.png", "Test accuracy along the straight line from a "
                                        "through their average to b"), ALPHAS, line,
                      {"base": scores["base (before fine-tuning)"]})
    worst = min(line)
    run.report.say(f"Along the line from a to b the test accuracy never falls below {worst:.1%} (a {line[0]:.1%}, "
                   f"average {line[5]:.1%}, b {line[-1]:.1%}): the two fine-tunes lie in one basin of the loss, "
                   "which is why their average is a good model rather than a broken one. Two models trained "
                   "from different initializations would show a dip in the middle.")
    run.report.check("the endpoints of the line are models a and b",
                     line[0] == scores["model a"] and line[-1] == scores["model b"])
