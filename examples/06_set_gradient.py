"""Assigning a gradient to a layer directly; scaling, clipping and reversing gradients per layer.

Run: python examples/06_set_gradient.py
"""

import torch
from torch import nn

import layerwise as lw

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
lr = 0.125
optimizer = torch.optim.SGD(model.parameters(), lr=lr)

# Give one layer the gradient you choose: checked, cast, copied (never aliased).
value = torch.randn(2, 8)
lw.set_grad(model, "2.weight", value)
before = model[2].weight.detach().clone()
optimizer.step()
assert torch.equal(model[2].weight.detach(), before - lr * value)
print("SGD moved 2.weight by exactly -lr * value")

# Errors say what is wrong, and nothing is changed.
try:
    lw.set_grad(model, "2.weight", torch.zeros(8, 2))
except lw.GradError as e:
    print(e)

# Halve the first layer's gradient during backward (composes with accumulation and DDP).
x = torch.randn(16, 4)
with lw.scale_grad(model, "0", factor=0.5):
    model(x).sum().backward()
print({n: round(r["norm"], 4) for n, r in lw.grad_stats(model, stats="norm")})

# Clip each layer on its own; the norms before clipping come back by layer.
print(lw.clip_grad_norm(model, max_norm=0.1, per="layer"))

# Gradient reversal (domain-adversarial training): identity forward, -alpha * gradient backward.
features = torch.randn(3, 4, requires_grad=True)
lw.GradReverse(alpha=0.3)(features).sum().backward()
assert torch.allclose(features.grad, torch.full((3, 4), -0.3))

# PCGrad: two task losses whose gradients conflict are projected before they are combined.
optimizer.zero_grad()
out = model(x)
lw.pcgrad([out[:, 0].mean(), -out[:, 0].mean() + out[:, 1].mean()], model, "0")
print("pcgrad wrote", [n for n, p in model.named_parameters() if p.grad is not None])
