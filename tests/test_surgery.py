import copy
import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import layerwise as lw
from layerwise.surgery import GradError, NonFiniteGradError

from conftest import random_models


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


# --------------------------------------------------------------------------- set_grad


def test_sgd_step_after_set_grad_is_exactly_minus_lr_times_value(interleaved):
    lr = 2.0 ** -3  # a power of two: lr * value is exact, so FMA or not, one rounding
    opt = torch.optim.SGD(interleaved.parameters(), lr=lr)
    value = torch.randn(3, 6)
    before = interleaved.linear.weight.detach().clone()
    lw.set_grad(interleaved, "linear.weight", value)
    opt.step()
    assert torch.equal(interleaved.linear.weight.detach(), before - lr * value)


@given(random_models(), st.data())
def test_any_alias_of_every_parameter_gets_its_exact_sgd_update(model, data):
    lr = 2.0 ** -5
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sel = lw.select(model)
    values = {data.draw(st.sampled_from(names)): torch.randn(p.shape) for names, p in zip(sel.aliases(), sel.params())}
    before = [p.detach().clone() for p in sel.params()]
    assert lw.set_grad(model, values) == list(values)
    opt.step()
    for p, old, v in zip(sel.params(), before, values.values()):
        assert torch.equal(p.detach(), old - lr * v)


def test_every_value_form(interleaved, tied_lm):
    assert lw.set_grad(interleaved, "linear", 0.5) == ["linear.weight", "linear.bias"]
    assert torch.equal(interleaved.linear.bias.grad, torch.full((3,), 0.5))

    seen = []

    def value(name, p):
        seen.append(name)
        return torch.arange(p.numel(), dtype=p.dtype).view(p.shape)

    lw.set_grad(interleaved, "lstm2", value)
    assert seen == lw.select(interleaved, "lstm2").names()
    assert torch.equal(interleaved.lstm2.bias_hh_l0.grad, torch.arange(24.0))

    bias = torch.randn(3)
    lw.set_grad(interleaved, "linear", {"linear.weight": torch.ones(3, 6), "linear.bias": bias})
    assert torch.equal(interleaved.linear.bias.grad, bias)

    # The dict alone selects by its keys; a tied parameter answers to any of its names.
    embed = torch.randn(11, 6)
    assert lw.set_grad(tied_lm, {"decoder.weight": embed}) == ["decoder.weight"]
    assert torch.equal(tied_lm.embed.weight.grad, embed)


def test_values_are_cast_and_laid_out_like_the_parameter(convbn):
    convbn.to(memory_format=torch.channels_last)
    weight = convbn.features[0].weight
    lw.set_grad(convbn, "features.0.weight", torch.ones(weight.shape, dtype=torch.float64))
    assert weight.grad.dtype == torch.float32
    assert weight.grad.stride() == weight.stride()


def test_values_are_copied_never_aliased(interleaved):
    value = torch.ones(3, 6)
    lw.set_grad(interleaved, "linear.weight", value)
    value.add_(1)
    assert torch.equal(interleaved.linear.weight.grad, torch.ones(3, 6))

    # A broadcast view (stride 0) would turn the next in-place accumulation into an error.
    lw.set_grad(interleaved, "linear.weight", torch.tensor(2.0).expand(3, 6))
    grad = interleaved.linear.weight.grad
    assert grad.stride() == (6, 1)
    grad.add_(torch.arange(18.0).view(3, 6))
    assert torch.equal(grad[1], torch.arange(6.0, 12.0) + 2)


def test_mode_add_accumulates_like_another_backward(interleaved):
    lw.set_grad(interleaved, "linear.bias", torch.tensor([1.0, 2.0, 3.0]))
    lw.set_grad(interleaved, "linear", 1.0, mode="add")
    assert torch.equal(interleaved.linear.bias.grad, torch.tensor([2.0, 3.0, 4.0]))
    assert torch.equal(interleaved.linear.weight.grad, torch.ones(3, 6))


