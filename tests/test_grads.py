import copy
import io
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import layerwise as lw

from conftest import random_models


def by_hand(*grads: torch.Tensor) -> dict[str, float]:
    """The five statistics of the concatenated gradients, computed the obvious way in float64."""
    g = torch.cat([x.detach().double().flatten() for x in grads])
    return {"norm": g.norm().item(), "mean": g.mean().item(), "std": g.std().item(),
            "max_abs": g.abs().max().item(), "zero_frac": (g == 0).double().mean().item()}


def backward(vit) -> None:
    torch.manual_seed(1)
    vit(torch.randn(3, 5, 12)).square().mean().backward()


def assert_stats_close(got: dict[str, float], want: dict[str, float]) -> None:
    """Float32 accumulation: errors scale with the magnitude of the values, not of a mean that cancels out."""
    assert got.keys() == want.keys()
    for stat in want:
        assert got[stat] == pytest.approx(want[stat], rel=1e-5, abs=1e-6 * want["max_abs"], nan_ok=True), stat


# --------------------------------------------------------------------------- grad_stats


@pytest.mark.parametrize("foreach", [None, True, False])
def test_stats_equal_a_hand_computation_per_parameter(vit, foreach):
    backward(vit)
    vit.head.weight.grad[0] = 0  # some exact zeros: one row of three
    result = lw.grad_stats(vit, foreach=foreach)
    assert [name for name, _ in result] == [n for n, _ in vit.named_parameters()]
    for name, p in vit.named_parameters():
        assert_stats_close(result[name], by_hand(p.grad))
    assert result["head.weight"]["zero_frac"] == pytest.approx(1 / 3)


def test_half_precision_gradients_are_accumulated_in_float32():
    p = nn.Parameter(torch.zeros(4096, dtype=torch.bfloat16))
    p.grad = torch.full_like(p, 1 / 3)
    holder = nn.Module()
    holder.p = p
    got = lw.grad_stats(holder)["p"]
    assert_stats_close(got, by_hand(p.grad))


def test_a_parameter_without_gradient_is_reported_not_skipped(vit):
    before = lw.grad_stats(vit)
    assert all(row is None for _, row in before) and len(before.no_grad) == len(before)
    vit.head(torch.randn(2, 8)).sum().backward()
    result = lw.grad_stats(vit)
    assert len(result) == len(list(vit.parameters()))
    assert result["head.weight"] is not None and result["cls_token"] is None
    assert result.no_grad == [n for n, _ in vit.named_parameters() if not n.startswith("head.")]
    out = io.StringIO()
    result.print(file=out)
    assert "no grad" in out.getvalue() and "head.weight" in out.getvalue()


def test_frozen_parameters_are_left_out_unless_selected(interleaved):
    interleaved.lstm2.requires_grad_(False)
    interleaved(torch.randn(2, 3, 4)).sum().backward()
    lstm2 = [n for n, _ in interleaved.named_parameters() if n.startswith("lstm2.")]
    assert not set(lstm2) & set(lw.grad_stats(interleaved).to_dict())
    selected = lw.grad_stats(interleaved, "lstm2")
    assert list(selected.to_dict()) == lstm2 and selected.no_grad == lstm2
    out = io.StringIO()
    selected.print(file=out)
    assert "frozen" in out.getvalue()


def test_the_remembered_selection_follows_every_change_to_the_model(vit):
    backward(vit)
    names = [n for n, _ in vit.named_parameters()]
    assert list(lw.grad_stats(vit).to_dict()) == names
    vit.head.requires_grad_(False)  # frozen: left out from now on
    assert list(lw.grad_stats(vit).to_dict()) == [n for n in names if not n.startswith("head.")]
    vit.head.requires_grad_(True)
    vit.head.weight = nn.Parameter(torch.zeros(3, 8))  # replaced: the new one has no gradient
    assert lw.grad_stats(vit)["head.weight"] is None
    vit.head.weight.grad = torch.ones(3, 8)
    assert lw.grad_stats(vit, "head.weight")["head.weight"]["mean"] == 1.0
    vit.head.weight.data = torch.ones(3, 4)  # resized in place: the mean counts its new size
    vit.head.weight.grad = torch.ones(3, 4)
    assert lw.grad_stats(vit, "head.weight")["head.weight"]["mean"] == 1.0
    vit.extra = nn.Linear(1, 1)  # a new module: a new row
    vit.extra(torch.ones(1, 1)).sum().backward()
    assert list(lw.grad_stats(vit, "extra").to_dict()) == ["extra.weight", "extra.bias"]
    assert lw.grad_stats(vit).to_dict().keys() >= {"extra.weight", "extra.bias"}
    # A callable selector may read anything (here: a gradient's size), so it is resolved on each call.
    big = lambda name, p: p.grad is not None and p.grad.numel() > 20  # noqa: E731
    first = list(lw.grad_stats(vit, big).to_dict())
    vit.blocks[0].zero_grad(set_to_none=True)
    assert list(lw.grad_stats(vit, big).to_dict()) == [n for n in first if not n.startswith("blocks.0.")]


