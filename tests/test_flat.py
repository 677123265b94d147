import pytest
import torch
from hypothesis import given, settings
from torch import nn

import layerwise as lw

from conftest import random_models

CPU32 = (torch.device("cpu"), torch.float32)


def twins(seed=0):
    torch.manual_seed(seed)
    a = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))
    b = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))
    b.load_state_dict(a.state_dict())
    return a, b


def assert_views(model, flat):
    buffer, grads = flat.params[CPU32], flat.grads[CPU32]
    offset = 0
    for p in model.parameters():
        assert p.data_ptr() == buffer[offset:].data_ptr()
        if p.grad is not None:
            assert p.grad.data_ptr() == grads[offset:].data_ptr()
        offset += p.numel()
    assert offset == buffer.numel()


@pytest.mark.parametrize("optimizer", [
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
    lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, foreach=True),
])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_training_a_flattened_model_equals_training_it_plain(optimizer, set_to_none):
    flat_net, plain = twins()
    opt_flat = optimizer(list(flat_net.parameters()))  # built before flattening: parameters keep their identity
    flat = lw.flatten_parameters(flat_net)
    opt_plain = optimizer(list(plain.parameters()))
    torch.manual_seed(1)
    for _ in range(4):
        x = torch.randn(6, 5)
        for net, opt in ((flat_net, opt_flat), (plain, opt_plain)):
            net(x).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=set_to_none)
    flat_net(torch.randn(2, 5)).sum().backward()  # the last gradients are views too
    assert_views(flat_net, flat)
    for (name, p), q in zip(flat_net.named_parameters(), plain.parameters()):
        assert torch.equal(p, q), name


def test_state_dicts_round_trip_through_memory_and_files(tmp_path):
    net, other = twins()
    flat = lw.flatten_parameters(net)
    torch.manual_seed(3)
    source = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))
    net.load_state_dict(source.state_dict())  # copies into the views
    assert_views(net, flat)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), source.state_dict().values()))
    lw.save(net, tmp_path / "net.safetensors")
    torch.save(net.state_dict(), tmp_path / "net.pt")
    for loaded in (lw.load(tmp_path / "net.safetensors"), torch.load(tmp_path / "net.pt")):
        other.load_state_dict(loaded)
        assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), source.state_dict().values()))


def test_one_buffer_per_dtype_and_frozen_parameters_get_no_hook():
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).double(), nn.Linear(2, 2))
    net[2].requires_grad_(False)
    flat = lw.flatten_parameters(net)
    assert {k: v.numel() for k, v in flat.params.items()} == {CPU32: 12, (torch.device("cpu"), torch.float64): 6}
    assert len(flat.handles) == 4
    flat.remove()
    assert flat.handles == []


def test_tied_parameters_stay_tied_and_are_stored_once(tied_lm):
    before = {k: v.clone() for k, v in tied_lm.state_dict().items()}
    flat = lw.flatten_parameters(tied_lm)
    assert tied_lm.decoder.weight is tied_lm.embed.weight
    assert sum(t.numel() for t in flat.params.values()) == sum(p.numel() for p in tied_lm.parameters())
    assert all(torch.equal(v, before[k]) for k, v in tied_lm.state_dict().items())


@settings(max_examples=25, deadline=None)
@given(random_models())
def test_flattening_keeps_every_value_name_and_tie(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ties = [names for names in lw.select(model).aliases() if len(names) > 1]
    lw.flatten_parameters(model)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    for names in ties:
        assert len({id(model.get_parameter(n)) for n in names}) == 1


def test_ema_of_a_flattened_model_is_one_kernel_and_equals_the_plain_ema():
    flat_net, plain = twins()
    lw.flatten_parameters(flat_net)
    fast, slow = lw.EMA(flat_net, decay=0.9), lw.EMA(plain, decay=0.9, foreach=True)
    assert [b.flat is not None for b in fast._buckets] == [True]
    for _ in range(3):
        with torch.no_grad():
            for p, q in zip(flat_net.parameters(), plain.parameters()):
                p.add_(torch.randn_like(p))
                q.copy_(p)
        fast.update(), slow.update()
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(fast.shadow, slow.shadow))
    net_copy = twins()[0]
    fast.copy_to(net_copy)
    assert all(torch.equal(p, s) for p, s in zip(net_copy.parameters(), fast.shadow))
    flat_net.double()
    with pytest.raises(lw.StateError, match="float64"):
        fast.update()


def test_gradient_tools_and_torch_clipping_work_on_flat_gradients():
    flat_net, plain = twins()
    flat = lw.flatten_parameters(flat_net)
    x = torch.randn(4, 5)
    for net in (flat_net, plain):
        net(x).square().sum().backward()
    stats, reference = lw.grad_stats(flat_net), lw.grad_stats(plain)
    rows, expected = stats.to_dict(), reference.to_dict()
    assert list(rows) == list(expected)
    for name in rows:
        assert rows[name] == pytest.approx(expected[name], rel=1e-5), name
    before = flat.grads[CPU32].norm()  # the flat buffer holds every gradient
    total = torch.nn.utils.clip_grad_norm_(flat_net.parameters(), 0.1)
    assert torch.isclose(total, before)
    assert torch.isclose(flat.grads[CPU32].norm(), torch.tensor(0.1), rtol=1e-4)


@pytest.mark.parametrize("backward_first", [False, True])
def test_a_sparse_embedding_is_refused_before_anything_moves(backward_first):
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Embedding(4, 3, sparse=True))
    if backward_first:
        (net[0].weight.sum() + net[1](torch.tensor([1, 1])).sum()).backward()
    pointers = [p.data_ptr() for p in net.parameters()]
    with pytest.raises(lw.StateError, match=r"1\.weight gets sparse gradients \(Embedding\(sparse=True\)\)"):
        lw.flatten_parameters(net)
    assert [p.data_ptr() for p in net.parameters()] == pointers  # the Linear before it did not move


def test_flattening_under_inference_mode_gives_buffers_that_train():
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    with torch.inference_mode():  # e.g. set up inside an evaluation block
        flat = lw.flatten_parameters(net)
    net(torch.ones(2, 3)).sum().backward()  # "Inference tensors cannot be saved for backward" before
    grads = flat.grads[(torch.device("cpu"), torch.float32)]
    assert net[1].bias.grad.data_ptr() == grads[-2:].data_ptr() and net[1].bias.grad.tolist() == [2.0, 2.0]
