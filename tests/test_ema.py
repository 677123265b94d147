import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import layerwise as lw


def test_ema_equals_the_closed_form_recursion():
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    ema = lw.EMA(net, decay=0.8)
    expected = net.weight.detach().clone()
    for _ in range(5):
        with torch.no_grad():
            net.weight.add_(torch.randn_like(net.weight))
        ema.update()
        expected = 0.8 * expected + 0.2 * net.weight.detach()
    with ema.swapped(net):
        assert torch.allclose(net.weight, expected, atol=1e-6)


def test_ema_warmup_every_and_buffers():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = lw.EMA(net, decay=0.999, warmup=3, every=2, buffers="ema")
    decays = []
    for _ in range(10):
        decays.append(ema.current_decay())
        ema.update()
    assert ema.num_updates == 5
    assert decays[:2] == [2 / 11, 2 / 11] and decays[2] == 3 / 12 and decays[4] == 4 / 13 and decays[6] == 0.999
    with torch.no_grad():
        net[1].running_mean.fill_(1.0)
    ema.update(), ema.update()
    assert torch.allclose(ema.shadow_buffers[0], torch.full((2,), 0.001))
    copy_ema = lw.EMA(net, decay=0.999)
    with torch.no_grad():
        net[1].running_mean.fill_(2.0)
    copy_ema.update()
    assert torch.equal(copy_ema.shadow_buffers[0], torch.full((2,), 2.0))


def test_warmup_follows_torch_ema_num_updates():
    # torch-ema: num_updates += 1, then decay = min(decay, (1 + num_updates) / (10 + num_updates)),
    # so the decays are 2/11, 3/12, 4/13, ... from the first update on.
    net = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(net.weight)
    ema = lw.EMA(net, decay=0.999, warmup=10_000)
    for x in (1.0, -2.0, 4.0):
        nn.init.constant_(net.weight, x)
        ema.update()
    e1 = 9 / 11 * 1.0
    e2 = 3 / 12 * e1 + 9 / 12 * -2.0
    e3 = 4 / 13 * e2 + 9 / 13 * 4.0
    assert math.isclose(ema.shadow[0].item(), e3, rel_tol=1e-6)


def test_update_after_step_zero_is_swa_utils_ema():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    ours = lw.EMA(net, decay=0.8, update_after_step=0)
    theirs = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.8))  # its first update copies the weights
    for _ in range(5):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net(torch.randn(6, 3))  # moves the running statistics: both copy buffers
        ours.update()
        theirs.update_parameters(net)
    expected = {k.removeprefix("module."): v for k, v in theirs.state_dict().items() if k.startswith("module.")}
    got = {**dict(zip(ours.names, ours.shadow)), **dict(zip(ours._buffer_names, ours.shadow_buffers))}
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-7)


def test_update_after_step_copies_the_first_updates_then_averages():
    net = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(net.weight)
    ema = lw.EMA(net, decay=0.5, update_after_step=2)  # timm ModelEmaV3: steps 1..3 copy
    for x in (1.0, 2.0, 4.0, 8.0):
        nn.init.constant_(net.weight, x)
        ema.update()
    assert ema.shadow[0].item() == 0.5 * 4.0 + 0.5 * 8.0

def test_swapped_restores_training_weights_bit_identically(interleaved):
    ema = lw.EMA(interleaved, decay=0.5)
    with torch.no_grad():
        for p in interleaved.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in interleaved.state_dict().items()}
    ema.update()
    with ema.swapped(interleaved):
        assert not torch.equal(interleaved.linear.weight, before["linear.weight"])
    for k, v in interleaved.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_ema_resumes_from_its_state_dict():
    torch.manual_seed(0)
    net = nn.Linear(3, 3)
    steps = [torch.randn(3, 3) for _ in range(6)]
    ema = lw.EMA(net, decay=0.7, warmup=2)
    resumed = None
    for i, delta in enumerate(steps):
        with torch.no_grad():
            net.weight.add_(delta)
        ema.update()
        if i == 2:
            state = ema.state_dict()
            resumed = lw.EMA(net, decay=0.7, warmup=2)
            resumed.load_state_dict(state)
        elif resumed is not None:
            resumed.update()
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow, resumed.shadow))
    assert resumed.num_updates == ema.num_updates