# Each case: the call's arguments, the exception, and what the message must name.
BAD_SET_GRAD = {
    "wrong shape": (("linear", lambda name, p: torch.zeros(2, 2) if name == "linear.bias" else torch.zeros(p.shape)), {},
                    GradError, ["linear.bias", "(3,)", "(2, 2)"]),
    "not a tensor": (("linear.bias", [1.0, 2.0, 3.0]), {}, GradError, ["linear.bias", "list"]),
    "non-finite": (({"linear.bias": torch.tensor([0.0, math.inf, 0.0]), "linear.weight": torch.zeros(3, 6)},), {},
                   NonFiniteGradError, ["linear.bias", "allow_nonfinite=True"]),
    "unknown names": (({"linear.wieght": torch.zeros(3, 6), "lstm9": torch.zeros(1), "linear.bias": torch.zeros(3)},), {},
                      lw.SelectionError, ["'linear.wieght'", "linear.weight", "'lstm9'"]),
    "key outside the selector": (("linear", {"linear.weight": torch.zeros(3, 6), "linear.bias": torch.zeros(3),
                                             "lstm1.bias_ih_l0": torch.zeros(24)}), {},
                                 lw.SelectionError, ["'lstm1.bias_ih_l0'", "selected by 'linear'"]),
    "selected without a value": (("linear", {"linear.weight": torch.zeros(3, 6)}), {}, GradError, ["no value for linear.bias"]),
    "bad mode": (("linear", 1.0), {"mode": "sum"}, GradError, ["'replace' or 'add'"]),
    "no value": (("linear",), {}, GradError, ["set_grad(model, selector, value)"]),
    "dict and a value": (({"linear.bias": torch.zeros(3)}, 1.0), {}, GradError, ["no separate value"]),
}


@pytest.mark.parametrize("case", BAD_SET_GRAD)
def test_bad_values_name_the_culprit_and_change_nothing(case, interleaved):
    args, kwargs, error, named = BAD_SET_GRAD[case]
    backward_interleaved(interleaved)
    before = grads_of(interleaved)
    with pytest.raises(error) as e:
        lw.set_grad(interleaved, *args, **kwargs)
    for text in named:
        assert text in str(e.value)
    assert_same_grads(interleaved, before)


def test_frozen_parameters_need_allow_frozen(interleaved):
    interleaved.lstm2.requires_grad_(False)
    with pytest.raises(GradError, match="frozen .*: lstm2.weight_ih_l0, .*lstm2.bias_hh_l0; .*allow_frozen=True"):
        lw.set_grad(interleaved, "**", 1.0)
    assert all(p.grad is None for p in interleaved.parameters())
    lw.set_grad(interleaved, "lstm2", 1.0, allow_frozen=True)
    assert torch.equal(interleaved.lstm2.bias_ih_l0.grad, torch.ones(24))


def test_nonfinite_values_need_allow_nonfinite(interleaved):
    assert isinstance(NonFiniteGradError("x"), FloatingPointError)
    lw.set_grad(interleaved, "linear.bias", float("nan"), allow_nonfinite=True)
    assert interleaved.linear.bias.grad.isnan().all()


def test_two_names_of_one_tied_parameter_are_one_value_too_many(tied_lm):
    with pytest.raises(GradError, match="'embed.weight' and 'decoder.weight' name one tied parameter"):
        lw.set_grad(tied_lm, {"embed.weight": torch.zeros(11, 6), "decoder.weight": torch.ones(11, 6)})
    assert tied_lm.embed.weight.grad is None


# --------------------------------------------------------------------------- hooks


def test_scale_grad_equals_a_manual_multiply(siamese):
    a, b = torch.randn(2, 3, 8, 8).unbind()
    plain = copy.deepcopy(siamese)
    plain(a, b).sum().backward()
    with lw.scale_grad(siamese, "lstm1", "linear.bias", factor=0.3):
        siamese(a, b).sum().backward()
    for (name, p), (_, q) in zip(siamese.named_parameters(), plain.named_parameters()):
        factor = 0.3 if name.startswith("lstm1") or name == "linear.bias" else 1.0
        assert torch.equal(p.grad, q.grad * factor) if factor != 1.0 else torch.equal(p.grad, q.grad), name


def test_a_parameter_used_twice_is_hooked_once_and_called_once_per_backward(siamese, tied_lm):
    calls = []
    with lw.grad_hook(siamese, "lstm1.weight_ih_l0", fn=lambda name, grad: calls.append(name)):
        siamese(*torch.randn(2, 3, 8, 8).unbind()).sum().backward()  # the encoder runs on both inputs
    assert calls == ["lstm1.weight_ih_l0"]

    with lw.grad_hook(tied_lm, "embed", "decoder.weight", fn=lambda name, grad: calls.append(name)) as hooks:
        tied_lm(torch.tensor([[1, 2, 3]])).sum().backward()
    assert hooks.names == ["embed.weight"]
    assert calls[1:] == ["embed.weight"]


