"""A learning rate (and weight decay) per layer, and layer-wise LR decay, as param groups.

Run: python examples/03_per_layer_lr.py
"""

import torch
from torch import nn

import layerwise as lw

torch.manual_seed(0)
model = nn.ModuleDict({
    "embed": nn.Embedding(100, 32),
    "layers": nn.ModuleList(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True) for _ in range(4)),
    "norm": nn.LayerNorm(32),
    "head": nn.Linear(32, 5),
})

# Rules cascade: later rules override only the options they name. Biases and norm weights
# get no weight decay; every trainable parameter lands in exactly one group.
groups = lw.param_groups(model, {"**": {"lr": 1e-3}, "head": {"lr": 1e-2}}, weight_decay=0.05, verbose=True)
optimizer = torch.optim.AdamW(groups)

# Layer-wise LR decay (BEiT/ELECTRA/timm): layer i of L gets lr * d ** (L + 1 - i); the embedding
# is layer 0, the final norm closes the last block, the head is L + 1. Each group's lr already holds
# its scale (no lr_scale key), so torch's schedulers and timm's both give every layer its intended lr.
decayed = lw.param_groups(model, lr=1e-3, weight_decay=0.05, layer_decay=0.5, layers="layers.*")
for g in decayed:
    print(f"lr {g['lr']:.2e} wd {g['weight_decay']:<5} {g['names'][0]} ...")

# The per-parameter view: group, lr and weight decay of every layer.
optimizer = torch.optim.AdamW(decayed)
lw.show(model, optimizer, "layers.0.**", "head")
assert sorted({g["lr"] for g in decayed}) == [1e-3 * 0.5 ** k for k in reversed(range(6))]

# A scheduler scales each group from its own lr: after 2 steps every layer is at 0.9 ** 2 of its rate.
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.9 ** step)
for _ in range(2):
    optimizer.step()
    scheduler.step()
assert all(abs(g["lr"] - g["initial_lr"] * 0.81) < 1e-15 for g in optimizer.param_groups)

# lw.audit names what is wrong with a set-up, with the fix. Here the groups are built the timm/MAE
# way (lr_scale in each group, one lr for all) under a torch scheduler, which never reads lr_scale:
# every layer would train at the head's rate.
timm_style = [{"params": g["params"], "weight_decay": g["weight_decay"], "lr_scale": g["initial_lr"] / 1e-3}
              for g in decayed]
opt = torch.optim.AdamW(timm_style, lr=1e-3)
findings = lw.audit(model, opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10))
print(findings)
assert [f.check for f in findings] == ["lr-scale-ignored"]
assert lw.audit(model, optimizer, scheduler) == []  # layerwise's groups: nothing to report