def test_ema_averages_tied_parameters_once(tied_lm):
    ema = lw.EMA(tied_lm)
    assert ema.names.count("embed.weight") == 1 and "decoder.weight" not in ema.names
    with ema.swapped(tied_lm):
        assert tied_lm.decoder.weight is tied_lm.embed.weight


def test_ema_swap_into_another_model_checks_names(interleaved, tied_lm):
    ema = lw.EMA(interleaved)
    with pytest.raises(lw.LayerwiseError, match="not the model this EMA tracks"):
        with ema.swapped(tied_lm):
            pass


def test_a_compiled_model_is_tracked_by_its_inner_names():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    compiled = torch.compile(net)
    ema = lw.EMA(compiled, decay=0.5)
    assert ema.names == ["0.weight", "0.bias", "1.weight", "1.bias"] and ema._buffer_names[0] == "1.running_mean"
    with torch.no_grad():
        net[0].weight.add_(2.0)
    ema.update()
    with ema.swapped(compiled):
        assert torch.equal(net[0].weight, ema.shadow[0])
    assert set(ema.state_dict()["shadow"]) == {"0.weight", "0.bias", "1.weight", "1.bias"}


def _ema_of_a_ddp_wrapper(store):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        ddp = nn.parallel.DistributedDataParallel(net)
        ema = lw.EMA(ddp, decay=0.5)
        with torch.no_grad():
            net[0].weight.add_(2.0)
        ema.update()
        plain = lw.EMA(net, decay=0.5)
        plain.load_state_dict(ema.state_dict())  # the names checkpoint files and an unwrapped run use
        with ema.swapped(ddp):
            swapped = net[0].weight.clone()
        target = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        plain.copy_to(target)
        return ema.names, ema._buffer_names, swapped, ema.shadow[0], target[0].weight.detach()
    finally:
        dist.destroy_process_group()


def test_a_ddp_wrapper_is_tracked_by_its_inner_names(tmp_path):
    names, buffers, swapped, shadow, copied = _ema_of_a_ddp_wrapper(tmp_path / "store")
    assert names == ["0.weight", "0.bias", "1.weight", "1.bias"] and buffers[0] == "1.running_mean"
    assert torch.equal(swapped, shadow) and torch.equal(copied, shadow)


def test_integer_parameters_are_copied_like_integer_buffers():
    net = nn.Linear(2, 2)
    net.register_parameter("codes", nn.Parameter(torch.arange(3), requires_grad=False))  # quantized weights
    ema = lw.EMA(net, decay=0.5)
    with torch.no_grad():
        net.weight.add_(2.0)
        net.codes.add_(5)
    ema.update()
    names = dict(zip(ema.names, ema.shadow))
    assert torch.equal(names["codes"], torch.arange(3) + 5) and names["codes"].dtype == torch.int64
    assert names["weight"].dtype == torch.float32 and not torch.equal(names["weight"], net.weight)
    assert set(ema.state_dict()["shadow"]) == {"weight", "bias", "codes"}


def test_an_ema_built_under_inference_mode_updates_outside_it():
    net = nn.Linear(2, 2)
    with torch.inference_mode():
        ema = lw.EMA(net, decay=0.5)
    before = ema.shadow[0].clone()
    with torch.no_grad():
        net.weight.add_(2.0)
    ema.update()
    assert torch.allclose(ema.shadow[0], (before + net.weight) / 2)


def test_ema_plain_loop_equals_fused():
    torch.manual_seed(0)
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.load_state_dict(a.state_dict())
    fused, loop = lw.EMA(a, decay=0.9, foreach=True), lw.EMA(b, decay=0.9, foreach=False)
    with torch.no_grad():
        a.weight.add_(1.0), b.weight.add_(1.0)
    fused.update(), loop.update()
    assert all(torch.equal(x, y) for x, y in zip(fused.shadow, loop.shadow))