def test_hook_result_replaces_the_gradient_and_none_keeps_it(interleaved):
    with lw.grad_hook(interleaved, "linear", fn=lambda name, grad: torch.zeros_like(grad) if name == "linear.bias" else None):
        backward_interleaved(interleaved)
    assert torch.equal(interleaved.linear.bias.grad, torch.zeros(3))
    assert interleaved.linear.weight.grad.abs().sum() > 0


def test_factor_can_change_between_steps(interleaved):
    plain = copy.deepcopy(interleaved)
    backward_interleaved(plain)
    scale = lw.scale_grad(interleaved, "linear", factor=0.5)
    backward_interleaved(interleaved)
    scale.factor = 2.0
    interleaved.zero_grad()
    backward_interleaved(interleaved)
    assert torch.equal(interleaved.linear.weight.grad, 2.0 * plain.linear.weight.grad)
    scale.remove()


def test_removed_hooks_leave_training_bit_identical(interleaved):
    never = copy.deepcopy(interleaved)
    hooks = lw.scale_grad(interleaved, factor=0.5)
    with lw.grad_hook(interleaved, "lstm2", fn=lambda name, grad: grad * 3):
        backward_interleaved(interleaved)
    hooks.remove()
    hooks.remove()  # a second remove is a no-op
    assert repr(hooks) == "GradScale(12 parameters, removed)"
    backward_interleaved(never)  # the same forward, for the same normalization statistics
    for model in (interleaved, never):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for step in range(3):
            opt.zero_grad()
            backward_interleaved(model, seed=step)
            opt.step()
    for (name, a), b in zip(interleaved.state_dict().items(), never.state_dict().values()):
        assert torch.equal(a, b), name


def test_frozen_parameters_get_no_hook(interleaved):
    interleaved.lstm2.requires_grad_(False)
    with lw.scale_grad(interleaved, "lstm1", "lstm2", factor=0.5) as scale:
        assert scale.names == lw.select(interleaved, "lstm1").names()
    with pytest.raises(GradError, match="every selected parameter is frozen.*lstm2.weight_ih_l0"):
        lw.scale_grad(interleaved, "lstm2", factor=0.5)


# --------------------------------------------------------------------------- clipping


def test_per_selection_is_torch_clip_grad_norm_exactly(vit):
    reference = copy.deepcopy(vit)
    for norm_type, foreach in [(2.0, None), (math.inf, False), (1.0, True)]:
        random_grads(vit, scale=10.0)
        random_grads(reference, scale=10.0)
        norms = lw.clip_grad_norm(vit, 1.0, norm_type=norm_type, foreach=foreach)
        total = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0, norm_type=norm_type, foreach=foreach)
        assert list(norms) == ["total"] and torch.equal(norms["total"], total)
        for p, q in zip(vit.parameters(), reference.parameters()):
            assert torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
@pytest.mark.parametrize("foreach", [None, False])
def test_per_layer_clips_each_layer_like_torch_on_that_layer(vit, norm_type, foreach):
    random_grads(vit)
    vit.blocks[0].mlp[0].weight.grad *= 100  # one layer far above max_norm, most below
    reference = copy_with_grads(vit)
    before = grads_of(vit)
    norms = lw.clip_grad_norm(vit, 5.0, per="layer", norm_type=norm_type, foreach=foreach)
    layers = list(dict.fromkeys(name.rpartition(".")[0] for name, _ in vit.named_parameters()))
    assert list(norms) == layers
    for layer in layers:
        module = reference.get_submodule(layer)
        expected = torch.nn.utils.clip_grad_norm_(module.parameters(recurse=False), 5.0, norm_type=norm_type)
        torch.testing.assert_close(norms[layer], expected, rtol=1e-6, atol=0)
        for name, p in vit.get_submodule(layer).named_parameters(recurse=False):
            full = f"{layer}.{name}" if layer else name
            if expected <= 5.0:
                assert torch.equal(p.grad, before[full]), full  # left bit-identical
            torch.testing.assert_close(p.grad, getattr(module, name).grad, rtol=1e-6, atol=0)
    assert norms["blocks.0.mlp.0"] > 5.0 and torch.linalg.vector_norm(vit.blocks[0].mlp[0].weight.grad, norm_type) <= 5.0


