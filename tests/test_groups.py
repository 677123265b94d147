import io
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import layerwise as lw

from conftest import random_models


def options_of(groups, name):
    for g in groups:
        if name in g["names"]:
            return {k: v for k, v in g.items() if k not in ("params", "names")}
    raise KeyError(name)


def test_rules_cascade_later_rules_override_only_what_they_name(vit):
    groups = lw.param_groups(vit, [
        ("**", {"lr": 1e-3, "betas": (0.9, 0.99)}),
        ("blocks", {"lr": 1e-4}),
        ("blocks.3", {"betas": (0.8, 0.9)}),
    ], no_decay=None)
    assert options_of(groups, "head.weight") == {"lr": 1e-3, "betas": (0.9, 0.99)}
    assert options_of(groups, "blocks.0.attn.weight") == {"lr": 1e-4, "betas": (0.9, 0.99)}
    assert options_of(groups, "blocks.3.attn.weight") == {"lr": 1e-4, "betas": (0.8, 0.9)}
    torch.optim.AdamW(groups, lr=1.0)


def test_equal_options_share_a_group_with_aligned_names(vit):
    groups = lw.param_groups(vit, {"blocks": {"lr": 0.1}}, lr=0.01, no_decay=None)
    assert [g["lr"] for g in groups] == [0.01, 0.1]
    assert groups[0]["names"][:3] == ["cls_token", "patch_embed.weight", "patch_embed.bias"]
    assert groups[0]["names"][-1] == "head.bias"
    for g in groups:
        assert [id(p) for p in g["params"]] == [id(lw.select(vit, n).params()[0]) for n in g["names"]]


def test_frozen_parameters_are_left_out_and_shared_ones_appear_once(tied_lm):
    lw.freeze(tied_lm, "body")
    groups = lw.param_groups(tied_lm, lr=0.1)
    held = [id(p) for g in groups for p in g["params"]]
    assert id(tied_lm.body.weight) not in held and id(tied_lm.body.bias) not in held
    assert held.count(id(tied_lm.embed.weight)) == 1
    torch.optim.SGD(groups)  # torch refuses a parameter in two groups


def test_default_no_decay_covers_1d_and_the_models_own_list(vit):
    groups = lw.param_groups(vit, lr=0.1, weight_decay=0.05)
    assert options_of(groups, "blocks.0.attn.weight")["weight_decay"] == 0.05
    for name in ("blocks.0.attn.bias", "blocks.0.norm.weight", "norm.bias", "cls_token"):
        assert options_of(groups, name)["weight_decay"] == 0.0, name


def test_no_decay_wins_over_rules_and_can_be_replaced_or_turned_off(vit):
    groups = lw.param_groups(vit, {"**": {"weight_decay": 0.1}})
    assert options_of(groups, "head.bias")["weight_decay"] == 0.0
    groups = lw.param_groups(vit, {"**": {"weight_decay": 0.1}}, no_decay=["head"])
    assert options_of(groups, "head.weight")["weight_decay"] == 0.0
    assert options_of(groups, "blocks.0.attn.bias")["weight_decay"] == 0.1
    groups = lw.param_groups(vit, {"**": {"weight_decay": 0.1}}, no_decay=None)
    assert all(g["weight_decay"] == 0.1 for g in groups)


def test_no_decay_without_any_weight_decay_is_explicit_zero(vit):
    # AdamW decays by default (0.01): biases must say 0.0 even if the user never mentioned decay.
    opt = torch.optim.AdamW(lw.param_groups(vit, lr=1e-3))
    by_name = {n: g["weight_decay"] for g in opt.param_groups for n in g["names"]}
    assert by_name["head.bias"] == 0.0 and by_name["head.weight"] == 0.01


@pytest.mark.parametrize("layers", ["blocks.*", "type:Block"])
def test_layer_decay_scales_follow_the_formula(vit, layers):
    d, lr, n_blocks = 0.5, 1.0, 4
    groups = lw.param_groups(vit, lr=lr, layer_decay=d, layers=layers, no_decay=None)
    expected_layer = {"cls_token": 0, "patch_embed.weight": 0, "patch_embed.bias": 0, "norm.weight": 5, "head.bias": 5}
    expected_layer |= {f"blocks.{i}.mlp.0.weight": i + 1 for i in range(n_blocks)}
    for name, layer in expected_layer.items():
        opts = options_of(groups, name)
        assert opts["lr_scale"] == d ** (n_blocks + 1 - layer), name
        assert opts["lr"] == lr * d ** (n_blocks + 1 - layer), name
    assert len(groups) == n_blocks + 2