def test_ema_of_a_half_precision_model_averages_in_float32():
    torch.manual_seed(0)
    half, full = nn.Linear(64, 64).bfloat16(), nn.Linear(64, 64)
    full.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    ema_half, ema_full = lw.EMA(half, decay=0.999), lw.EMA(full, decay=0.999)
    assert ema_half.shadow[0].dtype == torch.float32
    for _ in range(200):
        step = torch.randn(64, 64) * 0.01
        with torch.no_grad():
            full.weight.add_(step)
            half.weight.copy_(full.weight)
        ema_half.update(), ema_full.update()
    assert torch.allclose(ema_half.shadow[0], ema_full.shadow[0], atol=2e-3)
    with ema_half.swapped(half):
        assert half.weight.dtype == torch.bfloat16 and torch.equal(half.weight, ema_half.shadow[0].bfloat16())


def test_ema_copy_to_keeps_the_average():
    net = nn.Linear(2, 2)
    ema = lw.EMA(net, decay=0.5)
    with torch.no_grad():
        net.weight.add_(2.0)
    ema.update()
    expected = ema.shadow[0].clone()
    ema.copy_to(net)
    assert torch.equal(net.weight, expected)


def test_ema_copy_to_a_state_dict_is_refused_by_name():
    ema = lw.EMA(nn.Linear(2, 2))
    with pytest.raises(lw.OptionTypeError, match=r"EMA.copy_to \(or swapped\) takes an nn.Module"):
        ema.copy_to(nn.Linear(2, 2).state_dict())
    with pytest.raises(lw.OptionTypeError, match="got OrderedDict"), ema.swapped(nn.Linear(2, 2).state_dict()):
        pass


def test_ema_load_state_dict_reports_every_missing_tensor():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    state = lw.EMA(net).state_dict()
    del state["buffers"]["1.running_mean"], state["shadow"]["0.bias"]
    with pytest.raises(lw.StateError, match=r"0\.bias.*1\.running_mean|1\.running_mean.*0\.bias"):
        lw.EMA(net).load_state_dict(state)




# --------------------------------------------------------------------------- options and changed models


@pytest.mark.parametrize("options, error, match", [
    ({"decay": 1.5}, lw.OptionError, "decay=1.5"),
    ({"decay": float("nan")}, lw.OptionError, "decay=nan"),
    ({"decay": "0.9"}, lw.OptionTypeError, "decay='0.9'"),
    ({"every": 1.5}, lw.OptionTypeError, "every=1.5"),
    ({"every": 0}, lw.OptionError, "every=0"),
    ({"every": True}, lw.OptionTypeError, "every=True"),
    ({"warmup": -1}, lw.OptionError, "warmup=-1"),
    ({"warmup": 2.0}, lw.OptionTypeError, "warmup=2.0"),
    ({"update_after_step": -1}, lw.OptionError, "update_after_step=-1"),
    ({"update_after_step": 0.5}, lw.OptionTypeError, "update_after_step=0.5"),
    ({"buffers": "mean"}, lw.OptionError, "buffers='mean'"),
    ({"device": "nowhere"}, lw.OptionError, "device='nowhere'"),
    ({"device": "cuda:64"}, lw.OptionError, "device='cuda:64' is not available here"),  # AssertionError
])
def test_bad_options_are_named(options, error, match):
    with pytest.raises(error, match=match):
        lw.EMA(nn.Linear(2, 2), **options)


ANYTHING = st.one_of(st.none(), st.booleans(), st.integers(-3, 5), st.floats(allow_nan=True, allow_infinity=True),
                     st.text(max_size=4), st.lists(st.integers(), max_size=2))


@settings(max_examples=200, deadline=None)
@given(option=st.sampled_from(["decay", "warmup", "every", "buffers", "device", "foreach", "select",
                                     "update_after_step"]), value=ANYTHING)
def test_any_option_value_gives_an_ema_or_a_layerwise_error(option, value):
    try:
        lw.EMA(nn.Linear(2, 2), **{option: value})
    except lw.LayerwiseError:
        pass


@settings(max_examples=60, deadline=None)
@given(decay=st.floats(0, 1), every=st.integers(1, 3), warmup=st.integers(0, 3), calls=st.integers(0, 8),
       steps=st.lists(st.floats(-4, 4), min_size=8, max_size=8))
