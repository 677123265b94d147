"""The mission's six techniques end to end: the layerwise way, and the way users write them today."""

import copy

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

import layerwise as lw
from layerwise_demo import SiameseLSTM

from conftest import Interleaved, TiedLM


def steps(model, optimizer, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(n):
        x, y = torch.randn(8, 5, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        optimizer.zero_grad(set_to_none=False)  # zeroed, not None: the default before PyTorch 2.0
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


# --------------------------------------------------------------------------- 1. weight sharing


def test_1_one_lstm_serves_both_branches_and_sums_their_gradients():
    torch.manual_seed(0)
    model = SiameseLSTM(hidden=6)
    a, b = torch.randn(3, 8, 8), torch.randn(3, 8, 8)
    rows = {r["name"]: r for r in lw.show(model, None, inputs=(a, b), quiet=True)}
    assert rows["lstm1.weight_ih_l0"]["calls"] == 2 and len(rows) == len(list(model.parameters()))

    model.eval()  # BatchNorm on running statistics: each branch's output is independent of the other
    model(a, b).sum().backward()
    both = model.lstm1.weight_ih_l0.grad.clone()
    # The same gradient, branch by branch: encode one input with the weights, the other detached.
    model.zero_grad()
    ea, eb = model.encode(a), model.encode(b).detach()
    model.linear(torch.cat([ea, eb, (ea - eb).abs(), ea * eb], 1)).sum().backward()
    first = model.lstm1.weight_ih_l0.grad.clone()
    model.zero_grad()
    ea, eb = model.encode(a).detach(), model.encode(b)
    model.linear(torch.cat([ea, eb, (ea - eb).abs(), ea * eb], 1)).sum().backward()
    assert torch.allclose(both, first + model.lstm1.weight_ih_l0.grad, atol=1e-6)


def test_1_tied_weights_survive_training_averaging_and_saving(tmp_path):
    torch.manual_seed(0)
    a, b, third = TiedLM(), TiedLM(), TiedLM()
    lw.average([a, b], into=third)
    assert third.decoder.weight is third.embed.weight
    # The usual way to save fails on tied tensors; lw.save stores them once and restores the tie.
    with pytest.raises(RuntimeError, match="share memory"):
        safetensors.torch.save_file(third.state_dict(), tmp_path / "plain.safetensors")
    state = lw.load(lw.save(third, tmp_path / "lw.safetensors"), into=TiedLM())
    assert state["decoder.weight"] is state["embed.weight"]


# --------------------------------------------------------------------------- 2. freezing


def test_2_interleaved_freeze_the_layerwise_way_is_bit_identical():
    torch.manual_seed(0)
    model = Interleaved()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    steps(model, optimizer, 3)
    lw.freeze(model, "lstm2", "norm")
    before = copy.deepcopy(model.state_dict())
    steps(model, optimizer, 5, seed=1)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) == k.startswith(("lstm2.", "norm.")), k


def test_2_the_hand_written_freeze_still_trains_and_show_says_why():
    torch.manual_seed(0)
    model = Interleaved()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    steps(model, optimizer, 3)
    for p in model.lstm2.parameters():  # as written today
        p.requires_grad = False
    before = copy.deepcopy(model.state_dict())
    rows = {r["name"]: r for r in lw.show(model, optimizer, quiet=True)}
    assert rows["lstm2.weight_hh_l0"]["stale_grad"], "layerwise flags the stale gradient"
    steps(model, optimizer, 2, seed=1)
    assert not torch.equal(model.lstm2.weight_hh_l0, before["lstm2.weight_hh_l0"]), "weight decay moved it"
    assert not torch.equal(model.norm.running_mean, before["norm.running_mean"]), "train() restarted the statistics"


# --------------------------------------------------------------------------- 3. a learning rate per layer


def test_3_per_layer_learning_rates_cover_every_layer_once():
    torch.manual_seed(0)
    model = Interleaved()
    optimizer = torch.optim.SGD(lw.param_groups(model, {"**": {"lr": 0.01}, ("lstm1", "lstm2"): {"lr": 0.1}}))
    rows = {r["name"]: r for r in lw.show(model, optimizer, quiet=True)}
    assert rows["lstm1.weight_ih_l0"]["lr"] == 0.1 and rows["linear.weight"]["lr"] == 0.01
    assert all(r["group"] is not None for r in rows.values())


def test_3_the_hand_written_groups_forget_a_layer_and_show_says_so():
    torch.manual_seed(0)
    model = Interleaved()
    optimizer = torch.optim.SGD([{"params": model.lstm1.parameters(), "lr": 0.1},  # as written today
                                 {"params": model.lstm2.parameters(), "lr": 0.1},
                                 {"params": model.linear.parameters(), "lr": 0.01}])
    rows = {r["name"]: r for r in lw.show(model, optimizer, quiet=True)}
    assert rows["norm.weight"]["trainable"] and rows["norm.weight"]["group"] is None  # silently never trained
    with pytest.raises(ValueError, match="linear.weight is already in param group 2"):
        lw.add_param_group(optimizer, model, "norm", "linear")


# --------------------------------------------------------------------------- 4. averaging into a third model


def test_4_average_two_models_into_a_third():
    torch.manual_seed(0)
    a, b, c = Interleaved(), Interleaved(), Interleaved()
    steps(a, torch.optim.SGD(a.parameters(), lr=0.1), 2)  # num_batches_tracked: 2
    avg = lw.average([a, b], into=c)
    assert torch.allclose(c.linear.weight, (a.linear.weight + b.linear.weight) / 2)
    assert avg["norm.num_batches_tracked"].dtype == torch.long and avg["norm.num_batches_tracked"] == 2


def test_4_the_hand_written_loop_breaks_on_models_that_differ_and_layerwise_lists_why():
    torch.manual_seed(0)
    a, b = Interleaved(hidden=6), Interleaved(hidden=7)
    sd1, sd2 = a.state_dict(), b.state_dict()
    with pytest.raises(RuntimeError):  # as written today: the first mismatch, as a shape error
        {k: (sd1[k] + sd2[k]) / 2 for k in sd1}
    with pytest.raises(lw.MergeError) as e:
        lw.average([a, b])
    assert "lstm1.weight_hh_l0: shape (24, 6) in model 0 but (28, 7) in model 1" in str(e.value)
    assert str(e.value).count("shape") >= 10, "every mismatch, not just the first"


# --------------------------------------------------------------------------- 5. every layer's gradient


def test_5_every_layer_gradient_by_its_real_name():
    torch.manual_seed(0)
    model = Interleaved()
    F.cross_entropy(model(torch.randn(4, 5, 4)), torch.tensor([0, 1, 2, 0])).backward()
    stats = lw.grad_stats(model).to_dict()
    assert list(stats) == [n for n, _ in model.named_parameters()]
    for name, p in model.named_parameters():
        assert stats[name]["norm"] == pytest.approx(p.grad.norm().item(), rel=1e-5)


def test_5_the_lstm_weight_that_does_not_exist():
    torch.manual_seed(0)
    model = Interleaved()
    with pytest.raises(AttributeError, match="'LSTM' object has no attribute 'weight'"):
        print(model.lstm1.weight.grad)  # as written today
    with pytest.raises(lw.SelectionError) as e:
        lw.grad_stats(model, "lstm1.weight")
    for real in ("lstm1.weight_ih_l0", "lstm1.weight_hh_l0"):
        assert real in str(e.value)


# --------------------------------------------------------------------------- 6. assigning a gradient directly


def test_6_an_assigned_gradient_is_applied_exactly():
    torch.manual_seed(0)
    model = Interleaved()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.25)
    value = torch.randn_like(model.linear.weight)
    original = value.clone()
    lw.set_grad(model, "linear.weight", value)
    value.mul_(100)  # the caller's tensor changes afterwards: the gradient does not
    before = model.linear.weight.detach().clone()
    optimizer.step()
    assert torch.equal(model.linear.weight.detach(), before - 0.25 * original)


def test_6_assigning_by_hand_aliases_or_fails_and_layerwise_explains():
    torch.manual_seed(0)
    model = Interleaved()
    value = torch.ones(3, 6)
    model.linear.weight.grad = value  # as written today: the gradient *is* the caller's tensor
    value.zero_()
    assert model.linear.weight.grad.sum() == 0
    with pytest.raises(RuntimeError):  # a wrong shape: torch's message does not say which layer expected what
        model.linear.weight.grad = torch.ones(6, 3)
    with pytest.raises(lw.GradError, match=r"linear.weight has shape \(3, 6\) but its value has shape \(6, 3\)"):
        lw.set_grad(model, "linear.weight", torch.ones(6, 3))
