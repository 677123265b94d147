"""Every hook-based API on a torch.compile'd model: eager's gradients, no graph break, few recompiles.

The matrix is (backend) x (what is compiled: the module, or the step computing the loss). The
hooks sit on the parameters, outside the compiled graph (autograd runs them when it
accumulates a gradient), so compiling changes nothing they see; GradReverse is traced into
the graph, its alpha read from a buffer.
"""

import copy
import os
import shutil
import time

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import layerwise as lw


def _inductor_reason() -> str | None:
    """Why inductor is left out here, or None: it needs a C++ compiler, and one that builds a
    trivial kernel in under 20 s (on a loaded 2-core machine it may not; the inductor tests then
    add about 15 s to the suite on a quiet one). LAYERWISE_TEST_INDUCTOR=0 leaves them out."""
    if os.environ.get("LAYERWISE_TEST_INDUCTOR") == "0":
        return "LAYERWISE_TEST_INDUCTOR=0"
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "no C++ compiler for inductor"
    start = time.perf_counter()
    torch.compile(lambda x: (x * 2).sin(), backend="inductor")(torch.ones(3))
    took = time.perf_counter() - start
    return f"inductor took {took:.0f} s to compile a trivial function (limit 20 s)" if took > 20 else None


_NO_INDUCTOR = _inductor_reason()
BACKENDS = ["aot_eager", pytest.param("inductor", marks=pytest.mark.skipif(_NO_INDUCTOR is not None,
                                                                           reason=str(_NO_INDUCTOR)))]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.reverse = lw.GradReverse(alpha=0.5)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.reverse(self.encoder(x)))


def _data(steps: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(5, 4, generator=gen) for _ in range(steps)]


def _apply(api: str, model: nn.Module):
    """Set ``api`` on ``model``; returns what to call after each backward (step number) and a result."""
    log: list = []
    if api == "scale_grad":
        handle = lw.scale_grad(model, "encoder", factor=0.5)
        return lambda step: setattr(handle, "factor", 0.5 / (step + 2)), log  # a schedule
    if api == "grad_hook":
        lw.grad_hook(model, "head.weight", fn=lambda name, grad: log.append(name) or grad.clamp(-0.05, 0.05))
        return lambda step: None, log
    if api == "set_grad":
        return lambda step: lw.set_grad(model, "head.bias", torch.full((2,), float(step)), mode="add"), log
    if api == "watch_nonfinite":
        lw.watch_nonfinite(model)
        return lambda step: None, log
    if api == "GradMonitor":
        monitor = lw.GradMonitor(model, every=1, stats=["norm", "max_abs"])
        return lambda step: monitor.step(), monitor.history
    if api == "GradReverse":
        return lambda step: setattr(model.get_submodule("reverse"), "alpha", 0.25 * step - 0.5), log
    raise AssertionError(api)


def _train(model: nn.Module, api: str, compiled: str | None, backend: str | None) -> tuple[list, list]:
    """Three backward passes with ``api`` set; the compiled part and backend as asked (None: eager)."""
    if compiled == "module":
        model = torch.compile(model, backend=backend)
    after, log = _apply(api, model)  # on the compiled module itself, addressed by inner names
    loss = lambda x: model(x).square().mean()
    if compiled == "step":
        loss = torch.compile(loss, backend=backend)
    grads = []
    for step, x in enumerate(_data()):
        model.zero_grad()
        loss(x).backward()
        after(step)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    return grads, log


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compiled", ["module", "step"])
@pytest.mark.parametrize("api", ["scale_grad", "grad_hook", "set_grad", "watch_nonfinite", "GradMonitor", "GradReverse"])
def test_hooks_on_a_compiled_model_give_eager_gradients_without_graph_breaks(api, compiled, backend):
    torch.manual_seed(0)
    model = Net()
    expected, expected_log = _train(copy.deepcopy(model), api, None, None)
    torch._dynamo.reset()
    counters.clear()
    grads, log = _train(model, api, compiled, backend)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1  # alpha and factor schedules recompile nothing
    for step, (got, want) in enumerate(zip(grads, expected)):
        for name, grad in want.items():
            inner = name.removeprefix("_orig_mod.")
            torch.testing.assert_close(got[name if name in got else f"_orig_mod.{inner}"], grad, rtol=1e-6,
                                       atol=1e-6, msg=f"step {step} {name}")
    assert len(log) == len(expected_log)
    for row, want in zip(log, expected_log):  # the hooked names; the monitor's rows: same layers, same values
        if isinstance(want, dict):
            assert row.keys() == want.keys()
            assert all(row[key] == pytest.approx(value, rel=1e-6, abs=1e-6) for key, value in want.items()), want
        else:
            assert row == want


@pytest.mark.parametrize("backend", BACKENDS)
def test_watch_nonfinite_names_the_layer_on_a_compiled_model(backend):
    torch.manual_seed(0)
    model = torch.compile(Net(), backend=backend)
    with lw.watch_nonfinite(model), pytest.raises(lw.NonFiniteGradError, match="head.weight"):
        model(torch.full((2, 4), float("inf"))).sum().backward()


def test_unfreezing_a_compiled_model_costs_at_most_one_recompile_per_phase():
    torch.manual_seed(0)
    model = Net()
    lw.freeze(model, "encoder", "head.weight")
    compiled = torch.compile(model, backend="aot_eager")
    opt = torch.optim.SGD(lw.param_groups(compiled), lr=0.01)
    schedule = lw.GradualUnfreeze(compiled, opt, {10: "head.weight", 20: "encoder.0.bias", 35: "encoder"})
    torch._dynamo.reset()
    counters.clear()
    x = torch.randn(5, 4)
    for step in range(50):
        schedule.step(step)
        opt.zero_grad()
        compiled(x).square().mean().backward()
        opt.step()
    assert lw.frozen(compiled) == []
    assert counters["stats"]["unique_graphs"] <= 4  # the first compile, then one per unfreezing phase
    assert sum(counters["graph_break"].values()) == 0
