import io
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import layerwise as lw

from conftest import TimmConvNeXt, TimmResNet, TimmRuleScheduler, TimmViT, random_models


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
    # Embeddings 0, blocks 1..4, the final norm closes block 4 (timm's MATCH_PREV_GROUP), the head 5.
    expected_layer = {"cls_token": 0, "patch_embed.weight": 0, "patch_embed.bias": 0, "norm.weight": 4,
                      "norm.bias": 4, "head.weight": 5, "head.bias": 5}
    expected_layer |= {f"blocks.{i}.mlp.0.weight": i + 1 for i in range(n_blocks)}
    for name, layer in expected_layer.items():
        opts = options_of(groups, name)
        assert opts["lr"] == lr * d ** (n_blocks + 1 - layer), name
        assert "lr_scale" not in opts, "lr holds the scale; an lr_scale too would be applied twice by timm"
    assert len(groups) == n_blocks + 2


def test_layer_decay_combines_with_rules(vit):
    groups = lw.param_groups(vit, {"head": {"lr": 10.0}}, lr=1.0, layer_decay=0.5, layers="blocks.*")
    assert options_of(groups, "head.weight")["lr"] == 10.0
    assert options_of(groups, "blocks.0.attn.weight")["lr"] == 0.5 ** 4


def test_layer_decay_bad_arguments(vit):
    with pytest.raises(lw.OptionError, match="pass layers=.*TinyViT has no timm-style group_matcher"):
        lw.param_groups(vit, lr=1.0, layer_decay=0.5)
    with pytest.raises(lw.OptionError, match="give the factor too"):
        lw.param_groups(vit, lr=1.0, layers="blocks.*")
    with pytest.raises(lw.SelectionError, match="no numbered blocks"):
        lw.param_groups(vit, lr=1.0, layer_decay=0.5, layers="layers.*")
    with pytest.raises(lw.SelectionError, match="module path pattern"):
        lw.param_groups(vit, lr=1.0, layer_decay=0.5, layers="re:blocks\\.\\d+")
    with pytest.raises(lw.OptionError, match="has none: pass lr"):
        lw.param_groups(vit, layer_decay=0.5, layers="blocks.*")
    for bad in (0, 0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(lw.OptionError, match=r"layer_decay=.*\(0, 1\]"):
            lw.param_groups(vit, lr=1.0, layer_decay=bad, layers="blocks.*")
    for bad in ("0.75", True, None.__class__):
        with pytest.raises(lw.OptionTypeError, match="layer_decay"):
            lw.param_groups(vit, lr=1.0, layer_decay=bad, layers="blocks.*")


# --------------------------------------------------------------------------- timm's group_matcher


def layer_of(groups, lr=1.0, d=0.5):
    """Layer distance from the top of every parameter, read back from its group's lr."""
    import math
    return {n: round(math.log(g["lr"] / lr, d)) for g in groups for n in g["names"]}


def _vit_layer(name):
    if name.split(".")[0] in ("cls_token", "reg_token", "pos_embed", "patch_embed"):
        return 0
    return int(name.split(".")[1]) + 1 if name.startswith("blocks.") else 3 if name.startswith("norm.") else 4


def _resnet_layer(name):
    if name.startswith("layer"):  # layer1.0.bn1 is block 1, although the stem's regex names bn1
        stage, block = name[5:].split(".")[:2]
        return 2 * (int(stage) - 1) + int(block) + 1
    return 5 if name.startswith("fc.") else 0


def _convnext_layer(name):
    parts = name.split(".")
    if parts[0] == "stages":  # stage s: its downsample shares an id with its block 0
        return 2 * int(parts[1]) + (int(parts[3]) if parts[2] == "blocks" else 0) + 1
    return {"stem": 0, "norm_pre": 4, "head": 5}[parts[0]]


# Written by hand from timm's rules (timm.models._manipulate.group_with_matcher): ordinals
# (group, *regex groups, *suffix) sorted, a trailing 99999 joins the group before, unmatched names last.
TIMM_LAYERS = {TimmViT: (_vit_layer, 4), TimmResNet: (_resnet_layer, 5), TimmConvNeXt: (_convnext_layer, 5)}


@pytest.mark.parametrize("cls", [TimmViT, TimmResNet, TimmConvNeXt], ids=lambda c: c.__name__)
def test_group_matcher_numbers_layers_as_timm_on_every_parameter(cls):
    model = cls()
    groups = lw.param_groups(model, lr=1.0, layer_decay=0.5, no_decay=None)  # no layers=: group_matcher
    layer, top = TIMM_LAYERS[cls]
    assert layer_of(groups) == {n: top - layer(n) for n, _ in model.named_parameters()}


class _MatcherViT(TimmViT):
    def __init__(self, spec):
        super().__init__()
        self.spec = spec

    def group_matcher(self, coarse: bool = False):
        return self.spec


@pytest.mark.parametrize("form", ["compiled", "callable"])
def test_group_matcher_in_timms_other_forms_numbers_layers_as_timm(form):
    # timm's group_with_matcher also takes the compiled rules [(regex, prefix, suffix)] and a callable name -> ordinal
    import re
    rules = [(re.compile(r"^cls_token|reg_token|pos_embed|patch_embed"), (0,), None),
             (re.compile(r"^blocks\.(\d+)"), (1,), None), (re.compile(r"^norm"), (1,), (99999,))]
    spec = rules if form == "compiled" else lambda n: next(
        (p + tuple(map(int, m.groups())) + (s or ()) for r, p, s in rules if (m := r.match(n))), (float("inf"),))
    model = _MatcherViT(spec)
    groups = lw.param_groups(model, lr=1.0, layer_decay=0.5, no_decay=None)
    assert layer_of(groups) == {n: 4 - _vit_layer(n) for n, _ in model.named_parameters()}


@pytest.mark.parametrize("spec, message", [
    (None, r"returned NoneType None; timm's form is a dict"),
    (r"^blocks", r"returned str '\^blocks'; timm's form is a dict"),
    (dict(stem="^cls_token(", blocks=r"^blocks\.(\d+)"), "a rule's pattern is not a regular expression"),
    (dict(blocks=[r"^blocks\.(\d+)"]), r"a group's list holds \(regex, suffix\) pairs"),
    (dict(blocks=r"^(blocks)\.(\d+)"), r"gives 'blocks.0.norm.weight' the ordinal \(0, 'blocks', '0'\); layer decay sorts numbers"),
    (lambda name: None, r"gives 'cls_token' the ordinal \(None,\)"),
])
def test_a_group_matcher_timm_could_not_sort_is_named(spec, message):
    with pytest.raises(lw.OptionError, match=r"_MatcherViT.group_matcher\(\):? " + message):
        lw.param_groups(_MatcherViT(spec), lr=1.0, layer_decay=0.5)


@pytest.mark.parametrize(("cls", "layers"), [(TimmViT, "blocks.*"), (TimmConvNeXt, "stages.*.blocks.*")],
                         ids=["vit", "convnext"])
def test_block_pattern_numbers_a_timm_model_as_its_group_matcher(cls, layers):
    # Between blocks (a stage's downsample) is the next block's layer; the final norm is the blocks'
    # container's sibling (norm_pre), a norm inside the head (head.norm) stays with the head.
    model = cls()
    groups = lw.param_groups(model, lr=1.0, layer_decay=0.5, layers=layers, no_decay=None)
    layer, top = TIMM_LAYERS[cls]
    assert layer_of(groups) == {n: top - layer(n) for n, _ in model.named_parameters()}

def test_block_pattern_leaves_a_global_pool_vits_fc_norm_in_the_head():
    model = TimmViT()  # timm with global_pool='avg' (MAE, BEiT fine-tuning): norm is Identity, fc_norm a norm
    model.norm, model.fc_norm = nn.Identity(), nn.LayerNorm(4)
    for layers in ("blocks.*", None):  # the block pattern, and timm's own group_matcher ('^norm' misses fc_norm)
        groups = lw.param_groups(model, lr=1.0, layer_decay=0.5, layers=layers, no_decay=None)
        assert options_of(groups, "fc_norm.weight")["lr"] == options_of(groups, "head.weight")["lr"] == 1.0
        assert options_of(groups, "blocks.2.attn.weight")["lr"] == 0.5

def test_group_matcher_leaves_frozen_parameters_out_of_the_numbering():
    # timm #2691: a frozen module numbered after the blocks pushed every trained layer one scale down.
    model = TimmViT()
    lw.freeze(model, "head")
    groups = lw.param_groups(model, lr=1.0, layer_decay=0.5, no_decay=None)
    assert max(g["lr"] for g in groups) == 1.0 and options_of(groups, "norm.weight")["lr"] == 1.0
    assert options_of(groups, "blocks.0.attn.weight")["lr"] == 0.5 ** 2


def test_a_parameter_the_group_matcher_forgets_gets_the_heads_lr_with_a_warning():
    # timm #2712: reg_token is in no rule; timm (and so layerwise) numbers it with the head.
    with pytest.warns(UserWarning, match=r"reg_token matches no rule of TimmViT.group_matcher\(\)"):
        groups = lw.param_groups(TimmViT(reg_in_matcher=False), lr=1.0, layer_decay=0.5)
    assert options_of(groups, "reg_token")["lr"] == options_of(groups, "head.weight")["lr"] == 1.0


def test_explicit_layers_win_over_group_matcher():
    groups = lw.param_groups(TimmViT(), lr=1.0, layer_decay=0.5, layers="blocks.*", no_decay=None)
    assert options_of(groups, "head.weight")["lr"] == 1.0 and options_of(groups, "cls_token")["lr"] == 0.5 ** 4


# --------------------------------------------------------------------------- schedulers agree


def _lrs_by_name(optimizer):
    return {n: g["lr"] for g in optimizer.param_groups for n in g["names"]}


@pytest.mark.parametrize("make", [
    lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 ** t),
    lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4),
    lambda opt: TimmRuleScheduler(opt, lambda t: 0.5 ** t),
], ids=["LambdaLR", "CosineAnnealingLR", "timm rule"])
def test_layer_decayed_groups_get_the_intended_lr_under_torch_and_timm_schedulers(vit, make):
    d, base = 0.75, 1e-3
    opt = torch.optim.SGD(lw.param_groups(vit, lr=base, layer_decay=d, layers="blocks.*"), lr=base)
    intended = _lrs_by_name(opt)  # base * d ** (top - layer), before any step
    scheduler, probe = make(opt), torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    reference = make(probe)  # the same schedule on one group of lr=base: the factor at each step
    for t in range(1, 4):
        opt.step(), probe.step()
        (scheduler.step(t) if isinstance(scheduler, TimmRuleScheduler) else scheduler.step())
        (reference.step(t) if isinstance(reference, TimmRuleScheduler) else reference.step())
        factor = probe.param_groups[0]["lr"] / base
        for name, lr in _lrs_by_name(opt).items():
            assert lr == pytest.approx(intended[name] * factor, rel=1e-12), (t, name)


