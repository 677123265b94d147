import pytest
import torch
from torch import nn

import layerwise as lw


def test_tie_makes_one_parameter_and_training_keeps_it_one(tied_lm):
    untied = type(tied_lm)()
    untied.decoder.weight = nn.Parameter(untied.decoder.weight.detach().clone())
    assert lw.shared(untied) == []
    assert lw.tie(untied, "decoder.weight", "embed.weight") == ["decoder.weight"]
    assert untied.decoder.weight is untied.embed.weight
    opt = torch.optim.SGD(untied.parameters(), lr=0.1)
    untied(torch.tensor([[1, 2, 3]])).sum().backward()
    opt.step()
    assert untied.decoder.weight is untied.embed.weight
    assert lw.shared(untied) == [["embed.weight", "decoder.weight"]]


def test_tie_two_modules_ties_each_parameter():
    net = nn.ModuleDict({"left": nn.LSTM(3, 4), "right": nn.LSTM(3, 4)})
    tied = lw.tie(net, "right", "left")
    assert tied == [f"right.{n}" for n, _ in net["left"].named_parameters()]
    for (_, a), (_, b) in zip(net["left"].named_parameters(), net["right"].named_parameters()):
        assert a is b
    # The LSTM's own list of weights follows, so forward uses the tied ones.
    x = torch.randn(5, 2, 3)
    assert torch.equal(net["left"](x)[0], net["right"](x)[0])


def test_tie_mismatched_shapes_names_both_and_changes_nothing():
    net = nn.ModuleDict({"a": nn.Linear(3, 4), "b": nn.Linear(4, 3)})
    before = {n: p for n, p in net.named_parameters()}
    with pytest.raises(lw.SelectionError) as e:
        lw.tie(net, "b.weight", "a.weight")
    assert "b.weight" in str(e.value) and "a.weight" in str(e.value)
    assert "(3, 4)" in str(e.value) and "(4, 3)" in str(e.value)
    assert {n: p for n, p in net.named_parameters()} == before


def test_tie_modules_reports_every_mismatch_and_changes_nothing():
    net = nn.ModuleDict({"a": nn.Linear(3, 4), "b": nn.Linear(3, 5)})
    with pytest.raises(lw.SelectionError) as e:
        lw.tie(net, "b", "a")
    assert "b.weight" in str(e.value) and "b.bias" in str(e.value)
    assert net["b"].weight.shape == (5, 3)


def test_tie_unknown_names_suggests_real_ones(tied_lm):
    with pytest.raises(lw.SelectionError) as e:
        lw.tie(tied_lm, "decoder.wieght", "embed.weight")
    assert "'decoder.wieght'" in str(e.value) and "decoder.weight" in str(e.value)


@pytest.mark.parametrize("target, source", [(5, "embed.weight"), ("decoder.weight", None), (["decoder"], "embed")])
def test_tie_names_a_name_that_is_not_a_string(tied_lm, target, source):
    what = "target" if not isinstance(target, str) else "source"
    with pytest.raises(lw.OptionTypeError, match=f"tie: {what} is a parameter name or module path"):
        lw.tie(tied_lm, target, source)


def test_tie_dtype_mismatch_is_refused():
    net = nn.ModuleDict({"a": nn.Linear(3, 3), "b": nn.Linear(3, 3).double()})
    with pytest.raises(lw.SelectionError, match="dtype"):
        lw.tie(net, "b.weight", "a.weight")


def test_shared_finds_a_module_registered_twice():
    net = nn.Module()
    net.left = nn.Linear(2, 2)
    net.right = net.left
    assert lw.shared(net) == [["left.weight", "right.weight"], ["left.bias", "right.bias"]]
