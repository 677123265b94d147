import io

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import layerwise as lw

from conftest import random_models


def test_rows_have_every_column_and_totals_count_shared_once(tied_lm):
    out = io.StringIO()
    rows = lw.show(tied_lm, file=out)
    assert [r["name"] for r in rows] == ["embed.weight", "body.weight", "body.bias", "ln.weight", "ln.bias", "decoder.bias"]
    embed = rows[0]
    assert embed["shared_with"] == ["decoder.weight"]
    assert embed["shape"] == (11, 6) and embed["numel"] == 66 and embed["dtype"] == "float32" and embed["trainable"]
    distinct = sum(p.numel() for p in tied_lm.parameters())
    assert rows.total == distinct == rows.trainable
    text = out.getvalue()
    assert "decoder.weight" in text and f"total {distinct:,}" in text


def test_optimizer_columns_and_a_forgotten_parameter(interleaved):
    interleaved.lstm2.requires_grad_(False)
    opt = torch.optim.SGD([{"params": interleaved.lstm1.parameters(), "lr": 0.5},
                           {"params": [interleaved.linear.weight], "lr": 0.1, "weight_decay": 0.01}], lr=1.0)
    out = io.StringIO()
    rows = {r["name"]: r for r in lw.show(interleaved, opt, file=out)}
    assert rows["lstm1.weight_ih_l0"]["group"] == 0 and rows["lstm1.weight_ih_l0"]["lr"] == 0.5
    assert rows["linear.weight"]["group"] == 1 and rows["linear.weight"]["weight_decay"] == 0.01
    assert rows["lstm2.bias_hh_l0"]["group"] is None and not rows["lstm2.bias_hh_l0"]["trainable"]
    # linear.bias trains but no optimizer holds it: the table says so.
    assert rows["linear.bias"]["group"] is None
    assert "not in optimizer" in out.getvalue()


def test_inputs_count_calls_of_a_module_used_by_two_branches(siamese):
    siamese.train()
    running = siamese.norm.running_mean.clone()
    a = b = torch.randn(3, 8, 8)
    rows = {r["name"]: r for r in lw.show(siamese, None, inputs=(a, b), quiet=True)}
    assert rows["lstm1.weight_ih_l0"]["calls"] == 2 and rows["norm.weight"]["calls"] == 2
    assert rows["linear.weight"]["calls"] == 1
    # Counting calls leaves the model as it was.
    assert siamese.training and torch.equal(siamese.norm.running_mean, running)


def test_selectors_choose_the_rows_and_the_totals(interleaved):
    interleaved.linear.bias.requires_grad_(False)
    out = io.StringIO()
    rows = lw.show(interleaved, None, "linear", file=out)
    assert [r["name"] for r in rows] == ["linear.weight", "linear.bias"]
    weight, bias = interleaved.linear.weight.numel(), interleaved.linear.bias.numel()
    assert (rows.total, rows.trainable) == (weight + bias, weight)
    assert f"trainable {weight:,} · frozen {bias:,} · total {weight + bias:,}" in out.getvalue()


def test_a_hand_frozen_parameter_with_a_stale_gradient_is_flagged(interleaved):
    interleaved(torch.randn(2, 3, 4)).sum().backward()
    interleaved.lstm2.requires_grad_(False)  # the hand-written freeze keeps .grad
    out = io.StringIO()
    rows = {r["name"]: r for r in lw.show(interleaved, file=out)}
    assert rows["lstm2.weight_ih_l0"]["stale_grad"] and not rows["lstm1.weight_ih_l0"]["stale_grad"]
    assert "stale .grad" in out.getvalue()
    lw.freeze(interleaved, "lstm2")
    assert not any(r["stale_grad"] for r in lw.show(interleaved, quiet=True))


def test_monitor_and_ema_columns(interleaved):
    opt = torch.optim.SGD(interleaved.parameters(), lr=0.1)
    ema = lw.EMA(interleaved, decay=0.5)
    monitor = lw.GradMonitor(interleaved, every=2, optimizer=opt, stats=["norm"])
    for _ in range(3):
        opt.zero_grad()
        interleaved(torch.randn(2, 3, 4)).sum().backward()
        opt.step()
        ema.update()
    rows = {r["name"]: r for r in lw.show(interleaved, opt, monitor=monitor, ema=ema, quiet=True)}
    last = {r["layer"]: r for r in monitor.history if r["step"] == 2}
    assert rows["linear.weight"]["grad_norm@2"] == last["linear.weight"]["grad_norm"]
    assert rows["linear.weight"]["update_ratio@2"] == last["linear.weight"]["update_ratio"]
    w, shadow = interleaved.linear.weight.detach(), ema.shadow[ema.names.index("linear.weight")]
    assert rows["linear.weight"]["ema_distance"] == pytest.approx(((w - shadow).norm() / w.norm()).item())
    out = io.StringIO()
    lw.show(interleaved, None, "linear", monitor=monitor, ema=ema, file=out)
    assert "grad norm@2" in out.getvalue() and "ema distance" in out.getvalue()