def test_layer_decayed_groups_agree_with_timms_own_groups_under_timms_scheduler():
    # timm's way: groups with lr_scale and the base lr, the scheduler multiplies. Ours: lr already scaled.
    model, d, base = TimmViT(), 0.75, 1e-3
    ours = torch.optim.AdamW(lw.param_groups(model, lr=base, layer_decay=d, weight_decay=0.05))
    layer, top = TIMM_LAYERS[TimmViT]
    timm_groups = [{"params": [p], "names": [n], "lr_scale": d ** (top - layer(n))} for n, p in model.named_parameters()]
    theirs = torch.optim.AdamW(timm_groups, lr=base)
    s1, s2 = TimmRuleScheduler(ours), TimmRuleScheduler(theirs)
    for t in range(3):
        s1.step(t), s2.step(t)
        assert _lrs_by_name(ours) == pytest.approx(_lrs_by_name(theirs), rel=1e-12)


# --------------------------------------------------------------------------- option values


@pytest.mark.parametrize("kwargs, error, match", [
    ({"lr": -1e-3}, lw.OptionError, "lr=-0.001; lr takes a finite number >= 0"),
    ({"lr": "fast"}, lw.OptionTypeError, "lr='fast'; lr takes a number"),
    ({"lr": float("inf")}, lw.OptionError, "finite"),
    ({"weight_decay": -0.1}, lw.OptionError, "weight_decay"),
    ({"rules": {"head": {"lr": -1.0}}}, lw.OptionError, "rule 'head' sets lr=-1.0"),
    ({"rules": {"head": {"momentum": "0.9"}}}, lw.OptionTypeError, "momentum"),
    ({"rules": {"head": {"betas": (0.9, 1.5)}}}, lw.OptionError, r"betas takes two numbers in \[0, 1\)"),
    ({"rules": {"head": {"lrr": 0.1}}, "optimizer": torch.optim.AdamW}, lw.OptionError,
     "rule 'head' sets 'lrr', which AdamW does not take \\(did you mean 'lr'\\?\\)"),
    ({"rules": [("head", 0.1)]}, lw.OptionTypeError, "a rule is"),
    ({"rules": {"head": {"params": []}}}, lw.OptionError, "the selector chooses"),
    ({"rules": "head"}, lw.OptionTypeError, "rules must be"),
    ({"optimizer": "adamw"}, lw.OptionTypeError, "optimizer="),
    ({"rules": {"head": {5: 0.1}}}, lw.OptionTypeError, "rule 'head' sets 5; an option is named by a string"),
])
def test_option_values_are_checked_naming_the_option(vit, kwargs, error, match):
    with pytest.raises(error, match=match):
        lw.param_groups(vit, **kwargs)


