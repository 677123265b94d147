import io

import pytest
import torch

import layerwise as lw


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


def test_selectors_restrict_rows_not_totals(interleaved):
    rows = lw.show(interleaved, None, "linear", quiet=True)
    assert [r["name"] for r in rows] == ["linear.weight", "linear.bias"]
    assert rows.total == sum(p.numel() for p in interleaved.parameters())


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
