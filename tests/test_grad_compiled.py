"""The compiled gradient kernels (compile=True): the eager engine's statistics from one pass.

On CPU, float32, float64 and bfloat16 gradients take the native C kernel (``_native``), every
other device and dtype the torch.compile graph, which on CPU serves float16: the inductor tests use
it. Inductor needs a C++ compiler on CPU; without one (or with LAYERWISE_TEST_INDUCTOR=0) the tests
that compile are skipped, those of the error path still run. The first compile of a dtype takes a
few seconds (less from inductor's on-disk cache): the tests share one float16 graph.
"""

import math
import os
import shutil
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import layerwise as lw
from layerwise import _grad_compiled as compiled
from layerwise import _grad_kernels as kernels
from layerwise._grad_engine import PRIMITIVES

_SKIP = ("LAYERWISE_TEST_INDUCTOR=0" if os.environ.get("LAYERWISE_TEST_INDUCTOR") == "0"
         else "no C++ compiler for inductor" if shutil.which(os.environ.get("CXX", "g++")) is None else None)
needs_inductor = pytest.mark.skipif(_SKIP is not None, reason=str(_SKIP))
BIG = compiled.MIN_NUMEL  # the smallest size the compiled kernel measures

# Sums accumulate in float32 (float64 for float64 gradients) on both paths, in another order: inductor
# adds in cascades of 4096 vectors, the eager path by BLAS dots; each is off by up to a few 1e-6 of
# the sum of |x| (of x²) at 2^18 elements. Counts of non-zeros and max |x| are exact.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5, torch.float64: 1e-13}


def assert_same_primitives(got: torch.Tensor, want: torch.Tensor, xs: list[torch.Tensor]) -> None:
    """Row by row: counts and maxima equal, sums within float32 rounding of the sum of |x| (of x²);
    NaN and inf where the eager kernels have them."""
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    assert torch.equal(got[want.isinf()], want[want.isinf()])
    finite = want.isfinite()
    rtol = RTOL[xs[0].dtype]
    scale = {"sumsq": torch.stack([x.double().square().sum() for x in xs]),
             "sum": torch.stack([x.double().abs().sum() for x in xs])}
    for k, name in enumerate(PRIMITIVES):
        if name in scale:
            close = (got[k] - want[k]).abs() <= rtol * scale[name]
            assert torch.all(close[finite[k]]), name
        else:
            assert torch.equal(got[k][finite[k]], want[k][finite[k]]), name


def test_the_kernel_rows_are_the_engines_primitives_in_order():
    assert compiled.ORDER == PRIMITIVES


@needs_inductor
@settings(max_examples=15)
@given(st.lists(st.integers(BIG, 2 * BIG), min_size=1, max_size=3), st.floats(0, 1), st.booleans(), st.integers(0, 2**16))
def test_compiled_primitives_equal_the_eager_kernels_for_any_size(sizes, zeros, nonfinite, seed):
    dtype = torch.float16
    gen = torch.Generator().manual_seed(seed)
    xs = []
    for n in sizes:
        x = torch.randn(n, generator=gen) * torch.rand(1, generator=gen) * 10
        x[torch.rand(n, generator=gen) < zeros] = 0.0
        if nonfinite:
            x[int(torch.randint(n, (1,), generator=gen))] = math.nan if n % 2 else -math.inf
        xs.append(x.to(dtype))
    xs.append(torch.randn(7, generator=gen).to(dtype))  # a small tensor rides along on the eager path
    got = compiled.block(xs, PRIMITIVES, torch.device("cpu"), None)
    want = kernels.block(xs, PRIMITIVES, torch.device("cpu"), None)
    assert got.dtype == torch.float64 and got.shape == (4, len(xs))
    assert_same_primitives(got, want, xs)


@needs_inductor
def test_one_graph_per_dtype_whatever_the_sizes_and_offsets():
    torch.manual_seed(0)
    compiled.block([torch.randn(BIG + 5).half()] * 2, PRIMITIVES, torch.device("cpu"), None)  # compiled (or cached)
    before = counters["stats"]["unique_graphs"]
    flat = torch.randn(10 * BIG).half()
    views = [flat[3:3 + BIG], flat[BIG + 1:4 * BIG], flat[5 * BIG:].view(-1, 5)]  # offsets, a 2-D view
    xs = [*views, torch.randn(2 * BIG + 3).half(), torch.randn(BIG, 9).half()[:, ::3], torch.randn(5).half()]
    got = compiled.block(xs, ("sumsq", "max_abs", "nonzero"), torch.device("cpu"), None)
    want = kernels.block(xs, ("sumsq", "max_abs", "nonzero"), torch.device("cpu"), None)
    assert torch.equal(got[1:], want[1:])
    assert torch.allclose(got[0], want[0], rtol=RTOL[torch.float16])
    assert counters["stats"]["unique_graphs"] == before


