import copy
import csv
import io
import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import layerwise as lw
import layerwise.grads as grads_module

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


# --------------------------------------------------------------------------- the monitor


def make_data(n: int = 6) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return [torch.randn(3, 5, 12, generator=gen) for _ in range(n)]


def test_monitor_counts_optimizer_steps_and_logs_only_on_log_steps(vit, monkeypatch):
    calls = []
    real = grads_module._primitives
    monkeypatch.setattr(grads_module, "_primitives", lambda *a, **k: calls.append(1) or real(*a, **k))
    opt = torch.optim.SGD(vit.parameters(), lr=0.01)
    expected: list[float] = []

    def before_step(*_) -> None:
        expected.append(vit.head.weight.grad.norm().item())

    opt.register_step_pre_hook(before_step)
    monitor = lw.GradMonitor(vit, every=2, optimizer=opt, stats=["norm"])
    data = make_data(10)
    for step in range(5):
        for micro in data[2 * step: 2 * step + 2]:  # gradient accumulation: two backward calls per step
            vit(micro).square().mean().backward()
        opt.step()
        opt.zero_grad()
        if step % 2:
            assert not calls  # nothing computed between log steps
        calls.clear()
    assert monitor.steps == 5
    rows = monitor.history
    assert sorted({r["step"] for r in rows}) == [0, 2, 4]
    assert len(rows) == 3 * len(list(vit.parameters()))
    head = {r["step"]: r["grad_norm"] for r in rows if r["layer"] == "head.weight"}
    assert head == {s: pytest.approx(expected[s], rel=1e-5) for s in (0, 2, 4)}


def test_update_ratio_and_weight_norm_equal_a_hand_computation_with_sgd(vit):
    lr = 0.05
    opt = torch.optim.SGD(vit.parameters(), lr=lr)
    backward(vit)
    want = {n: (p.detach().norm().item(), lr * p.grad.norm().item()) for n, p in vit.named_parameters()}
    with lw.GradMonitor(vit, optimizer=opt) as monitor:
        opt.step()
    rows = monitor.history
    for row in rows:
        weight_norm, update_norm = want[row["layer"]]
        assert row["weight_norm"] == pytest.approx(weight_norm, rel=1e-5)
        if weight_norm > 0:
            assert row["update_ratio"] == pytest.approx(update_norm / weight_norm, rel=1e-4)
        else:
            assert row["update_ratio"] is None  # cls_token starts at zero: ratio undefined
    assert {"grad_norm", "grad_mean", "grad_std", "grad_max_abs", "grad_zero_frac", "dead"} <= rows[0].keys()


def test_monitor_rows_mark_missing_gradients_and_dead_layers(vit):
    monitor = lw.GradMonitor(vit, every=1)
    vit.head(torch.randn(2, 8)).sum().backward()
    vit.head.bias.grad.zero_()
    monitor.step()
    rows = {r["layer"]: r for r in monitor.history}
    assert rows["head.bias"]["dead"] is True and rows["head.weight"]["dead"] is False
    assert rows["cls_token"]["grad_norm"] is None and rows["cls_token"]["dead"] is None
    assert rows["cls_token"]["weight_norm"] == 0.0


def test_monitor_raises_on_nan_naming_layer_and_step_before_the_update(vit):
    opt = torch.optim.SGD(vit.parameters(), lr=0.1)
    monitor = lw.GradMonitor(vit, every=1, optimizer=opt)
    backward(vit)
    opt.step()
    backward(vit)
    vit.blocks[1].attn.bias.grad[0] = math.nan
    before = vit.blocks[1].attn.bias.detach().clone()
    with pytest.raises(lw.NonFiniteGradError, match=r"step 1 in blocks\.1\.attn\.bias") as e:
        opt.step()
    assert e.value.step == 1 and e.value.names == ["blocks.1.attn.bias"]
    assert torch.equal(vit.blocks[1].attn.bias, before)  # the optimizer did not step
    assert any(r["step"] == 1 and r["layer"] == "blocks.1.attn.bias" and math.isnan(r["grad_norm"])
               for r in monitor.history)
    monitor.remove()


def test_monitor_warn_and_ignore_policies(vit):
    backward(vit)
    vit.head.bias.grad[0] = math.inf
    with pytest.warns(RuntimeWarning, match="step 0 in head.bias"):
        lw.GradMonitor(vit, on_nonfinite="warn").step()
    ignoring = lw.GradMonitor(vit, on_nonfinite="ignore")
    ignoring.step()
    assert math.isinf(next(r for r in ignoring.history if r["layer"] == "head.bias")["grad_norm"])


