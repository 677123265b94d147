import csv
import json
import math

import pytest
import torch
from torch import nn

import layerwise as lw
import layerwise.monitor as monitor_module


def backward(vit) -> None:
    torch.manual_seed(1)
    vit(torch.randn(3, 5, 12)).square().mean().backward()


# --------------------------------------------------------------------------- the monitor


def make_data(n: int = 6) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return [torch.randn(3, 5, 12, generator=gen) for _ in range(n)]


def test_monitor_counts_optimizer_steps_and_logs_only_on_log_steps(vit, monkeypatch):
    calls = []
    real = monitor_module.local_primitives
    monkeypatch.setattr(monitor_module, "local_primitives", lambda *a, **k: calls.append(1) or real(*a, **k))
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
        assert bool(calls) == (step % 2 == 0), "computes on log steps, and nothing between them"
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


def test_monitor_of_norms_reads_one_statistic_per_step_and_still_names_nonfinite_layers():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(200, 100), torch.nn.Linear(100, 2))  # 20k: float32 sums on CPU
    opt = torch.optim.SGD(net.parameters(), lr=0.0)  # the weights stay as they are: each step like the first
    monitor = lw.GradMonitor(net, every=1, optimizer=opt, stats="norm")
    assert monitor._needed == ("sumsq",)  # the flag is read from Σx²: one pass over the gradients
    net(torch.randn(4, 200)).sum().backward()
    net[0].weight.grad[0, 0] = 1e30  # finite, but Σx² overflows float32: max |x| decides, no error
    opt.step()
    net[1].bias.grad[1] = -math.inf
    before = net[1].bias.detach().clone()
    with pytest.raises(lw.NonFiniteGradError, match=r"step 1 in 1\.bias\. Run") as e:
        opt.step()
    assert e.value.names == ["1.bias"] and torch.equal(net[1].bias, before)
    rows = {(r["step"], r["layer"]): r for r in monitor.history}
    assert rows[0, "0.weight"]["grad_norm"] >= 1e30 and math.isinf(rows[1, "1.bias"]["grad_norm"])
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
    with pytest.raises(lw.OptionError, match="every=0"):
        lw.GradMonitor(vit, every=0)
    with pytest.raises(lw.OptionTypeError, match="every=1.5") as e:
        lw.GradMonitor(vit, every=1.5)
    assert isinstance(e.value, TypeError)
    with pytest.raises(lw.OptionError, match="flush_every=0"):
        lw.GradMonitor(vit, flush_every=0)
    with pytest.raises(lw.OptionTypeError, match="foreach='no'"):  # truthy: it would run the fused kernels
        lw.GradMonitor(vit, foreach="no")
    with pytest.raises(lw.OptionError, match="on_nonfinite='stop'"):
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


@pytest.mark.parametrize("path, error, message", [
    ("grads\0.csv", lw.GradError, "embedded null byte"), ("g" * 300 + ".csv", lw.GradError, "File name too long"),
    (5, lw.OptionTypeError, "a sink writes to a path"),
])
def test_sink_paths_that_cannot_be_files_are_refused_at_construction(tmp_path, path, error, message):
    for sink in (lw.CSVSink, lw.JSONLSink, lw.TensorBoardSink):  # not at the first log step, mid-training
        with pytest.raises(error, match=message):
            sink(tmp_path / path if isinstance(path, str) else path)


@pytest.mark.parametrize("options, message", [
    ({"sinks": [print]}, "sinks: builtin_function_or_method is not a sink"),
    ({"sinks": "grads.csv"}, "sinks takes a list of sinks, not str"),
    ({"scaler": 1024.0}, "scaler=1024.0: pass the torch.amp.GradScaler"),
    ({"optimizer": "adam"}, "optimizer='adam': pass the torch.optim.Optimizer"),
])
def test_monitor_options_that_would_fail_at_the_first_log_step_are_refused_at_once(vit, options, message):
    with pytest.raises(lw.OptionTypeError, match=message):
        lw.GradMonitor(vit, **options)


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