def test_the_average_is_the_recursion_on_every_every_th_call(decay, every, warmup, calls, steps):
    net = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(net.weight)
    ema = lw.EMA(net, decay=decay, every=every, warmup=warmup)
    expected, n = 0.0, 0
    for i in range(calls):
        with torch.no_grad():
            net.weight.fill_(steps[i])
        ema.update()
        if (i + 1) % every == 0:
            d = min(decay, (2 + n) / (11 + n)) if n < warmup else decay  # torch-ema: n counts from 1
            expected, n = d * expected + (1 - d) * steps[i], n + 1
    assert ema.num_updates == n == calls // every
    assert math.isclose(ema.shadow[0].item(), expected, rel_tol=1e-5, abs_tol=1e-5)


def test_decay_bounds_are_allowed():
    net = nn.Linear(2, 2)
    frozen, follower = lw.EMA(net, decay=1.0), lw.EMA(net, decay=0)
    with torch.no_grad():
        net.weight.add_(1.0)
    frozen.update(), follower.update()
    assert not torch.equal(frozen.shadow[0], net.weight) and torch.equal(follower.shadow[0], net.weight)


def test_load_state_dict_checks_everything_before_changing_anything():
    net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    ema = lw.EMA(net, decay=0.5)
    with torch.no_grad():
        net[0].weight.add_(1.0)
    ema.update()
    before = [s.clone() for s in ema.shadow]
    state = lw.EMA(net, decay=0.9).state_dict()
    state["shadow"] = {k: v + 7 for k, v in state["shadow"].items()}
    state["shadow"]["1.weight"] = torch.zeros(2, 3)  # the last tensor is wrong: nothing may be copied
    state["every"] = 1.5
    with pytest.raises(lw.StateError, match=r"every=1\.5.*1\.weight: \(2, 3\)"):
        ema.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(before, ema.shadow))
    assert (ema.decay, ema.every, ema.num_updates) == (0.5, 1, 1)


def test_a_model_converted_to_another_dtype_is_refused_by_name():
    net = nn.Linear(2, 2)
    ema = lw.EMA(net)
    net.half()
    with pytest.raises(lw.StateError, match=r"weight was torch\.float32 \(2, 2\) on cpu, is now torch\.float16"):
        ema.update()


def test_buffers_replaced_by_a_conversion_are_refused_by_name():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = lw.EMA(net)
    net.double()
    with pytest.raises(lw.StateError, match=r"buffer 1\.running_mean was replaced"):
        ema.update()


def test_a_replaced_or_added_parameter_is_refused_by_name():
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    ema = lw.EMA(net)
    net[1].weight = nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(lw.StateError, match=r"1\.weight was replaced"):
        ema.update()
    net = nn.Sequential(nn.Linear(2, 2))
    ema = lw.EMA(net)
    net.append(nn.Linear(2, 1))
    with pytest.raises(lw.StateError, match=r"1\.weight is a new parameter"):
        ema.update()
    with pytest.raises(lw.StateError, match=r"1\.bias is a new parameter"):
        ema.copy_to()


# --------------------------------------------------------------------------- subsets, devices, flat buffers


class LoRALinear(nn.Module):
    def __init__(self, d: int, r: int = 2):
        super().__init__()
        self.base = nn.Linear(d, d)
        self.base.requires_grad_(False)
        self.lora_a, self.lora_b = nn.Parameter(torch.randn(r, d)), nn.Parameter(torch.zeros(d, r))

    def forward(self, x):
        return self.base(x) + x @ self.lora_a.T @ self.lora_b.T


def test_select_tracks_only_the_adapters():
    torch.manual_seed(0)
    net = nn.Sequential(LoRALinear(8), nn.BatchNorm1d(8), LoRALinear(8))
    ema = lw.EMA(net, decay=0.5, select="**.lora_*")
    assert ema.names == ["0.lora_a", "0.lora_b", "2.lora_a", "2.lora_b"] and ema.shadow_buffers == []
    base = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update()
    with ema.swapped():
        assert torch.equal(net[0].lora_b, torch.full((8, 2), 0.5))
        assert torch.equal(net[0].base.weight, base["0.base.weight"] + 1)  # untracked: the training weight
    assert sum(s.numel() for s in ema.shadow) == 4 * 16
    with_buffers = lw.EMA(net, select=["**.lora_*", "1"])
    assert with_buffers._buffer_names == ["1.running_mean", "1.running_var", "1.num_batches_tracked"]