def test_calls_of_a_tied_parameter_count_every_module_that_holds_it(tied_lm):
    rows = {r["name"]: r for r in lw.show(tied_lm, None, inputs=torch.tensor([[1, 2]]), quiet=True)}
    assert rows["embed.weight"]["calls"] == 2  # the embedding and the decoder
    assert rows["body.weight"]["calls"] == 1


def test_a_selector_in_the_optimizer_slot_is_taken_as_a_selector(interleaved):
    rows = lw.show(interleaved, "linear", quiet=True)
    assert [r["name"] for r in rows] == ["linear.weight", "linear.bias"]


# --------------------------------------------------------------------------- at scale: roll-ups, narrow terminals


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = torch.nn.Module()
        self.attn.qkv, self.attn.proj = torch.nn.Linear(8, 24), torch.nn.Linear(24, 8)
        self.norm1 = torch.nn.LayerNorm(8)

    def forward(self, x):
        return x + self.attn.proj(self.attn.qkv(self.norm1(x)))


class _ViT(torch.nn.Module):
    """timm's ViT layout in miniature: cls_token, blocks.N.attn.{qkv,proj}, norm, head."""

    def __init__(self, depth: int = 12):
        super().__init__()
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 8))
        self.blocks = torch.nn.Sequential(*[_Block() for _ in range(depth)])
        self.norm = torch.nn.LayerNorm(8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.norm(self.blocks(x + self.cls_token)))


@pytest.fixture
def vit_trained():
    """A ViT with its first half frozen, two lrs, one monitored step, an EMA."""
    torch.manual_seed(0)
    model = _ViT()
    lw.freeze(model, "blocks.[0-5]")
    opt = torch.optim.AdamW([{"params": [p for n, p in model.named_parameters() if not n.startswith("head")],
                              "lr": 1e-3}, {"params": model.head.parameters(), "lr": 1e-2}])
    monitor = lw.GradMonitor(model, every=1, optimizer=opt)
    ema = lw.EMA(model, decay=0.9)
    opt.zero_grad()
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    ema.update()
    return model, opt, monitor, ema


def test_trainable_only_hides_frozen_rows_and_keeps_the_totals(vit_trained):
    model, opt, _, _ = vit_trained
    rows = lw.show(model, opt, trainable_only=True, quiet=True)
    assert [r["name"] for r in rows] == [n for n, p in model.named_parameters() if p.requires_grad]
    assert rows.total == sum(p.numel() for p in model.parameters())
    assert rows.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_depth_rolls_rows_up_to_modules_with_counts_share_lr_range_and_pooled_grad_norm(vit_trained):
    model, opt, monitor, ema = vit_trained
    rows = {r["name"]: r for r in lw.show(model, opt, monitor=monitor, ema=ema, depth=1, quiet=True)}
    assert list(rows) == ["cls_token", "blocks", "norm", "head"]
    blocks = rows["blocks"]
    assert blocks["tensors"] == 12 * 6 and blocks["numel"] == sum(p.numel() for p in model.blocks.parameters())
    assert blocks["trainable"] == pytest.approx(0.5), "half the blocks are frozen"
    assert (rows["head"]["lr_min"], rows["head"]["lr_max"]) == (1e-2, 1e-2)
    grads = [p.grad.flatten() for p in model.blocks.parameters() if p.grad is not None]
    assert blocks["grad_norm@0"] == pytest.approx(torch.cat(grads).norm().item(), rel=1e-5), "√Σ‖g‖² of the module"
    assert "update_ratio@0" not in blocks and "ema_distance" not in blocks, "ratios do not pool"

    two = {r["name"]: r for r in lw.show(model, opt, "blocks.[5-6]", depth=2, quiet=True)}
    assert list(two) == ["blocks.5", "blocks.6"] and two["blocks.5"]["trainable"] == 0.0
    assert (two["blocks.5"]["lr_min"], two["blocks.6"]["lr_max"]) == (None, 1e-3), "frozen: no lr applies"


def test_mixed_lrs_in_one_module_show_as_a_range():
    net = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)))
    opt = torch.optim.SGD([{"params": net[0][0].parameters(), "lr": 0.1}, {"params": net[0][1].parameters()}], lr=0.3)
    out = io.StringIO()
    rows = lw.show(net, opt, depth=1, file=out)
    assert (rows[0]["lr_min"], rows[0]["lr_max"]) == (0.1, 0.3) and "0.1–0.3" in out.getvalue()


def _render(rows, width: int) -> str:
    from rich.console import Console

    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(rows)
    return out.getvalue()