def test_a_shared_parameter_is_reported_once_under_its_first_name(tied_lm):
    tied_lm(torch.tensor([[1, 2, 3]])).sum().backward()
    names = list(lw.grad_stats(tied_lm).to_dict())
    assert "embed.weight" in names and "decoder.weight" not in names


def test_by_module_and_by_depth_pool_exactly(vit):
    backward(vit)
    params = dict(vit.named_parameters())
    for by, group_of in (("module", lambda n: n.rpartition(".")[0] or n), (2, lambda n: ".".join(n.split(".")[:2]))):
        groups: dict[str, list[torch.Tensor]] = {}
        for name, p in params.items():
            groups.setdefault(group_of(name), []).append(p.grad)
        result = lw.grad_stats(vit, by=by)
        assert list(result.to_dict()) == list(groups)
        for group, grads in groups.items():
            assert_stats_close(result[group], by_hand(*grads))
    assert "blocks.1.mlp" in lw.grad_stats(vit, by=3).to_dict()
    assert "cls_token" in lw.grad_stats(vit, by="module").to_dict()  # a root parameter is its own group


@given(random_models(), st.integers(0, 2**16))
def test_module_norms_are_the_root_sum_of_squares_of_parameter_norms(model, seed):
    torch.manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * (torch.rand_like(p) > 0.3)
    per_param = lw.grad_stats(model).to_dict()
    per_module = lw.grad_stats(model, by="module").to_dict()
    owners: dict[str, list[str]] = {}
    for name in per_param:
        owners.setdefault(name.rpartition(".")[0] or name, []).append(name)
    assert list(per_module) == list(owners)
    for module, names in owners.items():
        norms = [per_param[n]["norm"] for n in names]
        assert per_module[module]["norm"] == pytest.approx(math.sqrt(sum(x * x for x in norms)), rel=1e-6)
        assert per_module[module]["max_abs"] == max(per_param[n]["max_abs"] for n in names)


def test_dead_layers_are_flagged(vit):
    backward(vit)
    vit.norm.bias.grad.zero_()
    result = lw.grad_stats(vit)
    assert "norm.bias" in result.dead
    assert result.dead == [n for n, p in vit.named_parameters() if not p.grad.count_nonzero()]
    out = io.StringIO()
    result.print(file=out)
    assert "dead" in out.getvalue()


def test_unknown_statistic_and_grouping_are_errors_that_say_what_is_valid(vit):
    with pytest.raises(lw.GradError, match="unknown statistic 'nrom'.*did you mean 'norm'.*max_abs, zero_frac"):
        lw.grad_stats(vit, stats=["norm", "nrom"])
    with pytest.raises(lw.GradError, match="by='block'.*'param', 'module', or a depth"):
        lw.grad_stats(vit, by="block")
    with pytest.raises(ValueError):
        lw.grad_stats(vit, by=0)


