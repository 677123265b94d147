"""lw.audit: seeded bugs from real issue threads are found and named; clean set-ups give nothing."""

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import layerwise as lw

from conftest import TimmRuleScheduler, TimmViT, random_models

D, BASE = 0.5, 1e-3


def checks(findings):
    return {f.check: f.names for f in findings}


def timm_style(model, d=D, lr_too=False):
    """Groups the way timm's param_groups_layer_decay (and MAE, BEiT) build them: lr_scale, no lr.

    The layer numbers come from lw.param_groups; ``lr_too`` also multiplies lr by the scale
    (MAE #216's suggested fix without the pop, or layerwise before it dropped lr_scale)."""
    groups = []
    for g in lw.param_groups(model, lr=1.0, weight_decay=0.05, layer_decay=d,
                             layers=None if hasattr(model, "group_matcher") else "blocks.*"):
        group = {"params": g["params"], "names": g["names"], "weight_decay": g["weight_decay"], "lr_scale": g["lr"]}
        groups.append(group | ({"lr": BASE * g["lr"]} if lr_too else {}))
    return groups


class GPT2ish(nn.Module):
    """GPT-2's names: norms are ln_1 / ln_f, not LayerNorm.weight."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(10, 4)
        self.h = nn.ModuleList(nn.ModuleDict({"ln_1": nn.LayerNorm(4), "attn": nn.Linear(4, 4)}) for _ in range(2))
        self.ln_f = nn.LayerNorm(4)


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU())
        self.head = nn.Linear(2, 2)

    def forward(self, x):
        return self.head(self.backbone(x).mean((2, 3)))


# --------------------------------------------------------------------------- seeded bugs


def test_timm_2691_frozen_module_numbered_above_the_blocks(vit):
    # The frozen copy is the top layer: every trained layer's lr_scale is one step down.
    groups = timm_style(vit)
    for g in groups:
        g["lr_scale"] *= D
    lw.freeze(vit, "head")
    groups = [g for g in groups if g["params"][0].requires_grad]
    opt = torch.optim.AdamW(groups, lr=BASE)
    found = checks(lw.audit(vit, opt, TimmRuleScheduler(opt)))
    assert set(found) == {"lr-scale-top"} and "blocks.0.attn.weight" in found["lr-scale-top"]


def test_timm_2712_reg_token_falls_back_to_the_heads_layer():
    model = TimmViT(reg_in_matcher=False)
    with pytest.warns(UserWarning, match="reg_token matches no rule"):
        opt = torch.optim.AdamW(timm_style(model), lr=BASE)
    found = checks(lw.audit(model, opt, TimmRuleScheduler(opt)))
    assert found == {"fallback-layer": ("reg_token",)}
    fixed = TimmViT()  # timm's fix: reg_token in the stem's rule
    opt = torch.optim.AdamW(timm_style(fixed), lr=BASE)
    assert lw.audit(fixed, opt, TimmRuleScheduler(opt)) == []


def test_timm_2532_lr_scale_under_a_torch_scheduler_is_ignored(vit):
    opt = torch.optim.AdamW(timm_style(vit), lr=BASE)
    found = lw.audit(vit, opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10))
    assert [f.check for f in found] == ["lr-scale-ignored"] and "CosineAnnealingLR ignores it" in found[0].problem
    assert "blocks.0.attn.weight" in found[0].names and "head.weight" not in found[0].names  # head: scale 1


def test_mae_216_lr_scale_without_any_scheduler_is_ignored(vit):
    found = lw.audit(vit, torch.optim.AdamW(timm_style(vit), lr=BASE))
    assert [f.check for f in found] == ["lr-scale-ignored"] and "no scheduler" in found[0].problem


def test_lr_scale_applied_twice_by_a_timm_scheduler(vit):
    opt = torch.optim.AdamW(timm_style(vit, lr_too=True))
    found = lw.audit(vit, opt, TimmRuleScheduler(opt))
    assert [f.check for f in found] == ["lr-scale-twice"]
    # Under torch's schedulers the same groups are right: torch never reads lr_scale.
    opt = torch.optim.AdamW(timm_style(vit, lr_too=True))
    assert lw.audit(vit, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.9 ** t)) == []


def test_lightning_6879_a_parameter_held_twice(interleaved):
    nested = [p for m in interleaved.modules() for p in m.parameters()]  # modules() includes the root
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "duplicate parameters; in future, this will cause an error"
        opt = torch.optim.SGD([{"params": nested}], lr=0.1)
    found = checks(lw.audit(interleaved, opt))
    assert set(found) == {"duplicate"} and set(found["duplicate"]) == {n for n, _ in interleaved.named_parameters()}


def test_lightning_unfrozen_but_never_added_to_the_optimizer():
    model = Backbone()
    lw.freeze(model, "backbone")
    opt = torch.optim.Adam(filter(lambda p: p.requires_grad, model.parameters()), lr=1e-3)
    lw.unfreeze(model, "backbone")
    assert checks(lw.audit(model, opt)) == {"not-in-optimizer": ("backbone.0.weight", "backbone.0.bias",
                                                                 "backbone.1.weight", "backbone.1.bias")}


def test_transformers_10598_norms_missed_by_a_name_list():
    model = GPT2ish()
    no_decay = ["bias", "LayerNorm.weight"]
    named = list(model.named_parameters())
    opt = torch.optim.AdamW([
        {"params": [p for n, p in named if not any(nd in n for nd in no_decay)], "weight_decay": 0.01},
        {"params": [p for n, p in named if any(nd in n for nd in no_decay)], "weight_decay": 0.0}])
    found = checks(lw.audit(model, opt))
    assert found == {"weight-decay": ("h.0.ln_1.weight", "h.1.ln_1.weight", "ln_f.weight")}


def test_plain_adamw_decays_biases_and_norms(vit):
    found = checks(lw.audit(vit, torch.optim.AdamW(vit.parameters())))  # AdamW's default weight_decay=0.01
    assert set(found) == {"weight-decay"}
    assert {"cls_token", "head.bias", "norm.weight", "blocks.0.norm.weight"} <= set(found["weight-decay"])
    assert "head.weight" not in found["weight-decay"]


def test_weight_decay_check_reads_no_weight_decay_as_timm_does():
    class FocalNetLike(nn.Module):  # timm's FocalNet returns {''}; patterns cross dots
        def __init__(self, listed: set[str]):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(2))
            self.layers[1].rel_pos = nn.Parameter(torch.zeros(3, 2))
            self.listed = listed

        def no_weight_decay(self) -> set[str]:
            return self.listed

    for listed, expected in (({""}, set()), ({"*.rel_pos"}, {"layers.1.rel_pos"})):
        model = FocalNetLike(listed)
        found = checks(lw.audit(model, torch.optim.AdamW(model.parameters())))
        assert set(found["weight-decay"]) == {"layers.0.bias", "layers.1.bias"} | expected

def test_fairseq_4702_frozen_after_backward_keeps_its_grad(vit):
    opt = torch.optim.AdamW(lw.param_groups(vit, lr=1e-3))
    vit(torch.randn(2, 3, 12)).sum().backward()
    vit.blocks[0].requires_grad_(False)  # by hand: .grad stays, AdamW keeps moving the "frozen" block
    found = checks(lw.audit(vit, opt))
    assert set(found) == {"stale-grad"} and all(n.startswith("blocks.0.") for n in found["stale-grad"])


def test_transformers_20029_group_added_after_the_scheduler(vit):
    lw.freeze(vit, "blocks")
    opt = torch.optim.AdamW(lw.param_groups(vit, lr=1e-3))
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / 10)
    lw.unfreeze(vit, "blocks")
    opt.add_param_group({"params": list(vit.blocks.parameters()), "weight_decay": 0.0})
    found = checks(lw.audit(vit, opt, scheduler))
    assert set(found) == {"not-scheduled"} and "blocks.3.mlp.2.bias" in found["not-scheduled"]


def _ddp_audit(store):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        model = Backbone()
        lw.freeze(model, "backbone")
        ddp = nn.parallel.DistributedDataParallel(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # lw.unfreeze warns about exactly this
            lw.unfreeze(model, "backbone")
        return lw.audit(ddp, torch.optim.SGD(model.parameters(), lr=0.1))
    finally:
        dist.destroy_process_group()


def test_lightning_20340_ddp_does_not_sync_what_was_frozen_when_wrapped(tmp_path):
    found = checks(_ddp_audit(tmp_path / "store"))
    assert found == {"ddp-not-synced": ("backbone.0.weight", "backbone.0.bias", "backbone.1.weight", "backbone.1.bias")}


# --------------------------------------------------------------------------- clean set-ups


@pytest.mark.parametrize("make", [
    lambda opt: None,
    lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.9 ** t),
    lambda opt: torch.optim.lr_scheduler.SequentialLR(opt, [torch.optim.lr_scheduler.LinearLR(opt, 0.1, total_iters=2),
                                                             torch.optim.lr_scheduler.CosineAnnealingLR(opt, 5)], [2]),
    lambda opt: TimmRuleScheduler(opt),
], ids=["none", "LambdaLR", "SequentialLR", "timm rule"])
def test_layerwise_param_groups_are_clean_under_every_scheduler(make):
    partly_frozen = Backbone()
    lw.freeze(partly_frozen, "backbone.0")
    for model in (TimmViT(), partly_frozen):
        opt = torch.optim.AdamW(lw.param_groups(model, lr=BASE, weight_decay=0.05,
                                                layer_decay=D if hasattr(model, "group_matcher") else None))
        assert lw.audit(model, opt, make(opt)) == []


def test_audit_changes_nothing(vit):
    twins = []
    for audited in (True, False):
        torch.manual_seed(0)
        model = type(vit)()
        opt = torch.optim.AdamW(timm_style(model, lr_too=True))
        scheduler = torch.optim.lr_scheduler.SequentialLR(opt, [torch.optim.lr_scheduler.LinearLR(opt, 0.5, total_iters=2),
                                                                 torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)], [2])
        if audited:
            lw.audit(model, opt, scheduler)
        lrs = []
        for _ in range(4):
            model(torch.ones(1, 2, 12)).sum().backward()
            opt.step(), scheduler.step()
            lrs.append([g["lr"] for g in opt.param_groups])
        twins.append((lrs, scheduler.state_dict()["last_epoch"], [p.detach().clone() for p in model.parameters()]))
    assert twins[0][:2] == twins[1][:2]
    assert all(torch.equal(a, b) for a, b in zip(twins[0][2], twins[1][2]))


def test_a_transformers_trainers_own_optimizer_is_clean(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(config)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, weight_decay=0.1,
                             warmup_steps=2, lr_scheduler_type="cosine")
    trainer = Trainer(model=model, args=args)
    optimizer = trainer.create_optimizer()
    scheduler = trainer.create_scheduler(num_training_steps=10, optimizer=optimizer)
    assert any(g["weight_decay"] for g in optimizer.param_groups)
    assert lw.audit(model, optimizer, scheduler) == []


@pytest.mark.filterwarnings("ignore:The provided params to be frozen already exist")  # its BN, kept trainable
def test_lightning_base_finetuning_is_clean_before_and_after_unfreezing():
    from lightning.pytorch.callbacks import BaseFinetuning

    model = Backbone()
    BaseFinetuning.freeze(model.backbone, train_bn=True)
    opt = torch.optim.Adam(filter(lambda p: p.requires_grad, model.parameters()), lr=1e-3)
    assert lw.audit(model, opt) == []
    BaseFinetuning.unfreeze_and_add_param_group(model.backbone, opt, train_bn=True)
    assert lw.audit(model, opt) == []


# --------------------------------------------------------------------------- the result


def test_findings_print_as_a_table_naming_check_parameters_and_fix(vit):
    found = lw.audit(vit, torch.optim.AdamW(vit.parameters()))
    text = str(found)
    assert "audit: 1 finding" in text and "weight-decay" in text and "cls_token" in text and "lw.param_groups" in text
    assert isinstance(found, list) and found[0].fix.startswith("lw.param_groups")
    assert str(lw.audit(vit, torch.optim.AdamW(lw.param_groups(vit, lr=1e-3)))) == "audit: no findings"


def test_audit_refuses_what_is_not_an_optimizer(vit):
    with pytest.raises(lw.OptionTypeError, match="torch.optim.Optimizer"):
        lw.audit(vit, lw.param_groups(vit, lr=1e-3))


def test_schedulers_that_cannot_step_now_are_audited_from_the_current_lrs(vit):
    opt = torch.optim.AdamW(timm_style(vit), lr=BASE)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    assert [f.check for f in lw.audit(vit, opt, plateau)] == ["lr-scale-ignored"]
    cycle = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(), cycle.step()  # the last step: one more raises
    before = [g["lr"] for g in opt.param_groups]
    assert lw.audit(vit, opt, cycle) == [] and [g["lr"] for g in opt.param_groups] == before


def test_show_with_audit_prints_the_findings_under_the_table(vit):
    import io

    buffer = io.StringIO()
    rows = lw.show(vit, torch.optim.AdamW(vit.parameters()), audit=True, file=buffer)
    assert [f.check for f in rows.findings] == ["weight-decay"]
    out = buffer.getvalue()
    assert out.index("head.bias") < out.index("audit: 1 finding") and "lw.param_groups" in out
    clean = lw.show(vit, torch.optim.AdamW(lw.param_groups(vit, lr=1e-3)), audit=True, file=io.StringIO())
    assert clean.findings == [] and lw.show(vit, quiet=True).findings is None
    with pytest.raises(lw.OptionError, match="pass the optimizer"):
        lw.show(vit, audit=True, quiet=True)


def test_one_scheduler_per_optimizer_is_not_a_missing_schedule(vit):
    generator = torch.optim.AdamW(lw.param_groups(vit, {"blocks": {"lr": 1e-4}}, lr=1e-3, no_decay=None,
                                                  weight_decay=0.0))
    critic = nn.Linear(3, 1)
    adversary = torch.optim.SGD(critic.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(adversary, lambda t: 0.9 ** t)
    # The critic's parameters belong to another model: audit names them, and no schedule is missing.
    found = checks(lw.audit(vit, [generator, adversary], scheduler))
    assert "not-scheduled" not in found and set(found) <= {"weight-decay"}


@given(random_models(), st.data())
def test_any_layerwise_set_up_audits_clean(model, data):
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    for name in data.draw(st.lists(st.sampled_from(names), max_size=2)):
        model.get_parameter(name).requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        return
    rules = [(s, {"lr": data.draw(st.sampled_from([0.1, 0.2]))}) for s in data.draw(st.lists(st.sampled_from(names), max_size=3))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = torch.optim.AdamW(lw.param_groups(model, rules, lr=0.5, weight_decay=0.01))
    scheduler = data.draw(st.sampled_from([None, "lambda", "cosine"]))
    if scheduler == "lambda":
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 ** t)
    elif scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3)
    assert lw.audit(model, opt, scheduler) == []


def test_a_scheduler_that_is_none_is_named_not_skipped(vit):
    for g in (groups := lw.param_groups(vit, lr=1.0, weight_decay=0.05)):
        g["lr_scale"] = 0.5  # a finding that needs the scheduler: lr_scale nothing reads
    opt = torch.optim.AdamW(groups)
    with pytest.raises(lw.OptionTypeError, match="scheduler='cosine' is not an LR scheduler"):
        lw.audit(vit, opt, scheduler="cosine")  # Findings([]) before: the scheduler checks were skipped
