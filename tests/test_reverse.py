import copy

import pytest
import torch
from torch import nn

import layerwise as lw

# --------------------------------------------------------------------------- gradient reversal


def test_grad_reverse_is_identity_forward_and_minus_alpha_backward():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(4, 3, dtype=torch.float64)
    y = lw.grad_reverse(x, 0.7)
    assert torch.equal(y, x)
    (grad,) = torch.autograd.grad(y, x, v)
    assert torch.equal(grad, -0.7 * v)
    # gradcheck compares the backward with the forward's numerical Jacobian. Adding
    # -(1 + alpha) x with no gradient makes that Jacobian -alpha * I, so it passes only if
    # the backward multiplies by exactly -alpha.
    for alpha in (1.0, 0.25, 3.0):
        assert torch.autograd.gradcheck(lambda t, a=alpha: lw.grad_reverse(t, a) - (1 + a) * t.detach(), (x,))


def test_grad_reverse_module_alpha_takes_effect_at_the_next_forward():
    reverse = lw.GradReverse()
    x = torch.randn(5, requires_grad=True)
    reverse(x).sum().backward()
    assert torch.equal(x.grad, -torch.ones(5))
    reverse.alpha = 0.5
    x.grad = None
    reverse(x).sum().backward()
    assert torch.equal(x.grad, torch.full((5,), -0.5))
    assert repr(reverse) == "GradReverse(alpha=0.5)"


def test_grad_reverse_in_a_network_flips_only_the_layers_before_it():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), lw.GradReverse(alpha=2.0), nn.Linear(4, 1))
    plain = copy.deepcopy(net)
    plain[1] = nn.Identity()
    x = torch.randn(6, 3)
    net(x).square().sum().backward()
    plain(x).square().sum().backward()
    assert torch.equal(net[2].weight.grad, plain[2].weight.grad)
    assert torch.equal(net[0].weight.grad, -2.0 * plain[0].weight.grad)




def test_grad_reverse_alpha_is_a_buffer_outside_the_state_dict():
    reverse = lw.GradReverse(alpha=0.5)
    assert reverse.state_dict() == {} and reverse.alpha == 0.5
    reverse.double()
    reverse.alpha = 3.0
    x = torch.ones(2, dtype=torch.float64, requires_grad=True)
    reverse(x).sum().backward()
    assert x.grad.tolist() == [-3.0, -3.0] and repr(reverse) == "GradReverse(alpha=3)"


def test_a_bad_alpha_is_refused_by_name():
    with pytest.raises(lw.OptionTypeError, match="GradReverse: alpha must be a real number"):
        lw.GradReverse(alpha="1")
    reverse = lw.GradReverse()
    with pytest.raises(lw.OptionError, match="alpha must be finite"):
        reverse.alpha = float("nan")
    assert reverse.alpha == 1.0


@pytest.mark.parametrize("x, alpha, error, message", [
    (torch.ones(2), "1", lw.OptionTypeError, "grad_reverse: alpha must be a real number"),
    (torch.ones(2), float("nan"), lw.OptionError, "grad_reverse: alpha must be finite"),  # nan gradients before
    (torch.ones(2), torch.ones(2), lw.OptionTypeError, "one-element real tensor"),
    ([1.0, 2.0], 1.0, lw.OptionTypeError, "grad_reverse takes a tensor, got list"),
])
def test_the_function_refuses_a_bad_alpha_or_input_when_called_not_inside_backward(x, alpha, error, message):
    with pytest.raises(error, match=message):
        lw.grad_reverse(x.requires_grad_() if isinstance(x, torch.Tensor) else x, alpha)
    y = torch.ones(2, requires_grad=True)
    lw.grad_reverse(y, torch.tensor(0.5)).sum().backward()  # a 0-d tensor alpha, as GradReverse passes
    assert y.grad.tolist() == [-0.5, -0.5]
