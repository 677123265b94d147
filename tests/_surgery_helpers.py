"""Gradient helpers shared by the surgery, clipping and PCGrad tests."""

import copy

import torch
from torch import nn


def grads_of(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def assert_same_grads(model: nn.Module, before: dict[str, torch.Tensor | None]) -> None:
    for name, grad in grads_of(model).items():
        assert (grad is None) == (before[name] is None), name
        if grad is not None:
            torch.testing.assert_close(grad, before[name], rtol=0, atol=0, equal_nan=True, msg=name)


def random_grads(model: nn.Module, scale: float = 1.0, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * scale


def copy_with_grads(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model)  # deepcopy leaves .grad behind
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = None if p.grad is None else p.grad.clone()
    return twin


def backward_interleaved(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    model(torch.randn(5, 7, 4, generator=gen)).square().mean().backward()
