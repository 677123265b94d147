import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import layerwise as lw
from _surgery_helpers import assert_same_grads, backward_interleaved, grads_of
from layerwise.errors import GradError, NonFiniteGradError

from conftest import random_models

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


@pytest.mark.parametrize("mode", ["replace", "add"])
def test_set_grad_over_a_sparse_gradient_gives_the_dense_result(mode):
    emb = nn.Embedding(4, 2, sparse=True)
    emb(torch.tensor([1, 1, 3])).sum().backward()
    before = emb.weight.grad.to_dense()
    lw.set_grad(emb, "weight", torch.full((4, 2), 0.5), mode=mode)
    expected = torch.full((4, 2), 0.5) + (before if mode == "add" else 0)
    assert emb.weight.grad.layout == torch.strided and torch.equal(emb.weight.grad, expected)


def test_an_empty_model_is_named_in_the_error():
    with pytest.raises(lw.GradError, match="Sequential has no parameter"):
        lw.clip_grad_norm(nn.Sequential(), 1.0)


def test_a_complex_value_for_a_real_parameter_is_refused_and_changes_nothing(interleaved):
    backward_interleaved(interleaved)
    before = grads_of(interleaved)
    with pytest.raises(GradError, match="value for linear.bias is complex but linear.bias is torch.float32"):
        lw.set_grad(interleaved, "linear.bias", torch.ones(3, dtype=torch.complex64))
    with pytest.raises(GradError, match="value for linear.bias is complex"):
        lw.set_grad(interleaved, "linear.bias", 1 + 2j)
    assert_same_grads(interleaved, before)
    z = nn.Parameter(torch.zeros(2, dtype=torch.complex64))
    holder = nn.Module()
    holder.z = z
    lw.set_grad(holder, "z", torch.tensor([1 + 2j, 3j]))  # a complex parameter takes it
    assert z.grad.tolist() == [1 + 2j, 3j]


@pytest.mark.parametrize("factor, error", [("0.5", lw.OptionTypeError), (None, lw.OptionTypeError),
                                           (math.nan, lw.OptionError), (math.inf, lw.OptionError)])
def test_a_bad_scale_factor_is_refused_when_given_not_inside_backward(interleaved, factor, error):
    with pytest.raises(error, match="scale_grad: factor must be"):
        lw.scale_grad(interleaved, "linear", factor=factor)
    handle = lw.scale_grad(interleaved, "linear", factor=0.5)
    with pytest.raises(error, match="scale_grad: factor must be"):
        handle.factor = factor
    backward_interleaved(interleaved)
    handle.remove()
    assert interleaved.linear.bias.grad.isfinite().all()


def test_grad_hook_needs_a_callable(interleaved):
    with pytest.raises(lw.OptionTypeError, match="fn must be a callable"):
        lw.grad_hook(interleaved, "linear", fn="clamp")


@pytest.mark.parametrize("result, got", [(lambda g: g.sum(), r"shape \(\)"), (lambda g: "clamped", "a str")])
def test_a_hook_result_of_the_wrong_kind_is_named_with_its_parameter(result, got):
    net = nn.Linear(2, 1)
    hooks = lw.grad_hook(net, "weight", fn=lambda name, grad: result(grad))
    with pytest.raises(lw.GradError, match=rf"grad_hook: fn returned {got} for 'weight'; return a tensor of the "
                                           r"gradient's shape \(1, 2\)"):
        net(torch.ones(1, 2)).sum().backward()
    hooks.remove()


@pytest.mark.parametrize("flag", ["allow_frozen", "allow_nonfinite"])
def test_set_grad_flags_are_bools_not_truthy_words(interleaved, flag):
    lw.freeze(interleaved, "linear")
    with pytest.raises(lw.OptionTypeError, match=f"set_grad: {flag}='no': pass True or False"):
        lw.set_grad(interleaved, "linear", float("nan"), **{flag: "no"})
    assert interleaved.linear.weight.grad is None


# --------------------------------------------------------------------------- FSDP2


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)  # (3, 6) and (6, 6) weights: uneven and even shards over two ranks
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))


def _batch(rank: int | None, world_size: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch, or the rank's share of it: FSDP2 averages the ranks' gradients, as one process over all."""
    x, y = torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), torch.randn(8, 3)
    if rank is None:
        return x, y
    n = len(x) // world_size
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


def _surgery_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[list, list]:
    """scale_grad (a schedule), grad_hook and set_grad over three backward passes, then the hooks removed."""
    def full(t):
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    seen: list[str] = []
    scale = lw.scale_grad(model, "2", factor=0.5)
    hooks = lw.grad_hook(model, "4.weight", fn=lambda name, grad: seen.append(name) or grad.clamp(-0.01, 0.01))
    tripled = lw.scale_grad(model[4], "bias", factor=3.0)  # a submodule inside the root's fully_shard unit
    grads = []
    for step in range(3):
        scale.factor = 0.5 / (step + 1)
        model.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        lw.set_grad(model, "0.bias", torch.arange(6.0) * step, mode="add")
        lw.set_grad(model, {"2.bias": torch.arange(6.0) - 2})
        grads.append({name: full(p.grad).clone() for name, p in model.named_parameters()})
    scale.remove(), hooks.remove(), tripled.remove()
    model.zero_grad(set_to_none=True)
    nn.functional.mse_loss(model(x), y).backward()
    grads.append({name: full(p.grad).clone() for name, p in model.named_parameters()})
    return grads, seen


def _fsdp_surgery(rank: int, world_size: int) -> list:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    results = []
    for reshard in (True, False):
        model = _mlp()
        mesh = init_device_mesh("cpu", (world_size,))
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
        results.append(_surgery_steps(model, *_batch(rank, world_size)))
    return results


def test_grad_hooks_and_set_grad_on_fsdp2_equal_one_process_over_the_global_batch(run_ranks):
    # The hooks used to sit on the sharded parameters, which autograd never reaches under FSDP2:
    # scale_grad and grad_hook silently did nothing; set_grad raised torch's mixed Tensor/DTensor error.
    want, want_seen = _surgery_steps(_mlp(), *_batch(None))
    for rank in run_ranks(_fsdp_surgery):
        for grads, seen in rank:  # reshard_after_forward True, then False
            assert seen == ["4.weight"] * 3 and want_seen == seen  # once per backward, local gradient
            for step, (got, expected) in enumerate(zip(grads, want)):
                for name, grad in expected.items():
                    if name == "4.weight" and step < 3:
                        # clamped before the reduction, as under DDP: each rank's clamped local gradient, averaged
                        assert got[name].abs().max() <= 0.01 + 1e-7, step
                        continue
                    torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6, msg=f"step {step} {name}")


@pytest.mark.parametrize("value", [0.5, torch.ones(2, 3)])
def test_set_grad_names_a_parameter_on_the_meta_device(value):
    net = torch.nn.Linear(3, 2, device="meta")
    with pytest.raises(lw.GradError, match=r"set_grad changed nothing: weight is on the meta device; materialize"):
        lw.set_grad(net, "weight", value)  # NotImplementedError: Cannot copy out of meta tensor
    assert net.weight.grad is None
