"""Averaging two trained models into a third, merge methods, EMA, and streaming file merges.

Run: python examples/04_averaging.py
"""

import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import layerwise as lw


def make():
    return nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 2))


def fit(model, seed, ema=None):
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(50):
        x = torch.randn(64, 8, generator=gen)
        loss = F.cross_entropy(model(x), (x[:, 0] > 0).long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.update()


torch.manual_seed(0)
start = make()
a, b = make(), make()
a.load_state_dict(start.state_dict())
b.load_state_dict(start.state_dict())
ema = lw.EMA(a, decay=0.9, warmup=10)
fit(a, seed=1, ema=ema)
fit(b, seed=2)

third = make()
lw.average([a, b], into=third)  # float tensors averaged in float32; num_batches_tracked copied
assert torch.allclose(third[0].weight, (a[0].weight + b[0].weight) / 2)
ties = lw.merge(start, [a, b], "ties", density=0.5)  # mergekit's methods: `layerwise merge --help` lists them
# Any option may vary by layer: a gradient over the layer index, {filter, value} rules, or {selector: value}.
slerp = lw.merge(None, [a, b], "slerp", t=[0.2, 0.8])  # t = 0.2 at the first layer, 0.8 at the last
stock = lw.merge(start, [a, b], "model_stock")  # how far to move from start: from the angle between a and b
dare = lw.merge(start, [a, b], "dare_ties", density={"0": 0.3, "3": 0.9}, seed=0)  # keep 30 % of layer 0's changes
assert torch.equal(dare["1.num_batches_tracked"], start[1].num_batches_tracked)  # integer buffers are copied
with ema.swapped(a):
    print("EMA weight norm", a[0].weight.norm().item())

with tempfile.TemporaryDirectory() as folder:
    paths = [lw.save(m, Path(folder) / f"{n}.safetensors") for n, m in (("a", a), ("b", b))]
    out = lw.merge_files(paths, Path(folder) / "avg.safetensors")  # streams: a few tensors in memory
    assert all(torch.equal(lw.load(out)[k], v) for k, v in third.state_dict().items())
    diff = lw.diff_files(paths[0], out)
    diff.print()