def test_a_new_parameter_outside_the_selection_is_fine():
    net = nn.Sequential(LoRALinear(4))
    ema = lw.EMA(net, select="**.lora_*")
    net.append(nn.Linear(4, 4))
    ema.update()
    net.append(LoRALinear(4))
    with pytest.raises(lw.StateError, match=r"2\.lora_a is a new parameter"):
        ema.update()


def test_shadows_on_another_device_take_the_copying_path():
    net = nn.Linear(3, 3).bfloat16()
    ema = lw.EMA(net, decay=0.5, device="meta")  # the only second device every machine has
    assert [b.elsewhere and b.mixed and not b.fused for b in ema._buckets] == [True]
    ema.update()
    assert ema.shadow[0].device.type == "meta" and ema.shadow[0].dtype == torch.float32


def test_device_keeps_the_shadow_there():
    net = nn.Linear(3, 3)
    ema = lw.EMA(net, decay=0.5, device="cpu")
    with torch.no_grad():
        net.weight.add_(2.0)
    ema.update()
    assert ema.shadow[0].device.type == "cpu"


def flat_linear_stack() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    params = list(net.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    offset = 0
    for p in params:
        p.data = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    return net, flat


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parameters_tiling_one_buffer_are_averaged_in_one_kernel(dtype):
    net, _ = flat_linear_stack()
    net.to(dtype)  # .to() re-lays out: re-flatten in the new dtype
    params = list(net.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    offset = 0
    for p in params:
        p.data = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    reference = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).to(dtype)
    reference.load_state_dict(net.state_dict())
    ema, ref = lw.EMA(net, decay=0.9), lw.EMA(reference, decay=0.9)
    assert [b.flat is not None for b in ema._buckets] == [True]
    flat_shadow = ema._buckets[0].flat[0]  # one allocation; the per-parameter shadows are views of it
    assert all(s.untyped_storage().data_ptr() == flat_shadow.data_ptr() for s in ema.shadow)
    assert flat_shadow.dtype == torch.float32
    for _ in range(3):
        with torch.no_grad():
            flat.add_(torch.randn_like(flat))
            reference.load_state_dict(net.state_dict())
        ema.update(), ref.update()
    for a, b in zip(ema.shadow, ref.shadow):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-6)
    assert ema.state_dict()["shadow"]["1.bias"].shape == (2,)
    net.float() if dtype != torch.float32 else net.double()
    with pytest.raises(lw.StateError, match="1.bias was"):
        ema.update()


# --------------------------------------------------------------------------- FSDP2: sharded shadows


def _sharded_mlp(mesh, seed: int) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))  # 7 and 3 rows: uneven shards on 2 ranks
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _train(model, ema, steps, seed):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 5, generator=gen)  # the same batch on every rank: the run equals one process
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ema.update()


