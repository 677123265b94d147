import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import layerwise as lw
from _surgery_helpers import assert_same_grads, backward_interleaved, copy_with_grads, grads_of, random_grads
from layerwise.errors import GradError, NonFiniteGradError

from conftest import random_models

# --------------------------------------------------------------------------- clipping


def test_per_selection_is_torch_clip_grad_norm_exactly(vit):
    reference = copy.deepcopy(vit)
    for norm_type, foreach in [(2.0, None), (math.inf, False), (1.0, True)]:
        random_grads(vit, scale=10.0)
        random_grads(reference, scale=10.0)
        norms = lw.clip_grad_norm(vit, 1.0, norm_type=norm_type, foreach=foreach)
        total = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0, norm_type=norm_type, foreach=foreach)
        assert list(norms) == ["total"] and torch.equal(norms["total"], total)
        for p, q in zip(vit.parameters(), reference.parameters()):
            assert torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
@pytest.mark.parametrize("foreach", [None, False])
def test_per_layer_clips_each_layer_like_torch_on_that_layer(vit, norm_type, foreach):
    random_grads(vit)
    vit.blocks[0].mlp[0].weight.grad *= 100  # one layer far above max_norm, most below
    reference = copy_with_grads(vit)
    before = grads_of(vit)
    norms = lw.clip_grad_norm(vit, 5.0, per="layer", norm_type=norm_type, foreach=foreach)
    layers = list(dict.fromkeys(name.rpartition(".")[0] for name, _ in vit.named_parameters()))
    assert list(norms) == layers
    for layer in layers:
        module = reference.get_submodule(layer)
        expected = torch.nn.utils.clip_grad_norm_(module.parameters(recurse=False), 5.0, norm_type=norm_type)
        torch.testing.assert_close(norms[layer], expected, rtol=1e-6, atol=0)
        for name, p in vit.get_submodule(layer).named_parameters(recurse=False):
            full = f"{layer}.{name}" if layer else name
            if expected <= 5.0:
                assert torch.equal(p.grad, before[full]), full  # left bit-identical
            torch.testing.assert_close(p.grad, getattr(module, name).grad, rtol=1e-6, atol=0)
    assert norms["blocks.0.mlp.0"] > 5.0 and torch.linalg.vector_norm(vit.blocks[0].mlp[0].weight.grad, norm_type) <= 5.0


def test_per_layer_skips_parameters_without_a_gradient(interleaved):
    lw.set_grad(interleaved, "linear.weight", 3.0)
    norms = lw.clip_grad_norm(interleaved, 1.0, "lstm1", "linear", per="layer")
    assert list(norms) == ["lstm1", "linear"]
    assert norms["lstm1"] == 0 and interleaved.linear.bias.grad is None
    torch.testing.assert_close(interleaved.linear.weight.grad.norm(), torch.tensor(1.0))