class SparseBag(nn.Module):
    """A sparse embedding (its gradient is a sparse COO tensor) feeding a dense layer."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 3, sparse=True)
        self.out = nn.Linear(3, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(tokens)).sum()


def sparse_backward(tokens=((1, 1, 4), (2, 4, 4))) -> SparseBag:
    torch.manual_seed(0)
    model = SparseBag()
    for row in tokens:  # two backwards: an uncoalesced gradient with repeated rows
        model(torch.tensor(row)).backward()
    assert model.embed.weight.grad.is_sparse and not model.embed.weight.grad.is_coalesced()
    return model


@pytest.mark.parametrize("foreach", [None, False])
def test_sparse_gradients_get_the_statistics_of_their_dense_form(foreach):
    model = sparse_backward()
    dense = model.embed.weight.grad.to_dense()
    got = lw.grad_stats(model, foreach=foreach)
    assert_stats_close(got["embed.weight"], by_hand(dense))
    assert got["embed.weight"]["zero_frac"] == pytest.approx(7 / 10), "rows 0, 3, 5-9 are implicit zeros"
    pooled = lw.grad_stats(model, by="module")["embed"]
    assert_stats_close(pooled, by_hand(dense))
    assert lw.check_grads(model).ok


def test_sparse_gradients_are_checked_for_nonfinite_values():
    model = sparse_backward()
    with lw.watch_nonfinite(model):  # finite: every backward of a sparse model passes
        model(torch.tensor([3])).backward()
    model.embed.weight.grad = torch.sparse_coo_tensor([[2]], [[0.0, math.nan, 0.0]], (10, 3))
    assert lw.check_grads(model).nonfinite == ["embed.weight"]
    assert lw.grad_stats(model).nonfinite == ["embed.weight"]
    model.zero_grad()
    model.out.weight.data[0, 0] = math.inf
    with lw.watch_nonfinite(model), pytest.raises(lw.NonFiniteGradError) as e:
        model(torch.tensor([3])).backward()
    assert e.value.names[0] == "embed.weight"


def test_complex_gradients_get_magnitude_statistics_and_a_named_refusal_of_the_rest():
    holder = nn.Module()
    holder.z = nn.Parameter(torch.zeros(4, dtype=torch.complex64))
    holder.z.grad = torch.tensor([3 + 4j, 0j, -1j, 0j], dtype=torch.complex64)
    got = lw.grad_stats(holder, stats=["norm", "max_abs", "zero_frac"])["z"]
    assert got == pytest.approx({"norm": math.sqrt(26), "max_abs": 5.0, "zero_frac": 0.5})
    with pytest.raises(lw.GradError, match="'z' has a complex gradient.*stats=\\['norm', 'max_abs', 'zero_frac'\\]"):
        lw.grad_stats(holder)
    assert lw.check_grads(holder).ok
    holder.z.grad[1] = complex(math.nan, 0)
    assert lw.check_grads(holder).nonfinite == ["z"]


# --------------------------------------------------------------------------- anomaly checks


class BadBackward(torch.autograd.Function):
    """Identity forward whose backward turns the gradient into NaN."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.nan


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return BadBackward.apply(x * self.weight)


def nan_in_the_middle() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), Scale(), nn.Linear(4, 2))


def test_watch_nonfinite_names_the_layer_where_nan_first_appears():
    net = nan_in_the_middle()  # layer 1's backward makes NaN, which then spreads to layer 0
    with lw.watch_nonfinite(net), pytest.raises(lw.NonFiniteGradError, match=r"gradient of '1\.weight'") as e:
        net(torch.randn(2, 3)).sum().backward()
    assert e.value.names[0] == "1.weight" and sorted(e.value.names[1:]) == ["0.bias", "0.weight"]
    assert net[2].weight.grad.isfinite().all()


def test_watch_nonfinite_checks_every_backward_until_removed():
    net = nan_in_the_middle()
    watch = lw.watch_nonfinite(net)
    for _ in range(2):
        with pytest.raises(lw.NonFiniteGradError, match=r"'1\.weight'"):
            net(torch.randn(2, 3)).sum().backward()
    watch.remove()
    watch.remove()
    net(torch.randn(2, 3)).sum().backward()  # removed: no error


def test_watch_nonfinite_is_silent_on_finite_gradients(vit):
    with lw.watch_nonfinite(vit):
        backward(vit)
        backward(vit)
    assert lw.check_grads(vit).ok