def test_monitor_arguments_are_checked_at_construction(vit):
    with pytest.raises(lw.GradError, match="every=0"):
        lw.GradMonitor(vit, every=0)
    with pytest.raises(lw.GradError, match="on_nonfinite='stop'"):
        lw.GradMonitor(vit, on_nonfinite="stop")
    with pytest.raises(lw.GradError, match="unknown statistic 'l2'"):
        lw.GradMonitor(vit, stats=["l2"])
    with pytest.raises(lw.GradError, match="nothing to monitor"):
        lw.GradMonitor(vit.requires_grad_(False))
    opt = torch.optim.SGD(vit.parameters(), lr=0.1)
    with pytest.raises(lw.GradError, match="scaler="):
        lw.GradMonitor(vit, optimizer=opt, scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(lw.GradError, match="do not also call monitor.step"):
        lw.GradMonitor(vit, "**", optimizer=opt).step()


def test_remove_unhooks_and_is_idempotent(vit):
    opt = torch.optim.SGD(vit.parameters(), lr=0.1)
    monitor = lw.GradMonitor(vit, every=1, optimizer=opt)
    backward(vit)
    opt.step()
    monitor.remove()
    monitor.remove()
    opt.step()
    assert monitor.steps == 1 and {r["step"] for r in monitor.history} == {0}


# --------------------------------------------------------------------------- mixed precision


def scaled_training(optimizer_kwargs: dict, hooked: bool) -> tuple[list[dict], dict[str, float]]:
    """One log step under a GradScaler; returns the monitor's rows and the true (unscaled) gradient norms."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(5, 4)
    net(x).square().mean().backward()
    truth = {n: p.grad.norm().item() for n, p in net.named_parameters()}
    net.zero_grad()
    opt = torch.optim.AdamW(net.parameters(), **optimizer_kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    monitor = lw.GradMonitor(net, optimizer=opt) if hooked else lw.GradMonitor(net, scaler=scaler)
    scaler.scale(net(x).square().mean()).backward()
    if not hooked:
        monitor.step()
    scaler.step(opt)
    scaler.update()
    return monitor.history, truth


@pytest.mark.parametrize("hooked, fused", [(True, False), (True, True), (False, False)])
def test_grad_scaler_statistics_are_of_the_unscaled_gradients(hooked, fused):
    rows, truth = scaled_training({"fused": fused} if fused else {}, hooked)
    assert {r["layer"]: r["grad_norm"] for r in rows} == {n: pytest.approx(v, rel=1e-5) for n, v in truth.items()}


# --------------------------------------------------------------------------- sinks and the plot


def train_with(vit, sinks, steps: int = 3) -> lw.GradMonitor:
    opt = torch.optim.SGD(vit.parameters(), lr=0.01)
    with lw.GradMonitor(vit, every=2, optimizer=opt, sinks=sinks) as monitor:
        for x in make_data(steps):
            vit(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    return monitor


def test_csv_and_jsonl_sinks_write_the_history(vit, tmp_path):
    monitor = train_with(vit, [lw.CSVSink(tmp_path / "g.csv"), lw.JSONLSink(tmp_path / "g.jsonl")])
    history = monitor.history
    assert len(history) == 2 * len(list(vit.parameters()))  # steps 0 and 2
    with open(tmp_path / "g.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == list(history[0])
    assert [(int(r["step"]), r["layer"], float(r["grad_norm"])) for r in table] == [
        (r["step"], r["layer"], r["grad_norm"]) for r in history]
    lines = [json.loads(line) for line in (tmp_path / "g.jsonl").read_text().splitlines()]
    assert lines == history


def test_tensorboard_sink_writes_scalars_and_histograms(vit, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_with(vit, [lw.TensorBoardSink(tmp_path / "tb", histograms=True)])
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"grad_norm/head.weight", "weight_norm/head.weight", "update_ratio/head.weight"} <= set(scalars)
    assert [e.step for e in events.Scalars("grad_norm/head.weight")] == [0, 2]
    histogram = events.Histograms("grad/head.weight")[0].histogram_value
    assert histogram.num == vit.head.weight.numel() and sum(histogram.bucket) == histogram.num
    assert histogram.min <= histogram.max


def test_tensorboard_histograms_are_those_of_the_gradient(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    net = nn.Linear(2, 1)
    net(torch.tensor([[3.0, 4.0]])).sum().backward()  # weight gradient: [3, 4]
    with lw.GradMonitor(net, sinks=[lw.TensorBoardSink(tmp_path, histograms=True)]) as monitor:
        monitor.step()
    events = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0})
    events.Reload()
    h = events.Histograms("grad/weight")[0].histogram_value
    assert (h.min, h.max, h.num, h.sum, h.sum_squares) == (3.0, 4.0, 2, 7.0, 25.0)
    assert h.bucket[0] == 1 and h.bucket[-1] == 1 and sum(h.bucket) == 2
    assert h.bucket_limit[-1] == pytest.approx(4.0)


def test_sink_paths_are_checked_at_construction(tmp_path):
    missing = tmp_path / "no-such-folder" / "grads.csv"
    for sink in (lw.CSVSink, lw.JSONLSink):
        with pytest.raises(lw.GradError, match="no-such-folder.*does not exist"):
            sink(missing)
    with pytest.raises(lw.GradError, match="is a folder"):
        lw.CSVSink(tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(lw.GradError, match="not a writable folder"):
        lw.TensorBoardSink(tmp_path / "file" / "run")


def test_plot_writes_a_png(vit, tmp_path):
    monitor = train_with(vit, [])
    path = monitor.plot(tmp_path / "grads.png", "blocks.0")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(lw.GradError, match="does not exist"):
        monitor.plot(tmp_path / "missing" / "grads.png")


# --------------------------------------------------------------------------- several processes


def ddp_rank(rank: int, world_size: int, folder: str):
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = lw.GradMonitor(model, every=1, optimizer=opt, sinks=[lw.CSVSink(f"{folder}/rank{rank}.csv")])
    torch.manual_seed(rank)  # different data per rank; DDP averages the gradients
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    monitor.remove()
    return [(r["layer"], r["grad_norm"]) for r in monitor.history]


def test_ddp_every_rank_computes_and_rank_0_writes(run_ranks, tmp_path):
    histories = run_ranks(ddp_rank, str(tmp_path))
    assert histories[0] == histories[1] and histories[0][0][0] == "module.0.weight"
    assert (tmp_path / "rank0.csv").exists() and not (tmp_path / "rank1.csv").exists()


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
    sharded = lw.grad_stats(model).to_dict()
    by_module = lw.grad_stats(model, by="module").to_dict()
    with lw.GradMonitor(model, every=1, optimizer=torch.optim.SGD(model.parameters(), lr=0.1)) as monitor:
        monitor.optimizer.step()
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