def test_option_names_are_checked_against_an_optimizer_instance_or_class(vit):
    opt = torch.optim.SGD(vit.parameters(), lr=0.1)
    with pytest.raises(lw.OptionError, match="SGD takes: .*momentum"):
        lw.param_groups(vit, {"head": {"betas": (0.9, 0.99)}}, optimizer=opt)
    groups = lw.param_groups(vit, {"head": {"momentum": 0.9, "name": "head", "lr_scale": 1.0}}, lr=0.1, optimizer=opt)
    torch.optim.SGD(groups)
    lw.param_groups(vit, {"head": {"anything": 1}})  # no optimizer: custom options pass through


@given(st.dictionaries(st.sampled_from(["lr", "weight_decay", "momentum", "betas", "eps", "lrr"]),
                       st.one_of(st.floats(allow_nan=True), st.integers(-3, 3), st.text(max_size=3), st.none(),
                                 st.tuples(st.floats(), st.floats()), st.booleans()), max_size=3))
def test_any_option_value_gives_groups_an_optimizer_takes_or_a_layerwise_error(options):
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    try:
        groups = lw.param_groups(net, {"**": options}, optimizer=torch.optim.AdamW)
    except lw.LayerwiseError:
        return
    opt = torch.optim.AdamW(groups)
    net(torch.ones(1, 2)).sum().backward()
    opt.step()


