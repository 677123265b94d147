"""Every layer's gradient by its real name: statistics, a monitor through training, NaN hunting.

Run: python examples/05_gradients.py
"""

import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import layerwise as lw

torch.manual_seed(0)
model = nn.Sequential(nn.LSTM(4, 16, batch_first=True), nn.Linear(16, 3))
forward = lambda x: model[1](model[0](x)[0][:, -1])  # noqa: E731

try:  # model[0].weight.grad does not exist: an LSTM's weights are weight_ih_l0, weight_hh_l0, ...
    lw.grad_stats(model, "0.weight")
except lw.SelectionError as e:
    print(e)

x, y = torch.randn(32, 10, 4), torch.randint(0, 3, (32,))
F.cross_entropy(forward(x), y).backward()
stats = lw.grad_stats(model)  # fused kernels, one transfer to the host
stats.print()
assert abs(stats["0.weight_hh_l0"]["norm"] - model[0].weight_hh_l0.grad.norm().item()) < 1e-5
lw.grad_stats(model, by="module").print()

optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
with tempfile.TemporaryDirectory() as folder:
    sinks = [lw.CSVSink(Path(folder) / "grads.csv")]
    with lw.GradMonitor(model, every=10, optimizer=optimizer, sinks=sinks) as monitor:
        for _ in range(50):
            optimizer.zero_grad()
            F.cross_entropy(forward(torch.randn(32, 10, 4)), torch.randint(0, 3, (32,))).backward()
            optimizer.step()
        monitor.plot(Path(folder) / "grads.png")
    print(len(monitor.history), "rows, e.g.", monitor.history[-1])

# A NaN in backward: the error names the first layer whose gradient went non-finite.
with lw.watch_nonfinite(model):
    try:
        F.cross_entropy(forward(torch.full((2, 10, 4), float("nan"))), torch.zeros(2, dtype=torch.long)).backward()
    except lw.NonFiniteGradError as e:
        print("caught:", e.names[0])
