"""Weight sharing: one LSTM used by two branches (a Siamese network), and tied weights.

Run: python examples/01_weight_sharing.py
"""

import tempfile
from pathlib import Path

import torch
from torch import nn

import layerwise as lw
from layerwise_demo import SiameseLSTM

torch.manual_seed(0)
model = SiameseLSTM(hidden=16)
a, b = torch.randn(4, 8, 8), torch.randn(4, 8, 8)

# The table lists each parameter once and counts how often its module runs per forward.
rows = lw.show(model, None, inputs=(a, b))
assert all(r["calls"] == 2 for r in rows if r["name"].startswith("lstm"))

# Autograd adds both branches' gradients into the one set of weights.
model(a, b).sum().backward()
grad = model.lstm1.weight_ih_l0.grad.clone()
print(f"lstm1.weight_ih_l0 gets one gradient from both branches, norm {grad.norm():.4f}")


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.decoder = nn.Linear(16, 50, bias=False)
        lw.tie(self, "decoder.weight", "embed.weight")  # one Parameter, two names

    def forward(self, tokens):
        return self.decoder(self.embed(tokens))


lm = TinyLM()
print("shared:", lw.shared(lm))

# safetensors refuses shared tensors; lw.save stores the tensor once and records the alias,
# so the loaded state dict is tied again and loads strictly.
with tempfile.TemporaryDirectory() as folder:
    path = lw.save(lm, Path(folder) / "lm.safetensors")
    state = lw.load(path, into=TinyLM())
    assert state["decoder.weight"] is state["embed.weight"]
    print("stored once, loaded tied:", state["decoder.weight"] is state["embed.weight"])