def test_a_rule_matching_nothing_or_only_frozen(vit):
    with pytest.raises(lw.SelectionError, match="'blokcs'"):
        lw.param_groups(vit, {"blokcs": {"lr": 1.0}})
    lw.freeze(vit, "head")
    with pytest.warns(UserWarning, match="'head' matches only frozen parameters"):
        lw.param_groups(vit, {"head": {"lr": 1.0}})


def test_verbose_prints_the_groups(vit, capsys):
    lw.param_groups(vit, {"head": {"lr": 0.1}}, lr=0.01, weight_decay=0.05, verbose=True)
    out = capsys.readouterr().out
    assert "param groups" in out and "head.weight" in out and "0.05" in out


def test_verbose_is_a_bool_not_a_truthy_word(vit, capsys):
    with pytest.raises(lw.OptionTypeError, match="param_groups: verbose='no': pass True or False"):
        lw.param_groups(vit, lr=0.01, verbose="no")
    assert capsys.readouterr().out == ""


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


def test_add_param_group_names_an_optimizer_that_is_not_one(interleaved):
    with pytest.raises(lw.OptionTypeError, match="add_param_group takes a torch.optim.Optimizer, got list"):
        lw.add_param_group(lw.param_groups(interleaved), interleaved, "lstm2")


def test_add_param_group_refuses_only_frozen_and_keeps_torch_names(interleaved):
    lw.freeze(interleaved, "lstm2")
    opt = torch.optim.SGD(list(interleaved.lstm1.named_parameters()), lr=0.1)  # torch's named form
    with pytest.raises(ValueError, match="frozen"):
        lw.add_param_group(opt, interleaved, "lstm2")
    group = lw.add_param_group(opt, interleaved, "linear")
    assert group["param_names"] == ["linear.weight", "linear.bias"]