def test_check_grads_names_nonfinite_and_missing_gradients(vit):
    backward(vit)
    vit.blocks[2].mlp[0].weight.grad[0, 0] = math.inf
    vit.head.bias.grad[1] = math.nan
    vit.norm.weight.grad = None
    result = lw.check_grads(vit)
    assert not result.ok
    assert result.nonfinite == ["blocks.2.mlp.0.weight", "head.bias"]
    assert result.no_grad == ["norm.weight"]
    assert "head.bias" in str(result) and "norm.weight" in str(result)
    assert lw.check_grads(vit, foreach=True).nonfinite == result.nonfinite
    assert lw.grad_stats(vit, "**").nonfinite == result.nonfinite


# --------------------------------------------------------------------------- several processes


def counting_collectives(fn):
    """``fn()`` and the names of the torch.distributed collectives it issued."""
    import torch.distributed as dist

    calls: list[str] = []
    names = ("all_gather", "all_gather_into_tensor", "all_reduce", "reduce_scatter_tensor", "broadcast", "gather")
    originals = {name: getattr(dist, name) for name in names}
    for name, real in originals.items():
        setattr(dist, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    try:
        return fn(), calls
    finally:
        for name, real in originals.items():
            setattr(dist, name, real)


def module_norms(model: nn.Module) -> dict[str, float]:
    """Per-module gradient norms with per-layer clipping's primitive, and how many collectives they took."""
    from layerwise.clip import _pooled_norms

    named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    owners = list(dict.fromkeys(n.rpartition(".")[0] for n, _ in named))
    units = [owners.index(n.rpartition(".")[0]) for n, _ in named]
    norms, calls = counting_collectives(lambda: _pooled_norms([p.grad for _, p in named], units, len(owners), 2.0,
                                                              None)[0])
    return dict(zip(owners, norms.tolist())), calls


def fsdp_rank(rank: int, world_size: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    # Linear(6, 1): its bias has one element, so rank 1's shard of it is empty.
    model = nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 1))
    reference = copy.deepcopy(model)
    x = torch.randn(5, 4)  # the same data on every rank: averaged gradients equal the unsharded ones
    reference(x).sum().backward()
    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    model(x).sum().backward()
    sharded, calls = counting_collectives(lambda: lw.grad_stats(model).to_dict())
    by_module, more = counting_collectives(lambda: lw.grad_stats(model, by="module").to_dict())
    norms, clip_calls = module_norms(model)
    assert calls == more == ["all_gather"] and clip_calls == ["all_reduce"], "one collective per call, for all layers"
    assert {m: pytest.approx(row["norm"], rel=1e-6) for m, row in by_module.items()} == norms
    with lw.GradMonitor(model, every=1, optimizer=torch.optim.SGD(model.parameters(), lr=0.1)) as monitor:
        _, step_calls = counting_collectives(monitor.optimizer.step)
    assert step_calls == ["all_gather", "all_gather"], "a log step: gradients and weights in one, then Δw"
    updates = {r["layer"]: (r["weight_norm"], r["update_ratio"]) for r in monitor.history}
    local_numel = [p.to_local().numel() for p in model.parameters()]
    ok = lw.check_grads(model).ok
    model.zero_grad()
    with lw.watch_nonfinite(model), pytest.raises(lw.NonFiniteGradError) as e:
        model(torch.full((1, 4), math.nan)).sum().backward()
    nonfinite = (e.value.names, lw.check_grads(model).nonfinite)
    want = {"param": lw.grad_stats(reference).to_dict(), "module": lw.grad_stats(reference, by="module").to_dict(),
            "updates": {n: (p.detach().norm().item(), 0.1 * p.grad.norm().item() / p.detach().norm().item())
                        for n, p in reference.named_parameters()}}
    return sharded, by_module, updates, local_numel, ok, nonfinite, want


def test_sharded_parameters_get_the_statistics_of_the_full_tensors(run_ranks):
    for rank, (sharded, by_module, updates, local_numel, ok, nonfinite, ref) in enumerate(run_ranks(fsdp_rank)):
        assert ok
        watched, checked = nonfinite  # watch_nonfinite raised on every rank, naming what check_grads finds
        assert sorted(watched) == sorted(checked) and checked
        if rank == 1:
            assert 0 in local_numel
        for name, want in ref["param"].items():
            assert_stats_close(sharded[name], want)
        for name, want in ref["module"].items():
            assert_stats_close(by_module[name], want)
        assert updates == {n: pytest.approx(v, rel=1e-4) for n, v in ref["updates"].items()}


