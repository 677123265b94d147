"""Freezing interleaved layers so that nothing moves them: not AdamW, not weight decay, not BatchNorm.

Run: python examples/02_freezing.py
"""

import torch
import torch.nn.functional as F
from torch import nn

import layerwise as lw


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm1 = nn.LSTM(4, 16, batch_first=True)
        self.lstm2 = nn.LSTM(16, 16, batch_first=True)
        self.norm = nn.BatchNorm1d(16)
        self.linear = nn.Linear(16, 3)

    def forward(self, x):
        h, _ = self.lstm1(x)
        h, _ = self.lstm2(h)
        return self.linear(self.norm(h[:, -1]))


def train(model, optimizer, steps):
    model.train()
    for _ in range(steps):
        x, y = torch.randn(32, 10, 4), torch.randint(0, 3, (32,))
        optimizer.zero_grad(set_to_none=False)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


torch.manual_seed(0)
model = Net()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
train(model, optimizer, 5)  # gradients, Adam moments and BatchNorm statistics now exist

lw.freeze(model, "lstm2", "norm")  # lstm1 and linear keep training
before = {k: v.clone() for k, v in model.state_dict().items()}
train(model, optimizer, 20)
after = model.state_dict()
for key in before:
    moved = not torch.equal(before[key], after[key])
    print(f"{key:24} {'moved' if moved else 'bit-identical'}")
    assert moved == key.startswith(("lstm1.", "linear."))

# Unfreeze on a schedule, adding the layer to the live optimizer once.
schedule = lw.GradualUnfreeze(model, optimizer, {2: "lstm2"}, lr=1e-3)
print("epoch 2 unfreezes:", schedule.step(2))
lw.show(model, optimizer)