def fsdp_ema(rank, world_size, ckpt):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode

    mesh = init_device_mesh("cpu", (world_size,))
    model = _sharded_mlp(mesh, seed=0)
    ema = lw.EMA(model, decay=0.8)
    locals_ok = all(s.to_local().shape == p.to_local().shape for s, p in zip(ema.shadow, model.parameters()))
    _train(model, ema, 2, seed=1)
    dcp.save({"model": model.state_dict(), "ema": ema.state_dict()}, checkpoint_id=ckpt)
    with CommDebugMode() as comm:
        ema.update()
        ema.update()
    update_collectives = comm.get_total_counts()
    with CommDebugMode() as comm:
        ema.shadow[0].full_tensor()
    gather_collectives = comm.get_total_counts()  # the counter sees a collective when there is one

    training = [p.to_local().clone() for p in model.parameters()]
    probe = torch.linspace(-1, 1, 10).reshape(2, 5)
    with ema.swapped():
        swapped = [p.full_tensor() for p in model.parameters()]
        output = model(probe)  # FSDP2 all-gathers the swapped-in shards
    restored = all(torch.equal(a, p.to_local()) for a, p in zip(training, model.parameters()))
    after = model(probe).detach()  # gathers the training shards again, not the swapped-in weights
    model.reshard()

    resumed_model = _sharded_mlp(mesh, seed=5)  # other weights: everything must come from the checkpoint
    resumed = lw.EMA(resumed_model, decay=0.5, warmup=3)
    state = {"model": resumed_model.state_dict(), "ema": resumed.state_dict()}
    dcp.load(state, checkpoint_id=ckpt)
    resumed_model.load_state_dict(state["model"])
    resumed.load_state_dict(state["ema"])
    resumed.update(), resumed.update()
    bit_identical = all(torch.equal(a.to_local(), b.to_local()) for a, b in zip(ema.shadow, resumed.shadow))

    torch.manual_seed(0)  # an EMA saved by one process, unsharded, loads into the sharded one: a slice per rank
    plain = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    plain_ema = lw.EMA(plain, decay=0.8)
    _train(plain, plain_ema, 2, seed=1)
    from_full = lw.EMA(_sharded_mlp(mesh, seed=6))
    from_full.load_state_dict(plain_ema.state_dict())
    sliced = all(torch.equal(s.full_tensor(), f) for s, f in zip(from_full.shadow, plain_ema.shadow))
    return {"locals_ok": locals_ok, "update": update_collectives, "gather": gather_collectives,
            "restored": restored, "swapped": swapped, "output": output.detach(), "after": after, "full": [s.full_tensor() for s in ema.shadow],
            "resumed": bit_identical, "sliced": sliced, "decay": resumed.decay, "num_updates": resumed.num_updates}


def test_fsdp2_shadows_are_sharded_local_and_resume_bit_identically(run_ranks, tmp_path):
    r0, r1 = run_ranks(fsdp_ema, str(tmp_path / "ckpt"))
    for r in (r0, r1):
        assert r["locals_ok"] and r["restored"] and r["resumed"] and r["sliced"]
        assert r["update"] == 0 and r["gather"] > 0
        assert (r["decay"], r["num_updates"]) == (0.8, 4)
    # the same run in one process, unsharded
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    ema = lw.EMA(model, decay=0.8)
    _train(model, ema, 2, seed=1)
    ema.update(), ema.update()
    for full, swapped, single in zip(r0["full"], r0["swapped"], ema.shadow):
        assert torch.allclose(full, single, atol=1e-6) and torch.equal(swapped, full)
    probe = torch.linspace(-1, 1, 10).reshape(2, 5)
    assert torch.allclose(r0["after"], model(probe), atol=1e-6)
    with ema.swapped():
        assert torch.allclose(r0["output"], model(probe), atol=1e-6)


_HAS_CC = any(map(__import__("shutil").which, ("cc", "gcc", "clang")))


@pytest.mark.skipif(not _HAS_CC, reason="no C compiler")
@pytest.mark.parametrize("layout", ["plain", "flat", "float64", "bfloat16", "subset"])
def test_compile_averages_bit_for_bit_as_torchs_lerp(layout, interleaved):
    """compile=True: the native lerp gives the eager EMA's shadows exactly, through warmup (lerp weights
    >= 0.5 take torch's other formula) and update_after_step; bf16 models keep the eager float32 path."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 300), nn.Tanh(), nn.Linear(300, 7)) if layout != "subset" else interleaved
    if layout == "flat":
        lw.flatten_parameters(model)
    if layout in ("float64", "bfloat16"):
        model.to(getattr(torch, layout))
    options = {"warmup": 6, "update_after_step": 1, "select": "lstm*" if layout == "subset" else None}
    eager, native = lw.EMA(model, decay=0.99, compile=False, **options), lw.EMA(model, decay=0.99, compile=True,
                                                                                 **options)
    default = lw.EMA(model, decay=0.99, **options)  # native where installed with layerwise
    if layout in ("plain", "flat", "float64", "subset"):
        assert all(b.native is not None for b in native._buckets)
    assert all(b.native is None for b in eager._buckets)
    for _ in range(9):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        for ema in (eager, native, default):
            ema.update()
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(eager.shadow, native.shadow, default.shadow))
    assert eager.state_dict()["num_updates"] == native.state_dict()["num_updates"] == 9


def test_compile_takes_a_bool_or_none_and_names_a_missing_compiler(unpackaged, monkeypatch):
    with pytest.raises(lw.OptionTypeError, match=r"EMA: compile='yes': pass None, True or False"):
        lw.EMA(nn.Linear(2, 2), compile="yes")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    net = nn.Linear(2, 2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(lw.MissingExtraError, match=r"C compiler.*compile=None or False"):
        lw.EMA(net, compile=True)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items()) and not any(unpackaged.iterdir())


@pytest.mark.skipif(not _HAS_CC, reason="no C compiler")
@pytest.mark.parametrize("decay", [0.50000001, 0.49999999, 0.5, 1 - 2.0**-30])
def test_compile_matches_torch_where_the_lerp_weight_rounds_to_one_half(decay):
    """torch rounds the weight to the tensors' dtype before choosing its formula; so does the native lerp."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 200), nn.Linear(200, 3))
    eager, native = lw.EMA(model, decay=decay, compile=False), lw.EMA(model, decay=decay, compile=True)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(-3.7).add_(1.3)
        eager.update()
        native.update()
    assert all(torch.equal(a, b) for a, b in zip(eager.shadow, native.shadow))


