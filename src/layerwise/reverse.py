"""Gradient reversal (domain-adversarial training): identity forward, ``-alpha`` times the gradient backward."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import OptionTypeError
from .surgery import finite_real

__all__ = ["GradReverse", "grad_reverse"]


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(x: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, float | torch.Tensor], output: torch.Tensor) -> None:
        ctx.alpha = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * -ctx.alpha, None


def grad_reverse(x: torch.Tensor, alpha: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Identity in the forward pass; multiplies the gradient by ``-alpha`` in the backward pass.

    The gradient reversal layer of domain-adversarial training (Ganin & Lempitsky, 2015): the
    features before it learn to fool the domain classifier after it. The output is a view
    of ``x``; clone it before changing it in place. Under ``torch.compile`` a float ``alpha`` is
    a constant of the graph (a new value recompiles); a 0-d tensor is an input (no recompile).

    Example:
        >>> import layerwise as lw, torch
        >>> x = torch.ones(3, requires_grad=True)
        >>> lw.grad_reverse(x, alpha=0.5).sum().backward()
        >>> x.grad
        tensor([-0.5000, -0.5000, -0.5000])
    """
    # Checked here: inside backward a bad alpha would give nan gradients or a raw torch error.
    if not isinstance(x, torch.Tensor):
        raise OptionTypeError(f"grad_reverse takes a tensor, got {type(x).__name__}")
    if not isinstance(alpha, torch.Tensor):
        alpha = finite_real("grad_reverse", "alpha", alpha)
    elif alpha.numel() != 1 or alpha.is_complex():
        raise OptionTypeError(f"grad_reverse: alpha must be a real number or a one-element real tensor, "
                              f"got a {alpha.dtype} tensor of shape {tuple(alpha.shape)}")
    return _GradReverse.apply(x, alpha)


class GradReverse(nn.Module):
    """:func:`grad_reverse` as a module; set ``alpha`` between steps for a schedule.

    ``alpha`` lives in a 0-d buffer (not saved in the state dict), so a compiled model sees
    each new value without recompiling; the buffer follows the model in ``.to()``.

    Example:
        >>> import layerwise as lw, torch
        >>> reverse = lw.GradReverse(alpha=1.0)
        >>> reverse.alpha = 2.0  # e.g. DANN's 2 / (1 + exp(-10 p)) - 1, updated each step
        >>> x = torch.ones(2, requires_grad=True)
        >>> reverse(x).sum().backward()
        >>> x.grad, reverse
        (tensor([-2., -2.]), GradReverse(alpha=2))
    """

    _alpha: torch.Tensor

    def __init__(self, alpha: float = 1.0):
        super().__init__()
        self.register_buffer("_alpha", torch.tensor(finite_real("GradReverse", "alpha", alpha)), persistent=False)

    @property
    def alpha(self) -> float:
        return self._alpha.item()

    @alpha.setter
    def alpha(self, value: float) -> None:
        with torch.no_grad():
            self._alpha.fill_(finite_real("GradReverse", "alpha", value))  # in place: a compiled graph reads the buffer, it does not guard on it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grad_reverse(x, self._alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}"