def hsdp_rank(rank: int, world_size: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 1))
    reference = copy.deepcopy(model)
    x = torch.randn(8, 4)
    reference(x).square().mean().backward()
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model(x[2 * rank: 2 * rank + 2]).square().mean().backward()  # HSDP averages the four ranks' gradients
    stats, calls = counting_collectives(lambda: lw.grad_stats(model).to_dict())
    by_module = lw.grad_stats(model, by="module").to_dict()
    norms, clip_calls = module_norms(model)
    want = lw.grad_stats(reference).to_dict(), lw.grad_stats(reference, by="module").to_dict()
    return stats, by_module, norms, calls + clip_calls, want


def test_hsdp_statistics_and_norms_equal_one_process_with_one_collective_per_call(run_ranks):
    results = run_ranks(hsdp_rank, world_size=4)
    for stats, by_module, norms, calls, (want, want_module) in results:
        assert calls == ["all_gather", "all_reduce"], "over the shard dimension only, once per call"
        for name, row in want.items():
            assert_stats_close(stats[name], row)
            assert stats[name]["norm"] == pytest.approx(row["norm"], rel=1e-6)
        for name, row in want_module.items():
            assert_stats_close(by_module[name], row)
            assert norms[name] == pytest.approx(row["norm"], rel=1e-6)
    assert len({repr(r[0]) for r in results}) == 1, "every rank holds the same values, bit for bit (NaN std too)"


def ddp_rank(rank: int, world_size: int):
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    reference = copy.deepcopy(model)
    x = torch.randn(8, 4)
    reference(x).square().mean().backward()
    ddp = DistributedDataParallel(model)
    ddp(x[4 * rank: 4 * rank + 4]).square().mean().backward()
    (stats, norms), calls = counting_collectives(lambda: (lw.grad_stats(ddp).to_dict(), module_norms(ddp)[0]))
    return stats, norms, calls, lw.grad_stats(reference).to_dict()


def test_ddp_statistics_equal_one_process_over_the_global_batch_with_no_collective(run_ranks):
    for stats, norms, calls, want in run_ranks(ddp_rank):
        assert calls == [], "DDP gradients are already reduced"
        assert {n.removeprefix("module."): row for n, row in stats.items()} == {
            n: pytest.approx(row, rel=1e-6, abs=1e-7) for n, row in want.items()}
        for module in ("0", "1", "2"):
            rows = [row for n, row in want.items() if n.startswith(module + ".")]
            if rows:
                assert norms[f"module.{module}"] == pytest.approx(math.sqrt(sum(r["norm"] ** 2 for r in rows)), rel=1e-6)


def test_a_replaced_parameter_is_not_kept_alive_by_the_remembered_selection(vit):
    import gc
    import weakref

    backward(vit)
    lw.grad_stats(vit)
    old = weakref.ref(vit.head.weight)
    vit.head.weight = nn.Parameter(torch.zeros(3, 8))
    gc.collect()
    assert old() is None
    assert lw.grad_stats(vit)["head.weight"] is None  # the new one, without gradient


@pytest.mark.parametrize("measure", [lw.grad_stats, lw.check_grads])
def test_foreach_is_none_or_a_bool_not_a_truthy_word(vit, measure):
    backward(vit)
    with pytest.raises(lw.OptionTypeError, match=rf"{measure.__name__}: foreach='no': pass None, True or False"):
        measure(vit, foreach="no")


@pytest.mark.parametrize("stats", [3, None])
def test_stats_that_are_not_names_are_named(vit, stats):
    backward(vit)
    with pytest.raises(lw.GradError, match=f"unknown statistic {stats}. Valid: norm"):
        lw.grad_stats(vit, stats=stats)  # TypeError: 'int' object is not iterable


def test_printing_to_something_that_is_not_a_stream_is_named(vit):
    vit.head(torch.randn(2, 8)).sum().backward()
    stats = lw.grad_stats(vit)
    for file in (3, "report.txt"):
        with pytest.raises(lw.OptionTypeError, match=rf"file={file!r} must be a text stream"):
            stats.print(file=file)