def test_at_80_columns_every_full_name_is_on_a_line_of_its_own_and_nothing_is_cut(vit_trained):
    model, opt, monitor, ema = vit_trained
    rows = lw.show(model, opt, monitor=monitor, ema=ema, quiet=True)
    text = _render(rows, 80)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 80 and "…" not in text
    assert [line for line in lines if line.startswith("blocks.11.attn.")] == [
        "blocks.11.attn.qkv.weight", "blocks.11.attn.qkv.bias", "blocks.11.attn.proj.weight", "blocks.11.attn.proj.bias"]
    below = lines[lines.index("blocks.11.attn.proj.weight") + 1].split()
    assert below[:2] == ["8×24", "192"], "the values sit right under their name"
    assert "every tensor is float32" in text and "frozen rows get no gradient" in text
    wide = _render(rows, 200)
    assert "│ blocks.11.attn.proj.weight" in wide and "…" not in wide, "one line per row when it fits"


def test_an_empty_selection_says_so(vit_trained):
    model, *_ = vit_trained
    lw.freeze(model)
    out = io.StringIO()
    rows = lw.show(model, None, "blocks.[0-1]", trainable_only=True, file=out)
    assert rows == [] and rows.total == sum(p.numel() for p in model.blocks[:2].parameters())
    assert "no trainable parameter among the 12 selected tensors: all are frozen" in out.getvalue()
    assert "no parameter selected" in _render(lw.show(torch.nn.ReLU(), quiet=True), 80)


@pytest.mark.parametrize("depth, error", [(0, lw.OptionError), (-1, lw.OptionError), (1.5, lw.OptionTypeError),
                                          (True, lw.OptionTypeError)])
def test_a_bad_depth_is_refused_by_name(interleaved, depth, error):
    with pytest.raises(error, match="depth="):
        lw.show(interleaved, depth=depth, quiet=True)


def test_a_peft_lora_model_shows_only_its_adapters_with_trainable_only():
    import peft  # the hf extra installs it: CI runs this test, never skips it
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(config),
                                peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    rows = lw.show(model, trainable_only=True, quiet=True)
    adapters = [n for n, p in model.named_parameters() if p.requires_grad]
    assert [r["name"] for r in rows] == adapters and len(adapters) == 2 * 2 * 2
    assert all(".lora_A." in n or ".lora_B." in n for n in adapters)
    assert rows.trainable == sum(p.numel() for n, p in model.named_parameters() if n in adapters)
    assert rows.total == sum(p.numel() for p in model.parameters()), "the frozen base counts in the totals"
    text = _render(lw.show(model, trainable_only=True, quiet=True), 80)
    assert all(name in text.splitlines() for name in adapters), "long adapter names in full, at 80 columns"


@given(random_models(), st.integers(1, 4), st.booleans())
def test_a_roll_up_at_any_depth_accounts_for_every_parameter_once(model, depth, trainable_only):
    flat = lw.show(model, trainable_only=trainable_only, quiet=True)
    rolled = lw.show(model, depth=depth, trainable_only=trainable_only, quiet=True)
    assert sum(r["tensors"] for r in rolled) == len(flat)
    assert sum(r["numel"] for r in rolled) == sum(r["numel"] for r in flat)
    assert (rolled.total, rolled.trainable) == (flat.total, flat.trainable)
    counted = dict.fromkeys((m["name"] for m in rolled), 0)
    for r in flat:  # each parameter is counted by the most specific row above it, at most `depth` deep
        owner = max((m for m in counted if r["name"] == m or r["name"].startswith(m + ".")), key=len)
        assert owner.count(".") < depth or owner == r["name"]
        counted[owner] += 1
    assert counted == {m["name"]: m["tensors"] for m in rolled}


@pytest.mark.parametrize("option, value, fragment", [
    ("file", 3, "file=3 must be a text stream"), ("monitor", 3, "monitor= takes a layerwise.GradMonitor, got int"),
    ("ema", object(), "ema= takes a layerwise.EMA, got object"), ("quiet", "no", "quiet='no': pass True or False"),
    ("trainable_only", "no", "trainable_only='no': pass True or False")])
def test_options_of_the_wrong_type_are_named_before_anything_prints(interleaved, option, value, fragment):
    out = io.StringIO()
    kwargs = {"file": out, **({} if option == "quiet" else {"quiet": True}), option: value}
    with pytest.raises(lw.OptionTypeError, match=f"show: {fragment}"):
        lw.show(interleaved, **kwargs)
    assert out.getvalue() == ""


def test_inputs_the_model_cannot_take_are_named_and_leave_it_as_it_was(interleaved):
    interleaved.train()
    hooks = [len(m._forward_pre_hooks) for m in interleaved.modules()]
    with pytest.raises(lw.OptionError, match=r"show\(inputs=...\): Interleaved's forward failed on them \(RuntimeError:") as e:
        lw.show(interleaved, inputs=torch.zeros(2, 99), quiet=True)
    assert isinstance(e.value.__cause__, RuntimeError)  # the model's own error, chained
    assert all(m.training for m in interleaved.modules())
    assert [len(m._forward_pre_hooks) for m in interleaved.modules()] == hooks