def test_layer_decay_combines_with_rules(vit):
    groups = lw.param_groups(vit, {"head": {"lr": 10.0}}, lr=1.0, layer_decay=0.5, layers="blocks.*")
    assert options_of(groups, "head.weight")["lr"] == 10.0
    assert options_of(groups, "blocks.0.attn.weight")["lr"] == 0.5 ** 4


def test_layer_decay_bad_arguments(vit):
    with pytest.raises(ValueError, match="both layer_decay"):
        lw.param_groups(vit, lr=1.0, layer_decay=0.5)
    with pytest.raises(lw.SelectionError, match="no numbered blocks"):
        lw.param_groups(vit, lr=1.0, layer_decay=0.5, layers="layers.*")
    with pytest.raises(lw.SelectionError, match="module path pattern"):
        lw.param_groups(vit, lr=1.0, layer_decay=0.5, layers="re:blocks\\.\\d+")
    with pytest.raises(ValueError, match="has none: pass lr"):
        lw.param_groups(vit, layer_decay=0.5, layers="blocks.*")


def test_a_rule_matching_nothing_or_only_frozen(vit):
    with pytest.raises(lw.SelectionError, match="'blokcs'"):
        lw.param_groups(vit, {"blokcs": {"lr": 1.0}})
    lw.freeze(vit, "head")
    with pytest.warns(UserWarning, match="'head' matches only frozen parameters"):
        lw.param_groups(vit, {"head": {"lr": 1.0}})


def test_bad_rules_are_refused(vit):
    with pytest.raises(ValueError, match="rule"):
        lw.param_groups(vit, [("head", 0.1)])
    with pytest.raises(ValueError, match="params"):
        lw.param_groups(vit, {"head": {"params": []}})


def test_verbose_prints_the_groups(vit, capsys):
    lw.param_groups(vit, {"head": {"lr": 0.1}}, lr=0.01, weight_decay=0.05, verbose=True)
    out = capsys.readouterr().out
    assert "param groups" in out and "head.weight" in out and "0.05" in out


def test_show_reports_each_parameters_lr_and_weight_decay(vit):
    opt = torch.optim.AdamW(lw.param_groups(vit, {"head": {"lr": 0.1}}, lr=0.01, weight_decay=0.05))
    rows = {r["name"]: r for r in lw.show(vit, opt, file=io.StringIO())}
    assert rows["head.weight"]["lr"] == 0.1 and rows["head.weight"]["weight_decay"] == 0.05
    assert rows["head.bias"]["weight_decay"] == 0.0 and rows["cls_token"]["lr"] == 0.01


@given(random_models(), st.data())
def test_every_trainable_parameter_lands_in_exactly_one_group(model, data):
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    for name in data.draw(st.lists(st.sampled_from(names), max_size=2)):
        model.get_parameter(name).requires_grad_(False)
    rule_selectors = data.draw(st.lists(st.sampled_from(names + ["**", "!**.weight"]), max_size=4))
    rules = [(s, {"lr": data.draw(st.sampled_from([0.1, 0.2])), "momentum": data.draw(st.sampled_from([0.0, 0.9]))})
             for s in rule_selectors]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = lw.param_groups(model, rules, lr=0.5, weight_decay=0.01)
    held = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(held) == len(set(held)) and set(held) == trainable
    keys = [repr(sorted((k, v) for k, v in g.items() if k not in ("params", "names"))) for g in groups]
    assert len(keys) == len(set(keys)), "groups with equal options are merged"
    if groups:
        torch.optim.SGD(groups)


# --------------------------------------------------------------------------- add_param_group


def test_add_param_group_refuses_a_parameter_twice_naming_its_group(interleaved):
    opt = torch.optim.SGD([{"params": interleaved.lstm1.parameters()}, {"params": interleaved.linear.parameters()}], lr=0.1)
    with pytest.raises(ValueError, match=r"linear.weight is already in param group 1"):
        lw.add_param_group(opt, interleaved, "lstm2", "linear.weight")
    assert len(opt.param_groups) == 2
    group = lw.add_param_group(opt, interleaved, "lstm2", "norm", lr=0.01)
    assert group["lr"] == 0.01 and group["names"][0] == "lstm2.weight_ih_l0"


def test_add_param_group_refuses_only_frozen_and_keeps_torch_names(interleaved):
    lw.freeze(interleaved, "lstm2")
    opt = torch.optim.SGD(list(interleaved.lstm1.named_parameters()), lr=0.1)  # torch's named form
    with pytest.raises(ValueError, match="frozen"):
        lw.add_param_group(opt, interleaved, "lstm2")
    group = lw.add_param_group(opt, interleaved, "linear")
    assert group["param_names"] == ["linear.weight", "linear.bias"]
