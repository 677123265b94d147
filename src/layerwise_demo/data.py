"""The demo's data (pairs of scikit-learn digits), model (a Siamese LSTM) and training loop."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from layerwise import MissingExtraError


def optional(module: str, extra: str = "demo") -> Any:
    """Import ``module`` or say which extra brings it."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise MissingExtraError(f"the demo needs {module.split('.')[0]}: pip install 'layerwise[{extra}]'") from None


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
    """Train and test pairs of scikit-learn's bundled digits, drawn from disjoint images.

    Example:
        >>> train, test = digit_pairs(n_train=10, n_test=4)
        >>> train.a.shape, len(test)
        (torch.Size([10, 8, 8]), 4)
    """
    digits = optional("sklearn.datasets").load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=gen)
    cut = int(0.7 * len(images))
    train, test = order[:cut], order[cut:]
    return (_pairs_from(images[train], labels[train], n_train, gen),
            _pairs_from(images[test], labels[test], n_test, gen))


class SiameseLSTM(nn.Module):
    """Two stacked LSTMs encode each image; the same encoder serves both branches of a pair.

    Example:
        >>> net = SiameseLSTM(hidden=4)
        >>> net(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8)).shape
        torch.Size([3, 2])
    """

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