def test_a_closure_step_is_measured_after_its_backward(vit):
    """optimizer.step(closure) runs backward inside step(): Lightning does it, LBFGS too."""
    opt = torch.optim.SGD(vit.parameters(), lr=0.01)
    monitor = lw.GradMonitor(vit, every=1, optimizer=opt, stats=["norm"])
    seen = []
    for x in make_data(3):
        def closure(x=x):
            opt.zero_grad()
            loss = vit(x).square().mean()
            loss.backward()
            seen.append(vit.head.weight.grad.norm().item())
            return loss

        opt.step(closure)
    logged = [r["grad_norm"] for r in monitor.history if r["layer"] == "head.weight"]
    assert logged == pytest.approx(seen, rel=1e-5), "the gradients of this step, not the previous one"
    for row in (r for r in monitor.history if r["layer"] == "head.weight"):  # SGD: ‖Δw‖ = lr ‖g‖
        assert row["update_ratio"] == pytest.approx(0.01 * row["grad_norm"] / row["weight_norm"], rel=1e-4)


def test_a_step_that_raised_still_counts(vit):
    monitor = lw.GradMonitor(vit, every=1, stats=["norm"])
    vit(torch.full((1, 5, 12), math.nan)).sum().backward()
    with pytest.raises(lw.NonFiniteGradError):
        monitor.step()
    vit.zero_grad()
    backward(vit)
    monitor.step()
    assert sorted({r["step"] for r in monitor.history}) == [0, 1]


# --------------------------------------------------------------------------- batched transfers, layouts


# The NaN reaches the weights at step 1, so every later step warns too; only step 1's warning is the point.
@pytest.mark.filterwarnings(r"ignore:non-finite gradient at step ([2-9]|1[0-9]) in:RuntimeWarning")
def test_every_step_logging_moves_rows_to_the_host_in_batches(vit, tmp_path, monkeypatch):
    transfers = []
    real = monitor_module.to_host
    monkeypatch.setattr(monitor_module, "to_host", lambda ts: transfers.append(1) or real(ts))
    opt = torch.optim.SGD(vit.parameters(), lr=0.01)
    monitor = lw.GradMonitor(vit, every=1, optimizer=opt, on_nonfinite="warn", flush_every=5,
                             sinks=[lw.CSVSink(tmp_path / "g.csv")])
    data = make_data(12)
    vit(data[0]).square().mean().backward()
    opt.step()
    assert transfers == [] and not (tmp_path / "g.csv").exists(), "nothing waits for the device on a log step"
    vit.head.bias.grad.fill_(math.nan)  # found when the batch reaches the host, with its step
    with pytest.warns(RuntimeWarning, match="step 1 in head.bias"):
        for x in data[1:]:
            vit(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    assert len(transfers) == 2, "steps 0-4 and 5-9, one transfer each"
    with open(tmp_path / "g.csv", newline="") as f:
        assert sorted({int(row["step"]) for row in csv.DictReader(f)}) == list(range(10))
    monitor.remove()
    with open(tmp_path / "g.csv", newline="") as f:
        assert sorted({int(row["step"]) for row in csv.DictReader(f)}) == list(range(12))
    assert len(transfers) == 3


def test_a_sparse_embedding_is_monitored_by_its_stored_values(tmp_path):
    from test_grads import sparse_backward

    model = sparse_backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    want = lw.grad_stats(model).to_dict()
    dense = model.embed.weight.grad.to_dense()
    with lw.GradMonitor(model, optimizer=opt, sinks=[lw.TensorBoardSink(tmp_path, histograms=True)]) as monitor:
        opt.step()
    rows = {r["layer"]: r for r in monitor.history}
    assert {s: rows["embed.weight"][f"grad_{s}"] for s in lw.grads.STATS} == pytest.approx(want["embed.weight"])
    assert rows["embed.weight"]["update_ratio"] == pytest.approx(0.1 * dense.norm().item() / rows["embed.weight"]
                                                                 ["weight_norm"], rel=1e-5)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path)).Reload()
    h = events.Histograms("grad/embed.weight")[0].histogram_value
    assert (h.num, h.min, h.max) == (30, dense.min().item(), dense.max().item())
    assert sum(h.bucket) == 30, "the 21 implicit zeros are counted"