@needs_inductor
def test_a_tensor_above_the_piece_size_is_measured_in_pieces_that_pool_exactly(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr(compiled, "_PIECE", 2 * BIG)  # pieces of 1.8 BIG: above MIN_NUMEL, as real ones
    x = torch.randn(9 * BIG).half()
    x[5] = 0.0
    x[-3] = -50.0  # the maximum sits in the last piece
    xs = [x, torch.ones(BIG + 1).half()]
    got = compiled.block(xs, PRIMITIVES, torch.device("cpu"), None)
    want = kernels.block(xs, PRIMITIVES, torch.device("cpu"), None)
    assert_same_primitives(got, want, xs)
    assert got[3, 0].item() == 50.0 and got[2, 0].item() == (x != 0).sum().item()


def test_norms_alone_and_complex_gradients_stay_on_the_eager_kernels(monkeypatch):
    def no_compile(v):
        raise AssertionError("the compiled kernel was called")

    monkeypatch.setattr(compiled, "_run", no_compile)
    monkeypatch.setattr(compiled._native, "primitives", no_compile)
    halves = [torch.randn(BIG + 3, dtype=torch.float16), torch.randn(2, dtype=torch.float16)]  # the graph's dtype
    assert torch.equal(compiled.block(halves, ("sumsq",), torch.device("cpu"), None),
                       kernels.block(halves, ("sumsq",), torch.device("cpu"), None))
    z = [torch.randn(BIG + 3, dtype=torch.complex64)]
    assert torch.equal(compiled.block(z, ("sumsq", "max_abs"), torch.device("cpu"), None),
                       kernels.block(z, ("sumsq", "max_abs"), torch.device("cpu"), None))


@needs_inductor
def test_grad_stats_and_the_monitor_give_the_eager_results_with_compile():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 16))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    monitors = [lw.GradMonitor(net, every=1, optimizer=opt, compile=c) for c in (False, True)]
    for _ in range(2):
        opt.zero_grad()
        net(torch.randn(8, 512)).square().mean().backward()
        eager, fused = lw.grad_stats(net, compile=False), lw.grad_stats(net, compile=True)
        assert eager.dead == fused.dead and eager.no_grad == fused.no_grad
        for (name, want), (_, got) in zip(eager, fused):
            assert got == pytest.approx(want, rel=1e-5, abs=1e-12), name
            assert got["max_abs"] == want["max_abs"] and got["zero_frac"] == want["zero_frac"]
        opt.step()
    eager_rows, fused_rows = (m.history for m in monitors)
    assert len(fused_rows) == len(eager_rows) == 8
    for want, got in zip(eager_rows, fused_rows):
        assert got.keys() == want.keys() and got["layer"] == want["layer"]
        numbers = [k for k in want if k != "layer"]
        assert [got[k] for k in numbers] == pytest.approx([want[k] for k in numbers], rel=1e-5, abs=1e-12)


@pytest.mark.parametrize("bad", ["max-autotune", 1, "none"])
def test_compile_takes_a_bool_or_none(bad):
    net = torch.nn.Linear(2, 1)
    net(torch.ones(1, 2)).sum().backward()
    with pytest.raises(lw.OptionTypeError, match=r"grad_stats: compile=.*pass None, True or False"):
        lw.grad_stats(net, compile=bad)
    with pytest.raises(lw.OptionTypeError, match=r"GradMonitor: compile=.*pass None, True or False"):
        lw.GradMonitor(net, compile=bad)
    with pytest.raises(lw.OptionTypeError, match=r"grad_stats: foreach='no': pass None, True or False"):
        lw.grad_stats(net, foreach="no")


def test_without_a_cxx_compiler_inductor_names_the_fix_and_eager_still_works(monkeypatch):
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import fresh_cache

    # A fresh kernel (dynamo keeps what it compiled on the function's code object), empty inductor
    # caches, no compiler.
    fresh = compiled.primitives.__code__.replace(co_name="fresh_primitives")
    monkeypatch.setattr(compiled, "primitives", types.FunctionType(fresh, vars(compiled)))
    monkeypatch.setattr(compiled, "_compiled", None)
    monkeypatch.setattr(compiled, "_ready", set())
    monkeypatch.setattr(compiled, "_failed", {})
    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, "/nonexistent/g++"))
    net = torch.nn.Linear(512, 512).half()  # float16: inductor's (float32 takes the native kernel)
    net(torch.ones(1, 512).half()).sum().backward()
    before = net.weight.grad.clone()
    with fresh_cache():
        for _ in range(2):  # the second call is refused at once, from the first's verdict
            with pytest.raises(lw.MissingExtraError, match=r"C\+\+ compiler.*compile=False"):
                lw.grad_stats(net, compile=True)
    assert torch.equal(net.weight.grad, before)
    assert lw.grad_stats(net, stats="max_abs")["weight"]["max_abs"] == before.abs().max().item()