@pytest.mark.skipif(not _HAS_CC, reason="no C compiler")
@pytest.mark.parametrize("how", ["data", "set_"])
def test_a_shadow_given_new_memory_is_averaged_there(how):
    """The native plan writes by address: a shadow whose memory is replaced gets a new plan, as eager
    follows it (before, the plan wrote into the freed memory)."""
    torch.manual_seed(0)
    model = nn.Linear(1000, 2)
    with torch.no_grad():
        model.weight.fill_(1.0)
    emas = [lw.EMA(model, decay=0.5, compile=c) for c in (False, True)]
    for ema in emas:
        fresh = torch.zeros(2, 1000)
        if how == "data":
            ema.shadow[0].data = fresh
        else:
            ema.shadow[0].set_(fresh)
        del fresh
        ema.update()
        ema.update()
    assert emas[1].shadow[0][0, :3].tolist() == [0.75] * 3
    assert all(torch.equal(a, b) for a, b in zip(*(e.shadow for e in emas)))


@pytest.mark.skipif(not _HAS_CC, reason="no C compiler")
def test_compile_keeps_torchs_kernels_where_torch_does_not_fuse_its_lerp(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")  # no AVX2: unfused in torch
    emas = [lw.EMA(nn.Linear(4, 4), compile=c) for c in (None, True)]
    assert all(b.native is None for ema in emas for b in ema._buckets)


def fsdp_ema_compiled(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh

    model = _sharded_mlp(init_device_mesh("cpu", (world_size,)), seed=0)
    emas = [lw.EMA(model, decay=0.8, warmup=2, compile=c) for c in (False, True)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        model(torch.randn(4, 5, generator=gen)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        for ema in emas:
            ema.update()
    eager, native = ([s.to_local() for s in ema.shadow] for ema in emas)
    return [b.native is not None for b in emas[1]._buckets], all(map(torch.equal, eager, native))


@pytest.mark.skipif(not _HAS_CC, reason="no C compiler")
def test_compile_averages_fsdp2_shards_as_eager(run_ranks):
    for natives, equal in run_ranks(fsdp_ema_compiled):
        assert natives and all(natives) and equal


@pytest.mark.parametrize("view", ["neg", "conj"])
@pytest.mark.parametrize("compile", [None, False])
def test_negative_and_conjugate_views_are_averaged_as_their_values(view, compile):
    """A flat view rebuilt over their storage would drop the bit: the shadows started with the wrong sign."""
    model = nn.Module()
    if view == "neg":
        model.w = nn.Parameter(torch._neg_view(torch.arange(1.0, 5.0)))
    else:
        model.w = nn.Parameter(torch.tensor([1 - 2j, 3 + 1j]).conj())
    ema = lw.EMA(model, decay=0.5, compile=compile)
    assert torch.equal(ema.shadow[0], model.w.detach().resolve_neg().resolve_conj())
    with torch.no_grad():
        model.w.mul_(3)
    ema.update()
    assert torch.allclose(ema.shadow[0], 2 * model.w.detach().resolve_neg().resolve_conj() / 3)