def test_per_layer_skips_parameters_without_a_gradient(interleaved):
    lw.set_grad(interleaved, "linear.weight", 3.0)
    norms = lw.clip_grad_norm(interleaved, 1.0, "lstm1", "linear", per="layer")
    assert list(norms) == ["lstm1", "linear"]
    assert norms["lstm1"] == 0 and interleaved.linear.bias.grad is None
    torch.testing.assert_close(interleaved.linear.weight.grad.norm(), torch.tensor(1.0))


def test_per_group_clips_each_param_group_like_torch(vit):
    opt = torch.optim.SGD([{"params": vit.blocks.parameters()},
                           {"params": [p for n, p in vit.named_parameters() if not n.startswith("blocks.")], "lr": 0.1}], lr=0.01)
    random_grads(vit, scale=3.0)
    reference = copy_with_grads(vit)
    ref_opt = torch.optim.SGD([{"params": reference.blocks.parameters()},
                               {"params": [p for n, p in reference.named_parameters() if not n.startswith("blocks.")]}], lr=0.01)
    norms = lw.clip_grad_norm(vit, 2.0, per="group", optimizer=opt)
    assert list(norms) == [0, 1]
    for g, group in enumerate(ref_opt.param_groups):
        assert torch.equal(norms[g], torch.nn.utils.clip_grad_norm_(group["params"], 2.0))
    for p, q in zip(vit.parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_per_group_needs_the_optimizer_holding_the_gradients(vit):
    random_grads(vit)
    before = grads_of(vit)
    opt = torch.optim.SGD(vit.blocks.parameters(), lr=0.1)
    with pytest.raises(GradError, match="pass optimizer="):
        lw.clip_grad_norm(vit, 1.0, per="group")
    with pytest.raises(GradError, match="cls_token, patch_embed.weight, .* are in no param group"):
        lw.clip_grad_norm(vit, 1.0, per="group", optimizer=opt)
    with pytest.raises(GradError, match="only with per='group'"):
        lw.clip_grad_norm(vit, 1.0, optimizer=opt)
    with pytest.raises(GradError, match="per must be"):
        lw.clip_grad_norm(vit, 1.0, per="module")
    assert_same_grads(vit, before)
    assert list(lw.clip_grad_norm(vit, 1.0, "blocks", per="group", optimizer=opt)) == [0]


@pytest.mark.parametrize("per", ["layer", "selection", "group"])
def test_error_if_nonfinite_names_the_layer_and_changes_nothing(per, interleaved):
    backward_interleaved(interleaved)
    interleaved.lstm2.weight_hh_l0.grad[0, 0] = math.nan
    before = grads_of(interleaved)
    opt = torch.optim.SGD(interleaved.parameters(), lr=0.1) if per == "group" else None
    with pytest.raises(NonFiniteGradError) as e:
        lw.clip_grad_norm(interleaved, 1.0, per=per, optimizer=opt, error_if_nonfinite=True)
    assert "'lstm2'" in str(e.value) and "lstm1" not in str(e.value) and "error_if_nonfinite=False" in str(e.value)
    assert_same_grads(interleaved, before)


@given(random_models(), st.integers(0, 2 ** 16), st.floats(1e-3, 1e3), st.sampled_from([2.0, 1.0, math.inf]))
def test_per_layer_norms_end_at_most_max_norm_and_no_gradient_grows(model, seed, max_norm, norm_type):
    random_grads(model, scale=float(torch.empty(()).log_normal_(0, 3, generator=torch.Generator().manual_seed(seed))), seed=seed)
    before = {name: p.grad.clone() for name, p in model.named_parameters()}
    lw.clip_grad_norm(model, max_norm, per="layer", norm_type=norm_type)
    layers: dict[str, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        layers.setdefault(name.rpartition(".")[0], []).append(p.grad)
        # Clipping only shrinks: each gradient is its old self times one factor in [0, 1].
        assert (p.grad.abs() <= before[name].abs()).all()
        assert (p.grad * before[name] >= 0).all()
    for grads in layers.values():
        norm = torch.nn.utils.get_total_norm(grads, norm_type)
        assert norm <= max_norm * (1 + 1e-5)


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


# --------------------------------------------------------------------------- PCGrad


class TwoTasks(nn.Module):
    """A trunk both losses reach, and a head only the second reaches: gradients set by hand."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Parameter(torch.zeros(2))
        self.head = nn.Parameter(torch.zeros(1))

    def losses(self, g1: list[float], g2: list[float], head: float = 0.0) -> list[torch.Tensor]:
        return [self.trunk @ torch.tensor(g1), self.trunk @ torch.tensor(g2) + head * self.head.sum()]


@pytest.mark.parametrize("reduction, expected", [("mean", [0.25, 0.75]), ("sum", [0.5, 1.5])])
def test_pcgrad_projects_two_conflicting_gradients(reduction, expected):
    # g1 = (1, 0), g2 = (-1, 1) conflict (g1 . g2 = -1):
    # g1 -> g1 - (-1 / |g2|^2) g2 = (0.5, 0.5) and g2 -> g2 - (-1 / |g1|^2) g1 = (0, 1).
    model = TwoTasks()
    lw.pcgrad(model.losses([1.0, 0.0], [-1.0, 1.0]), model, "trunk", reduction=reduction)
    assert torch.equal(model.trunk.grad, torch.tensor(expected))


def test_pcgrad_leaves_agreeing_gradients_alone():
    model = TwoTasks()
    lw.pcgrad(model.losses([1.0, 2.0], [3.0, -1.0]), model, "trunk", reduction="sum")
    assert torch.equal(model.trunk.grad, torch.tensor([4.0, 1.0]))


def test_pcgrad_a_parameter_one_loss_does_not_reach_is_zero_for_that_loss():
    # Over (trunk, head): g1 = (1, 0, 0) does not reach the head, g2 = (-1, 0, 1); g1 . g2 = -1.
    # g1 -> g1 + g2 / 2 = (0.5, 0, 0.5) and g2 -> g2 + g1 = (0, 0, 1).
    # The trunk (both reach it) gets the mean, the head (only loss 1 reaches it) the sum.
    model = TwoTasks()
    lw.pcgrad(model.losses([1.0, 0.0], [-1.0, 0.0], head=1.0), model)
    assert torch.equal(model.trunk.grad, torch.tensor([0.25, 0.0]))
    assert torch.equal(model.head.grad, torch.tensor([1.5]))


def test_pcgrad_outside_the_selection_is_the_plain_sum():
    model = TwoTasks()
    # On the trunk alone, g1 = (1, 0) and g2 = (-1, 0) cancel each other completely.
    lw.pcgrad(model.losses([1.0, 0.0], [-1.0, 0.0], head=3.0), model, "trunk")
    assert torch.equal(model.trunk.grad, torch.zeros(2))
    assert torch.equal(model.head.grad, torch.tensor([3.0]))


def _reference_pcgrad(grads: list[torch.Tensor], orders: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """Yu et al.'s algorithm written out directly, with the order of the other tasks given."""
    projected = []
    for i, order in enumerate(orders):
        g = grads[i].clone()
        for j in order:
            dot = g @ grads[j]
            if dot < 0:
                g -= dot / grads[j].square().sum() * grads[j]
        projected.append(g)
    return torch.stack(projected).mean(0)


def test_pcgrad_matches_the_direct_algorithm_in_one_of_the_random_orders():
    torch.manual_seed(0)
    net = nn.Linear(6, 1, bias=False)
    inputs = torch.randn(3, 6, dtype=torch.float64)
    inputs[2] = -inputs[0] - inputs[1]  # make the three tasks conflict
    net.double()
    results = []
    for seed in (0, 0, 1):
        lw.pcgrad([net(x).sum() for x in inputs], net, generator=torch.Generator().manual_seed(seed))
        results.append(net.weight.grad.flatten())
    assert torch.equal(results[0], results[1])  # seeded: reproducible
    candidates = [_reference_pcgrad(list(inputs), orders) for orders in itertools.product(
        *[list(itertools.permutations([j for j in range(3) if j != i])) for i in range(3)])]
    for result in results:
        assert any(torch.allclose(result, c, rtol=1e-12, atol=1e-12) for c in candidates)
    assert len({tuple(c.tolist()) for c in candidates}) > 1  # the order matters here


@given(st.integers(1, 8), st.integers(0, 2 ** 16))
def test_pcgrad_of_two_tasks_conflicts_with_neither(dim, seed):
    # Projected on each other's normal plane, the summed update has g_i . update >= 0 for
    # both tasks (Cauchy-Schwarz): to first order, neither loss goes up.
    g1, g2 = torch.randn(2, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    w = nn.Parameter(torch.zeros(dim, dtype=torch.float64))
    lw.pcgrad([w @ g1, w @ g2], nn.ParameterList([w]), reduction="sum")
    for g in (g1, g2):
        assert w.grad @ g >= -1e-12 * g1.norm() * g2.norm()


def test_pcgrad_other_parameters_get_the_gradient_of_the_summed_losses(vit):
    x = torch.randn(4, 5, 12)
    plain = copy.deepcopy(vit)
    plain(x)[:, 0].sum().backward()
    plain(x)[:, 1].sum().backward()
    out = vit(x)
    lw.pcgrad([out[:, 0].sum(), out[:, 1].sum()], vit, "blocks.3")
    for (name, p), q in zip(vit.named_parameters(), plain.parameters()):
        if not name.startswith("blocks.3"):
            torch.testing.assert_close(p.grad, q.grad)


def test_pcgrad_bad_losses_are_named_and_change_nothing():
    model = TwoTasks()
    with pytest.raises(GradError, match="two losses or more, got 1"):
        lw.pcgrad(model.losses([1.0, 0.0], [0.0, 1.0])[:1], model)
    with pytest.raises(GradError, match="loss 1 reaches none of the selected parameters \\('trunk'\\)"):
        lw.pcgrad([model.trunk.sum(), model.head.sum()], model, "trunk")
    with pytest.raises(GradError, match="loss 0 does not require grad"):
        lw.pcgrad([torch.tensor(1.0), model.head.sum()], model)
    with pytest.raises(GradError, match="loss 1 must be a one-element tensor, got shape \\(2,\\)"):
        lw.pcgrad([model.head.sum(), model.trunk * 2], model)
    assert model.trunk.grad is None and model.head.grad is None


# --------------------------------------------------------------------------- DDP


class TwoBranches(nn.Module):
    """Branch ``a`` reaches only loss a, branch ``b`` only loss b."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
        self.b = nn.Linear(4, 1)

    def forward(self, x):
        return self.a(x), self.b(x)


def _ddp_scale_grad_vs_scaled_branch_loss(rank: int, world_size: int) -> dict[str, list[torch.Tensor]]:
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = DistributedDataParallel(TwoBranches())
    x, y = torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(rank)).unbind()  # each rank its own data

    def backward(scale_loss: float) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        out_a, out_b = model(x)
        (scale_loss * (out_a - y[:, :1]).square().mean() + (out_b - y[:, 1:2]).square().mean()).backward()
        return [p.grad.clone() for p in model.parameters()]

    with lw.scale_grad(model, "module.a", factor=0.25):
        hooked = backward(1.0)
    scaled_loss = backward(0.25)
    local = copy.deepcopy(model.module)
    out_a, out_b = local(x)
    ((out_a - y[:, :1]).square().mean() + (out_b - y[:, 1:2]).square().mean()).backward()
    return {"hooked": hooked, "scaled_loss": scaled_loss, "local": [p.grad for p in local.parameters()]}


def test_scale_grad_under_ddp_equals_scaling_the_branch_loss_on_every_rank(run_ranks):
    ranks = run_ranks(_ddp_scale_grad_vs_scaled_branch_loss)
    for result in ranks:
        for hooked, scaled in zip(result["hooked"], result["scaled_loss"]):
            assert torch.equal(hooked, scaled)
    for g0, g1 in zip(ranks[0]["hooked"], ranks[1]["hooked"]):
        assert torch.equal(g0, g1)  # all-reduced: the same on both ranks
    assert not torch.equal(ranks[0]["local"][0], ranks[1]["local"][0])  # though their data differ


def test_set_grad_replaces_an_existing_gradient_in_place():
    net = nn.Linear(2, 1)
    net(torch.ones(1, 2)).sum().backward()
    held = net.weight.grad  # e.g. a DDP bucket view
    lw.set_grad(net, "weight", torch.tensor([[3.0, 4.0]]))
    assert net.weight.grad is held and held.tolist() == [[3.0, 4.0]]


def test_an_empty_model_is_named_in_the_error():
    with pytest.raises(lw.GradError, match="Sequential has no parameter"):
        lw.clip_grad_norm(nn.Sequential(), 1.0)