def test_add_param_group_is_all_or_nothing(interleaved):
    opt = torch.optim.SGD(interleaved.lstm1.parameters(), lr=0.1)
    lam = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.9 ** t)
    cyc = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=10)
    before = (len(opt.param_groups), list(lam.base_lrs), len(lam.lr_lambdas), list(lam._last_lr))
    with pytest.raises(lw.OptionError, match="scheduler=OneCycleLR"):
        lw.add_param_group(opt, interleaved, "linear", scheduler=[lam, cyc])  # the first one extendable
    with pytest.raises(lw.OptionError, match="'lrr', which SGD does not take"):
        lw.add_param_group(opt, interleaved, "linear", lrr=0.1, scheduler=lam)
    with pytest.raises(lw.OptionError, match="lr=-1"):
        lw.add_param_group(opt, interleaved, "linear", lr=-1, scheduler=lam)
    assert (len(opt.param_groups), list(lam.base_lrs), len(lam.lr_lambdas), list(lam._last_lr)) == before
    assert all(g.get("initial_lr") is not None for g in opt.param_groups)


def test_add_param_group_extends_a_timm_rule_scheduler(interleaved):
    opt = torch.optim.SGD(interleaved.lstm1.parameters(), lr=0.1)
    scheduler = TimmRuleScheduler(opt, lambda t: 0.5 ** t)
    scheduler.base_values = list(scheduler.base_values)
    lw.add_param_group(opt, interleaved, "linear", lr=0.01, scheduler=scheduler)
    scheduler.step(1)
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.005]


@given(st.dictionaries(st.sampled_from(["lr", "momentum", "weight_decay", "nesterov", "lrr"]),
                       st.one_of(st.floats(allow_nan=True), st.integers(-2, 2), st.text(max_size=2), st.none()),
                       max_size=3))
def test_add_param_group_with_any_options_adds_a_working_group_or_changes_nothing(options):
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    opt = torch.optim.SGD(net[0].parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.9 ** t)
    before = (len(opt.param_groups), list(scheduler.base_lrs), len(scheduler.lr_lambdas))
    try:
        lw.add_param_group(opt, net, "1", scheduler=scheduler, **options)
    except lw.LayerwiseError:
        assert (len(opt.param_groups), list(scheduler.base_lrs), len(scheduler.lr_lambdas)) == before
        return
    net(torch.ones(1, 2)).sum().backward()
    opt.step()
    scheduler.step()


