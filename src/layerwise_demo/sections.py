"""Sections 1–3: sharing one encoder between two branches, freezing interleaved layers, an lr per layer."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from rich.table import Table
from torch import nn

import layerwise as lw

from .data import Pairs, SiameseLSTM, accuracy, batches, train
from .report import Report


@dataclass
class Run:
    report: Report
    train: Pairs
    test: Pairs
    seed: int
    epochs: int
    device: torch.device
    bar: Any
    base_steps: int = 0  # optimizer steps of the base model, where the runs built on it start
    curves: dict[str, tuple[int, list[float]]] = field(default_factory=dict)  # label: (first step, losses)
    results: dict[str, Any] = field(default_factory=dict)

    def steps_per_epoch(self, n: int | None = None, batch_size: int = 64) -> int:
        return -(-(len(self.train) if n is None else n) // batch_size)


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def sharing(run: Run) -> SiameseLSTM:
    run.report.section(
        "1. Weight sharing: one encoder, two branches",
        "A Siamese network calls the same LSTMs on both images of a pair. Autograd adds the two "
        "branches' gradients into the one set of weights; `lw.show(model, optimizer, inputs=...)` "
        "lists each parameter once and counts how often its module runs per forward.")
    torch.manual_seed(run.seed)
    model = SiameseLSTM().to(run.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = train(model, optimizer, run.train, run.epochs, seed=run.seed, bar=run.bar,
                   label="1. training the Siamese LSTM")
    run.curves["base model"] = (0, losses)
    run.base_steps = len(losses)
    acc = accuracy(model, run.test)
    run.results["base_accuracy"] = acc
    run.report.say(f"Trained {run.epochs} epochs on {len(run.train):,} pairs: test accuracy {acc:.1%} "
                   f"(chance 50%).")
    sample = (run.test.a[:2], run.test.b[:2])
    rows = lw.show(model, optimizer, inputs=sample, quiet=True)
    run.report.table(rows)
    lstm_rows = [r for r in rows if r["name"].startswith(("lstm1.", "lstm2."))]
    lstm_tensors = len(list(model.lstm1.parameters())) + len(list(model.lstm2.parameters()))
    run.report.check("each LSTM parameter appears once in the table", len({r["name"] for r in lstm_rows}) == lstm_tensors)
    run.report.check("each LSTM runs twice per forward (used by both branches)", all(r["calls"] == 2 for r in lstm_rows))
    run.report.check("the head runs once per forward", all(r["calls"] == 1 for r in rows if r["name"].startswith("linear.")))
    return model


def freezing(run: Run, base: nn.Module) -> None:
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

    hand = clone(base)
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
    weight_drift, stats_drift = drift(weights), drift(["norm.running_mean", "norm.running_var"])

    model = clone(base)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    train(model, opt, run.train, 1, seed=run.seed + 1, bar=run.bar, label="2. before freezing (layerwise)")
    frozen_sel = lw.freeze(model, "lstm2", "norm")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run.curves["interleaved freeze"] = (run.base_steps + run.steps_per_epoch(), train(
        model, opt, run.train, epochs, seed=run.seed + 2, bar=run.bar, label="2. training with lstm2 and norm frozen"))
    after = model.state_dict()
    frozen_keys = [k for k in before if k.startswith(("lstm2.", "norm."))]
    run.report.table(lw.show(model, opt, quiet=True))
    run.report.say("The frozen rows stay in the optimizer's group, so the table shows that group's lr and weight "
                   "decay; they get no gradient, so the optimizer skips them: neither applies to them.")
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


def learning_rates(run: Run, base: nn.Module) -> None:
    run.report.section(
        "3. A learning rate per layer",
        "The LSTMs get a tenth of the head's learning rate. `lw.param_groups` turns rules into param "
        "groups for any optimizer: later rules override earlier ones, biases and norm weights get no "
        "weight decay, every trainable parameter lands in exactly one group.")
    rules = {"**": {"lr": 0.05}, ("lstm1", "lstm2"): {"lr": 0.005}}
    run.report.code('groups = lw.param_groups(model, {"**": {"lr": 0.05}, ("lstm1", "lstm2"): {"lr": 0.005}},\n'
                    '                         weight_decay=1e-4)\noptimizer = torch.optim.SGD(groups)')
    model = clone(base)
    optimizer = torch.optim.SGD(lw.param_groups(model, rules, weight_decay=1e-4))
    run.report.table(lw.show(model, optimizer, quiet=True))

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
    run.curves["per-layer lr"] = (run.base_steps + 1, train(
        model, optimizer, run.train, max(1, run.epochs // 2), seed=run.seed + 3, bar=run.bar,
        label="3. training with per-layer learning rates"))
    run.results["per_layer_lr_accuracy"] = accuracy(model, run.test)