def test_per_group_clips_each_param_group_like_torch(vit):
    opt = torch.optim.SGD([{"params": vit.blocks.parameters()},
                           {"params": [p for n, p in vit.named_parameters() if not n.startswith("blocks.")], "lr": 0.1}], lr=0.01)
    random_grads(vit, scale=3.0)
    reference = copy_with_grads(vit)
    ref_opt = torch.optim.SGD([{"params": reference.blocks.parameters()},
                               {"params": [p for n, p in reference.named_parameters() if not n.startswith("blocks.")]}], lr=0.01)
    norms = lw.clip_grad_norm(vit, 2.0, per="group", optimizer=opt)
    assert list(norms) == [0, 1]
    for g, group in enumerate(ref_opt.param_groups):
        assert torch.equal(norms[g], torch.nn.utils.clip_grad_norm_(group["params"], 2.0))
    for p, q in zip(vit.parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_per_group_needs_the_optimizer_holding_the_gradients(vit):
    random_grads(vit)
    before = grads_of(vit)
    opt = torch.optim.SGD(vit.blocks.parameters(), lr=0.1)
    with pytest.raises(GradError, match="pass optimizer="):
        lw.clip_grad_norm(vit, 1.0, per="group")
    with pytest.raises(GradError, match="cls_token, patch_embed.weight, .* are in no param group"):
        lw.clip_grad_norm(vit, 1.0, per="group", optimizer=opt)
    with pytest.raises(GradError, match="only with per='group'"):
        lw.clip_grad_norm(vit, 1.0, optimizer=opt)
    with pytest.raises(GradError, match="per must be"):
        lw.clip_grad_norm(vit, 1.0, per="module")
    assert_same_grads(vit, before)
    assert list(lw.clip_grad_norm(vit, 1.0, "blocks", per="group", optimizer=opt)) == [0]


@pytest.mark.parametrize("per", ["layer", "selection", "group"])
def test_error_if_nonfinite_names_the_layer_and_changes_nothing(per, interleaved):
    backward_interleaved(interleaved)
    interleaved.lstm2.weight_hh_l0.grad[0, 0] = math.nan
    before = grads_of(interleaved)
    opt = torch.optim.SGD(interleaved.parameters(), lr=0.1) if per == "group" else None
    with pytest.raises(NonFiniteGradError) as e:
        lw.clip_grad_norm(interleaved, 1.0, per=per, optimizer=opt, error_if_nonfinite=True)
    assert "'lstm2'" in str(e.value) and "lstm1" not in str(e.value) and "error_if_nonfinite=False" in str(e.value)
    assert_same_grads(interleaved, before)


@given(random_models(), st.integers(0, 2 ** 16), st.floats(1e-3, 1e3), st.sampled_from([2.0, 1.0, math.inf]))
def test_per_layer_norms_end_at_most_max_norm_and_no_gradient_grows(model, seed, max_norm, norm_type):
    random_grads(model, scale=float(torch.empty(()).log_normal_(0, 3, generator=torch.Generator().manual_seed(seed))), seed=seed)
    before = {name: p.grad.clone() for name, p in model.named_parameters()}
    lw.clip_grad_norm(model, max_norm, per="layer", norm_type=norm_type)
    layers: dict[str, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        layers.setdefault(name.rpartition(".")[0], []).append(p.grad)
        # Clipping only shrinks: each gradient is its old self times one factor in [0, 1].
        assert (p.grad.abs() <= before[name].abs()).all()
        assert (p.grad * before[name] >= 0).all()
    for grads in layers.values():
        norm = torch.nn.utils.get_total_norm(grads, norm_type)
        assert norm <= max_norm * (1 + 1e-5)




@pytest.mark.parametrize("max_norm, error, words", [
    (-1.0, lw.OptionError, "max_norm must be >= 0"),
    (math.nan, lw.OptionError, "max_norm must be >= 0"),
    ("1.0", lw.OptionTypeError, "max_norm must be a real number, got str"),
    (True, lw.OptionTypeError, "got bool"),
])
@pytest.mark.parametrize("per", ["selection", "layer"])
def test_a_negative_or_nan_max_norm_is_refused_and_changes_nothing(vit, max_norm, error, words, per):
    random_grads(vit)
    before = grads_of(vit)
    with pytest.raises(error, match=words):
        lw.clip_grad_norm(vit, max_norm, per=per)
    assert_same_grads(vit, before)


@pytest.mark.parametrize("per", ["selection", "layer"])
def test_sparse_gradients_clip_as_their_dense_equals(per):
    models = []
    for sparse in (True, False):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Embedding(6, 3, sparse=sparse), torch.nn.Linear(3, 1))
        net(torch.tensor([1, 4, 1, 1])).pow(2).sum().backward()  # row 1 three times: an uncoalesced gradient
        models.append(net)
    assert models[0][0].weight.grad.is_sparse
    got, expected = (lw.clip_grad_norm(net, 0.5, per=per) for net in models)
    assert got.keys() == expected.keys() and all(torch.allclose(got[k], expected[k]) for k in got)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert torch.allclose(p.grad.to_dense(), q.grad, atol=1e-7)


def test_max_norm_zero_zeroes_and_inf_leaves_bit_identical(vit):
    random_grads(vit)
    before = grads_of(vit)
    lw.clip_grad_norm(vit, math.inf, per="layer")
    assert_same_grads(vit, before)
    lw.clip_grad_norm(vit, 0.0)
    assert all((p.grad == 0).all() for p in vit.parameters())


# --------------------------------------------------------------------------- sharded (FSDP2)


def _uneven_mlp() -> torch.nn.Module:
    torch.manual_seed(0)  # sizes that do not divide by 2 ranks
    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 7), torch.nn.Tanh(),
                               torch.nn.Linear(7, 3))


def _backward_share(model: torch.nn.Module, rank: int, world_size: int) -> None:
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    model(x[rank::world_size]).square().mean().mul(100).backward()  # big enough that every layer clips