class _TimmNoDecayNames(nn.Module):
    """timm's no_weight_decay() forms: fnmatch patterns over parameter names, FocalNet's {''}."""

    def __init__(self, names: set[str]):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(2))
        self.blocks[1].rel_pos = nn.Parameter(torch.zeros(3, 2))
        self.blocks[1].attn = nn.Module()
        self.blocks[1].attn.bias = nn.Parameter(torch.zeros(2, 2))  # 2-D, but a bias by name
        self.pos_embed = nn.Module()
        self.pos_embed.proj = nn.Linear(2, 2)
        self.names = names

    def no_weight_decay(self) -> set[str]:
        return self.names


@pytest.mark.parametrize(("names", "undecayed"), [
    ({""}, set()),  # FocalNet: matches nothing (a selector '' was an error)
    ({"*.rel_pos"}, {"blocks.1.rel_pos"}),  # fnmatch's '*' crosses dots
    ({"pos_embed"}, set()),  # a module path is no parameter name: timm decays pos_embed.proj.weight
    ({"blocks.?.weight", "pos_embed.proj.weight"}, {"blocks.0.weight", "blocks.1.weight", "pos_embed.proj.weight"}),
])
def test_default_no_decay_matches_timms_param_groups_weight_decay(names, undecayed):
    model = _TimmNoDecayNames(names)
    groups = lw.param_groups(model, lr=0.1, weight_decay=0.05)
    got = {n for g in groups for n in g["names"] if g["weight_decay"] == 0.0}
    # timm: ndim <= 1 or name.endswith(".bias") or fnmatch(name, any no_weight_decay() pattern)
    assert got == {"blocks.0.bias", "blocks.1.bias", "blocks.1.attn.bias", "pos_embed.proj.bias"} | undecayed


class _SwinNoDecay(_TimmNoDecayNames):
    """Swin's (and SimMIM's) convention: no_weight_decay() names and no_weight_decay_keywords() name parts."""

    def no_weight_decay_keywords(self) -> set[str]:
        return {"rel_pos"}


def test_no_weight_decay_keywords_keep_every_name_holding_one_from_decay_as_swin():
    model = _SwinNoDecay({"pos_embed.proj.weight"})
    groups = lw.param_groups(model, lr=0.1, weight_decay=0.05)
    got = {n for g in groups for n in g["names"] if g["weight_decay"] == 0.0}
    # Swin's set_weight_decay: ndim == 1 or .bias or name in skip or any(keyword in name)
    expected = {n for n, p in model.named_parameters()
                if p.ndim == 1 or n.endswith(".bias") or n in model.no_weight_decay() or "rel_pos" in n}
    assert got == expected and "blocks.1.rel_pos" in got
    assert not lw.audit(model, torch.optim.AdamW(groups))  # audit reads the same rule


def test_no_weight_decay_giving_a_non_string_is_refused_naming_it():
    with pytest.raises(lw.OptionTypeError, match=r"_TimmNoDecayNames.no_weight_decay\(\) gave 3"):
        lw.param_groups(_TimmNoDecayNames({3}), lr=0.1)


def test_add_param_group_names_a_scheduler_that_is_none_or_of_another_optimizer():
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    opt = torch.optim.SGD(net[0].parameters(), lr=0.1)
    other = torch.optim.lr_scheduler.StepLR(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0), 1)
    for scheduler, error, message in [("cosine", lw.OptionTypeError, "scheduler='cosine' is not an LR scheduler"),
                                      (other, lw.OptionError, "scheduler=StepLR schedules another optimizer")]:
        with pytest.raises(error, match=message):  # it was left behind silently: the new group never scheduled
            lw.add_param_group(opt, net, "1", scheduler=scheduler)
        assert len(opt.param_groups) == 1 and other.base_lrs == [1.0]