def test_complex_parameters_are_monitored_by_magnitude_or_refused_by_name():
    holder = nn.Module()
    holder.z = nn.Parameter(torch.ones(2, dtype=torch.complex64))
    holder.z.grad = torch.tensor([3 + 4j, 0j])
    with pytest.raises(lw.GradError, match="'z' has a complex gradient"):
        lw.GradMonitor(holder)
    with lw.GradMonitor(holder, stats=["norm", "max_abs", "zero_frac"]) as monitor:
        monitor.step()
    (row,) = monitor.history
    assert (row["grad_norm"], row["grad_max_abs"], row["grad_zero_frac"], row["weight_norm"]) == pytest.approx(
        (5.0, 5.0, 0.5, math.sqrt(2)))


class ThreeParts(nn.Module):
    """A large layer (past the engine's small-tensor batching), a frozen one and one forward never uses."""

    def __init__(self):
        super().__init__()
        self.big = nn.Linear(200, 150)
        self.frozen = nn.Linear(150, 4).requires_grad_(False)
        self.unused = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frozen(torch.relu(self.big(x)))


@pytest.mark.parametrize("compiled", [False, True])
def test_every_step_rows_equal_their_definition_under_accumulation_frozen_and_missing_gradients(compiled):
    torch.manual_seed(0)
    model = ThreeParts()
    run = torch.compile(model, backend="eager") if compiled else model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    want: list[dict] = []

    def by_hand(*_) -> None:  # runs before the monitor's own hook: the definition, in float64
        rows = {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            g = None if p.grad is None else p.grad.double().flatten()
            rows[name] = {"weight": p.detach().double().clone(), "grad": None if g is None else {
                "grad_norm": g.norm().item(), "grad_mean": g.mean().item(), "grad_std": g.std().item(),
                "grad_max_abs": g.abs().max().item(), "grad_zero_frac": (g == 0).double().mean().item()}}
        want.append(rows)

    opt.register_step_pre_hook(by_hand)
    monitor = lw.GradMonitor(run, every=1, optimizer=opt)
    data = torch.randn(6, 8, 200)
    for step in range(3):
        opt.zero_grad()
        for micro in data[2 * step: 2 * step + 2]:  # accumulation: two backwards per step
            run(micro).square().mean().backward()
        model.big.weight.grad[0] = 0  # exact zeros in a large gradient
        opt.step()
        for row in want[step].values():
            row["after"] = None
        for name, p in model.named_parameters():
            if name in want[step]:
                want[step][name]["after"] = p.detach().double()
    rows = monitor.history
    assert [(r["step"], r["layer"]) for r in rows] == [(s, n) for s in range(3) for n in want[0]]
    for row in rows:
        expected = want[row["step"]][row["layer"]]
        weight_norm = expected["weight"].norm().item()
        assert row["weight_norm"] == pytest.approx(weight_norm, rel=1e-6)
        update = (expected["after"] - expected["weight"]).norm().item()
        assert row["update_ratio"] == pytest.approx(update / weight_norm, rel=1e-4, abs=1e-12)
        if expected["grad"] is None:
            assert row["layer"].startswith("unused.") and row["grad_norm"] is None and row["dead"] is None
            continue
        scale = expected["grad"]["grad_max_abs"]
        for stat, value in expected["grad"].items():
            assert row[stat] == pytest.approx(value, rel=1e-5, abs=1e-6 * scale), (row["layer"], stat)
        assert row["dead"] is False
    assert {r["layer"] for r in rows} == {"big.weight", "big.bias", "unused.weight", "unused.bias"}
    big = [r for r in rows if r["layer"] == "big.weight"]
    assert all(r["grad_zero_frac"] >= 1 / 150 for r in big)