def _fsdp_clip(rank: int, world_size: int, shape: tuple[int, ...]) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    names = ("replicate", "shard")[-len(shape):]  # (2, 2): HSDP, two replicas of a 2-way sharding
    model = fully_shard(_uneven_mlp(), mesh=init_device_mesh("cpu", shape, mesh_dim_names=names))
    opt = torch.optim.SGD([{"params": model[0].parameters()}, {"params": [*model[2:].parameters()]}], lr=0.1)
    calls = []
    all_reduce = dist.all_reduce
    dist.all_reduce = lambda *a, **k: calls.append(1) or all_reduce(*a, **k)
    out = {}
    for per, optimizer in (("layer", None), ("group", opt), ("selection", None)):
        model.zero_grad()
        _backward_share(model, rank, world_size)
        calls.clear()
        norms = lw.clip_grad_norm(model, 1.0, per=per, optimizer=optimizer)
        out[per] = ({k: v.clone() for k, v in norms.items()}, len(calls),
                    {n: p.grad.full_tensor() for n, p in model.named_parameters()})
    if len(shape) == 1:  # DDP in the same processes: gradients arrive averaged, so clipping needs no collective
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(_uneven_mlp())
        _backward_share(ddp, rank, world_size)
        calls.clear()
        norms = lw.clip_grad_norm(ddp.module, 1.0, per="layer")
        out["ddp"] = ({k: v.clone() for k, v in norms.items()}, len(calls),
                      {n: p.grad.clone() for n, p in ddp.module.named_parameters()})
    dist.all_reduce = all_reduce
    return out


@pytest.mark.parametrize("shape", [(2,), (2, 2)], ids=["fsdp2-and-ddp", "hsdp"])
def test_clipping_a_sharded_model_equals_one_process_with_one_collective_per_call(run_ranks, shape):
    world_size = math.prod(shape)
    ranks = run_ranks(_fsdp_clip, shape, world_size=world_size)
    model = _uneven_mlp()
    opt = torch.optim.SGD([{"params": model[0].parameters()}, {"params": [*model[2:].parameters()]}], lr=0.1)
    cases = [("layer", None), ("group", opt), ("selection", None)] + ([("ddp", None)] if len(shape) == 1 else [])
    for per, optimizer in cases:
        model.zero_grad()
        for rank in range(world_size):  # the mean of the ranks' losses: what FSDP2's averaged gradient is
            _backward_share(model, rank, world_size)
        for p in model.parameters():
            p.grad /= world_size
        expected = lw.clip_grad_norm(model, 1.0, per="layer" if per == "ddp" else per, optimizer=optimizer)
        for norms, collectives, grads in (r[per] for r in ranks):
            assert collectives == (0 if per == "ddp" else 1), per
            assert list(norms) == list(expected) and all(norms[k] > 1.0 for k in norms)
            for key, value in expected.items():
                torch.testing.assert_close(norms[key], value, rtol=1e-6, atol=0, msg=f"{per} {key}")
            for name, p in model.named_parameters():
                torch.testing.assert_close(grads[name], p.grad, rtol=1e-6, atol=1e-7, msg=f"{per} {name}")


def test_per_group_names_an_optimizer_that_is_not_one(vit):
    with pytest.raises(GradError, match="pass optimizer=, a torch.optim.Optimizer, not list"):
        lw.clip_grad_norm(vit, 1.0, per="group", optimizer=lw.param_groups(vit))


@pytest.mark.parametrize("flag, value", [("error_if_nonfinite", "no"), ("foreach", "no"), ("foreach", 0)])
def test_flags_are_bools_not_truthy_words(interleaved, flag, value):
    random_grads(interleaved, scale=10.0)
    before = grads_of(interleaved)
    with pytest.raises(lw.OptionTypeError, match=f"clip_grad_norm: {flag}={value!r}: pass"):
        lw.clip_grad_norm(interleaved, 1.0, **{flag: value})
    assert_same_grads(interleaved, before)  # nothing was clipped


def test_per_layer_clips_complex_gradients_as_torch_does_layer_by_layer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))
    random_grads(net, scale=5.0)
    net[0].register_parameter("z", nn.Parameter(torch.randn(4, dtype=torch.complex64)))
    net[0].z.grad = torch.randn(4, dtype=torch.complex64) * 5
    reference = copy_with_grads(net)
    norms = lw.clip_grad_norm(net, 1.0, per="layer")  # the complex norm was cast to complex and clamp failed
    for layer in ("0", "1"):
        expected = torch.nn.utils.clip_grad_norm_(list(getattr(reference, layer).parameters()), 1.0)
        assert norms[layer].dtype == torch.float32 and torch.allclose(norms[layer], expected)
    for p, q in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
