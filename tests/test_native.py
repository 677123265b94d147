"""The native CPU kernel behind compile=True: the eager engine's primitives from one pass, one call.

Without a C compiler (or with LAYERWISE_TEST_NATIVE=0) the tests that build it are skipped; those
of the error path still run.
"""

import math
import os
import platform
import shlex
import shutil
import subprocess
import sysconfig
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import layerwise as lw
from layerwise import _grad_compiled as compiled
from layerwise import _grad_kernels as kernels
from layerwise import _native as native
from layerwise._grad_engine import PRIMITIVES

_COMPILERS = [shlex.split(os.environ["CC"])[0]] if os.environ.get("CC", "").strip() else ["cc", "gcc", "clang"]
_SKIP = ("LAYERWISE_TEST_NATIVE=0" if os.environ.get("LAYERWISE_TEST_NATIVE") == "0"
         else "no C compiler" if not any(map(shutil.which, _COMPILERS)) else None)
needs_compiler = pytest.mark.skipif(_SKIP is not None, reason=str(_SKIP))
# Sizes around the kernel's lane count (32) and block (4096): the vector loop, its tail, the scalar rest.
EDGES = [0, 1, 31, 32, 33, 4095, 4096, 4097, 3 * 4096 + 40]
BIG = 3 * 4096 + 40


def eager(xs: list[torch.Tensor]) -> torch.Tensor:
    return kernels.block([x if x.numel() else x.new_zeros(1) for x in xs], PRIMITIVES, torch.device("cpu"), False)


def assert_matches_eager(got: torch.Tensor, xs: list[torch.Tensor]) -> None:
    """Counts and max |x| equal the eager kernels'; sums within float32 (float64) rounding of the exact
    ones, NaN and inf where the elements have them; beyond float32's range, inf or still exact (the
    kernel adds its lanes in float64, where the eager dot overflows)."""
    want = eager(xs)
    assert got.dtype == torch.float64 and got.shape == (4, len(xs))
    assert torch.equal(got[2:].nan_to_num(), want[2:].nan_to_num()) and torch.equal(got[3].isnan(), want[3].isnan())
    rtol = 1e-13 if xs[0].dtype == torch.float64 else 1e-5
    for x, column in zip(xs, got.T):
        d = x.double()
        if not d.isfinite().all():  # NaN and inf as the exact sums have them
            exact = torch.stack([d.square().sum(), d.sum()])
            assert torch.equal(column[:2].isnan(), exact.isnan())
            assert torch.equal(column[:2].nan_to_num(), exact.nan_to_num())
            continue
        # A square below float32's normal range is rounded to its subnormal spacing, 2^-149.
        slack = x.numel() * 2.0 ** (-1074 if x.dtype == torch.float64 else -149)
        for value, exact, scale in ((column[0], d.square().sum(), d.square().sum()), (column[1], d.sum(), d.abs().sum())):
            if scale > torch.finfo(x.dtype).max and not value.isfinite():  # float32 overflowed, as eager's does
                continue
            assert abs(value.item() - exact.item()) <= rtol * scale.item() + slack


@needs_compiler
@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(EDGES), st.integers(0, 20000)), min_size=1, max_size=5),
       st.sampled_from(native.DTYPES), st.floats(0, 1), st.sampled_from(["", "nan", "inf", "-0"]), st.integers(0, 2**16))
def test_primitives_equal_the_eager_kernels(sizes, dtype, zeros, special, seed):
    gen = torch.Generator().manual_seed(seed)
    xs = []
    for n in sizes:
        x = torch.randn(n, generator=gen, dtype=torch.float64) * 10 ** float(torch.randint(-20, 20, (1,), generator=gen))
        x[torch.rand(n, generator=gen) < zeros] = 0.0
        if n and special:
            where = int(torch.randint(n, (1,), generator=gen))
            x[where] = {"nan": math.nan, "inf": -math.inf, "-0": -0.0}[special]
        xs.append(x.to(dtype))
    measured = native.primitives(xs)
    assert_matches_eager(measured, xs)
    # A norm request reads only the sum of squares, added in the same order: the same bits.
    torch.testing.assert_close(native.sumsq(xs), measured[:1], rtol=0, atol=0, equal_nan=True)


@needs_compiler
def test_negative_zero_is_a_zero_and_nan_wins_the_maximum():
    x = torch.tensor([-0.0, 0.0, -3.0, 2.0] * 20)
    got = native.primitives([x, torch.tensor([1.0, math.nan, 5.0] * 20), -torch.ones(70)])
    assert got[2].tolist() == [40.0, 60.0, 70.0]
    assert got[3, 0].item() == 3.0 and math.isnan(got[3, 1].item()) and got[3, 2].item() == 1.0


@needs_compiler
def test_views_and_non_contiguous_tensors_are_read_as_their_elements():
    torch.manual_seed(0)
    base = torch.randn(300, 70)
    xs = [base[5:], base[:, ::3], base.t(), base[7, 3:50]]
    got = native.primitives(xs)
    assert_matches_eager(got, [x.contiguous() for x in xs])
    assert torch.equal(base, base.clone())  # read, never written


@needs_compiler
def test_the_library_is_built_once_into_the_cache_and_reused(unpackaged, monkeypatch):
    x = [torch.randn(1000)]
    first = native.primitives(x)
    built = list(unpackaged.iterdir())
    assert len(built) == 1 and built[0].name.startswith("kernels-") and built[0].suffix == ".so"

    def no_compiler(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(native, "_kernels", None)  # a fresh process: finds the file, compiles nothing
    monkeypatch.setattr(subprocess, "run", no_compiler)
    assert torch.equal(native.primitives(x), first)
    assert list(unpackaged.iterdir()) == built


@needs_compiler
def test_cc_may_carry_arguments_and_each_architecture_gets_its_own_file(unpackaged, monkeypatch):
    compiler = next(filter(shutil.which, _COMPILERS))
    monkeypatch.setenv("CC", f"{compiler} -O2")  # as make and setuptools take it
    assert native.primitives([torch.ones(40)])[0].item() == 40.0
    here = native._build()
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")  # the same cache seen from another machine
    there = native._build()
    assert there != here and sorted(unpackaged.iterdir()) == sorted([here, there])


@needs_compiler
def test_a_cached_file_that_does_not_load_is_built_again(unpackaged, monkeypatch):
    cached = native._build()
    cached.write_bytes(b"\x7fELF cut short")  # a copy interrupted, or another machine's file
    assert native.primitives([torch.full((50,), -2.0)])[:, 0].tolist() == [200.0, -100.0, 50.0, 2.0]
    assert cached.stat().st_size > 1000


def test_without_a_c_compiler_compile_true_names_the_fix_and_changes_nothing(unpackaged, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    net = torch.nn.Linear(64, 64)
    net(torch.ones(1, 64)).sum().backward()
    before = net.weight.grad.clone()
    for _ in range(2):  # the second call is refused at once, from the first's verdict
        with pytest.raises(lw.MissingExtraError, match=r"C compiler.*/nonexistent/cc.*compile=None or False"):
            lw.grad_stats(net, compile=True)
    assert torch.equal(net.weight.grad, before) and not any(unpackaged.iterdir())
    assert lw.grad_stats(net, stats="max_abs")["weight"]["max_abs"] == before.abs().max().item()


@needs_compiler
@pytest.mark.skipif(not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists(),
                    reason="no Python headers: setup.py builds the kernels as an extension module")
def test_an_install_with_a_c_compiler_carries_the_kernels_and_the_default_uses_them(monkeypatch):
    """setup.py built them beside the package (make's editable install too): no compiler runs at all."""
    assert native._from_package(), "setup.py built no native kernels: reinstall (make) and read its output"
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("a compiler ran"))
    calls = []
    monkeypatch.setattr(native, "primitives", lambda xs, real=native.primitives: calls.append(len(xs)) or real(xs))
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    net(torch.randn(4, 8)).square().mean().backward()
    got, eager_stats = lw.grad_stats(net), lw.grad_stats(net, compile=False)
    assert calls == [4]  # one call, every gradient
    for (name, want), (got_name, value) in zip(eager_stats, got):
        assert got_name == name and value == pytest.approx(want, rel=1e-5, abs=1e-7)
    ema = lw.EMA(net, decay=0.9)
    assert all(b.native is not None for b in ema._buckets) == native.lerps(None)


def test_an_install_without_the_kernels_runs_torchs_and_never_compiles(unpackaged, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("a compiler ran"))
    monkeypatch.setattr(native, "primitives", lambda xs: pytest.fail("native kernels without an install"))
    net = torch.nn.Linear(8, 3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    monitor, ema = lw.GradMonitor(net, every=1, optimizer=opt), lw.EMA(net, decay=0.5)
    net(torch.randn(4, 8)).square().mean().backward()
    want = net.weight.grad.norm().item()
    assert lw.grad_stats(net)["weight"]["norm"] == pytest.approx(want)
    opt.step()
    ema.update()
    assert monitor.history[0]["grad_norm"] == pytest.approx(want) and ema._buckets[0].native is None
    assert not any(unpackaged.iterdir())


@needs_compiler
def test_a_packaged_library_built_from_another_source_is_never_used(monkeypatch):
    for name, value in (("_kernels", None), ("_packaged", None), ("_failed", None)):
        monkeypatch.setattr(native, name, value)
    monkeypatch.setattr(native, "_source_hash", lambda: "0" * 64)  # _native.c edited since the install
    assert not native.wanted(None) and native._kernels is None


@needs_compiler
@pytest.mark.parametrize("dtype", native.DTYPES)
def test_grad_stats_with_compile_equals_eager_for_each_dtype(dtype):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(300, 200), torch.nn.ReLU(), torch.nn.Linear(200, 3)).to(dtype)
    net(torch.randn(16, 300, dtype=dtype)).square().mean().backward()
    net[2].bias.grad.zero_()
    eager_stats, compiled = lw.grad_stats(net, by="module", compile=False), lw.grad_stats(net, by="module", compile=True)
    assert compiled.dead == eager_stats.dead == [] and list(compiled) != []
    for (name, want), (got_name, got) in zip(eager_stats, compiled):
        assert got_name == name
        assert got["max_abs"] == want["max_abs"] and got["zero_frac"] == want["zero_frac"]
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7)
    norms, want = lw.grad_stats(net, stats="norm", compile=True), lw.grad_stats(net, stats="norm", compile=False)
    assert [name for name, _ in norms] == [name for name, _ in want] and len(want.to_dict()) == 4
    for (_, got), (_, expected) in zip(norms, want):
        assert list(got) == ["norm"] and got == pytest.approx(expected, rel=1e-5)


@needs_compiler
def test_norms_alone_take_one_native_call_over_all_tensors(monkeypatch):
    called = []
    monkeypatch.setattr(native, "sumsq", lambda xs, real=native.sumsq: called.append(xs) or real(xs))
    monkeypatch.setattr(native, "primitives", lambda xs: pytest.fail("norms alone read all four statistics"))
    xs = [torch.randn(BIG), torch.randn(2, 3).t(), torch.randn(1)]
    got = compiled.block(xs, ("sumsq",), torch.device("cpu"), None)
    assert len(called) == 1 and got.shape == (1, 3)
    torch.testing.assert_close(got, kernels.block(xs, ("sumsq",), torch.device("cpu"), None), rtol=1e-6, atol=0)


@needs_compiler
def test_threads_split_the_bytes_and_pool_to_the_one_thread_result(monkeypatch):
    torch.manual_seed(0)
    xs = [torch.randn(n) for n in (5, 30000, 100, 70001, 0, 1 << 15)]
    xs[1][29990] = -77.0
    xs[3][60000] = math.nan
    xs[5][:1000] = 0
    one = native.primitives(xs)
    monkeypatch.setattr(native, "_PER_THREAD", 4096)  # pieces of a few blocks, so tensors split across threads
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        split, split_sumsq = native.primitives(xs), native.sumsq(xs)
        assert len(native._runs([xs])[0]) == 3  # one call per thread, whatever the tensors' sizes
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(split[2:].nan_to_num(), one[2:].nan_to_num()) and torch.equal(split.isnan(), one.isnan())
    assert split[3, 1].item() == 77.0 and math.isnan(split[3, 3].item())
    assert torch.allclose(split[:2], one[:2], rtol=1e-12, equal_nan=True)
    torch.testing.assert_close(split_sumsq, split[:1], rtol=0, atol=0, equal_nan=True)


def _threaded_primitives(queue) -> None:
    torch.set_num_threads(2)
    queue.put(native.primitives([torch.ones(20000), torch.arange(9000.0)]).tolist())


@needs_compiler
@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork only")
def test_a_forked_child_gets_threads_of_its_own(monkeypatch):
    import multiprocessing

    monkeypatch.setattr(native, "_PER_THREAD", 4096)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        want = native.primitives([torch.ones(20000), torch.arange(9000.0)]).tolist()  # the parent's pool exists
    finally:
        torch.set_num_threads(threads)
    time.sleep(0.2)  # the parent's workers idle, as between two training steps
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_threaded_primitives, args=(queue,))
    child.start()
    child.join(30)
    if child.exitcode is None:
        child.kill()
    assert child.exitcode == 0, "the child hung or failed"
    assert queue.get(timeout=5) == want


@needs_compiler
@settings(max_examples=25, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(EDGES), st.integers(0, 20000)), min_size=1, max_size=4),
       st.sampled_from(native.DTYPES), st.booleans(), st.integers(0, 2**16))
def test_copy_and_distance_measure_what_they_read_and_copy_every_bit(sizes, dtype, special, seed):
    gen = torch.Generator().manual_seed(seed)
    before = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    after = [b + torch.randn(b.shape, generator=gen).to(dtype) * 1e-3 for b in before]
    if special and before[0].numel() > 2:
        before[0][:3] = torch.tensor([-0.0, math.nan, math.inf])
    snapshot = [torch.full_like(b, 7.0) for b in before]
    copied = native.copy_sumsq(snapshot, before)
    bits = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16}[dtype]
    assert all(torch.equal(s.view(bits), b.view(bits)) for s, b in zip(snapshot, before))  # -0.0, NaN payloads
    distance = native.distance_sumsq(before, after)
    rtol = 1e-13 if dtype == torch.float64 else 1e-5
    for got, want in ((copied, [b.double().square().sum() for b in before]),
                      (distance, [(a.double() - b.double()).square().sum() for a, b in zip(after, before)])):
        want = torch.stack(want)[None]  # a block's one row
        assert got.shape == want.shape and torch.equal(got.isnan(), want.isnan())
        finite = want.isfinite()
        assert torch.allclose(got[finite], want[finite], rtol=rtol, atol=1e-30)
        assert torch.equal(got[~finite].nan_to_num(), want[~finite].nan_to_num())


@needs_compiler
@pytest.mark.parametrize("contiguous", [True, False])
def test_the_monitor_with_compile_snapshots_and_measures_updates_as_eager(contiguous):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.ReLU(), torch.nn.Linear(300, 4))
    if not contiguous:  # a transposed weight: the eager kernels copy and measure that group
        net[2].weight.data = net[2].weight.data.t().contiguous().t()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    monitors = [lw.GradMonitor(net, every=1, optimizer=opt, compile=c) for c in (False, True)]
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(16, 64)).square().mean().backward()
        opt.step()
    eager_rows, compiled_rows = (m.history for m in monitors)
    assert len(compiled_rows) == len(eager_rows) == 12
    for want, got in zip(eager_rows, compiled_rows):
        assert got["layer"] == want["layer"] and want["update_ratio"] > 0
        assert got["update_ratio"] == pytest.approx(want["update_ratio"], rel=1e-5)
        assert got["weight_norm"] == pytest.approx(want["weight_norm"], rel=1e-6)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64, torch.float16])
def test_a_model_moved_to_another_dtype_between_steps_keeps_its_update_ratios(dtype):
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 4)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [torch.optim.SGD(n.parameters(), lr=0.1) for n in nets]
    monitors = [lw.GradMonitor(n, every=1, optimizer=o, compile=c) for n, o, c in zip(nets, opts, (False, True))]
    x = torch.randn(8, 64)
    for step in range(2):
        if step == 1:  # the same parameters, in another dtype: the snapshot buffers must follow
            for net in nets:
                net.to(dtype)
        for net, opt in zip(nets, opts):
            opt.zero_grad()
            net(x.to(next(net.parameters()).dtype)).square().mean().backward()
            opt.step()
    want, got = (m.history[4:] for m in monitors)
    assert len(got) == len(want) == 4
    for w, g in zip(want, got):
        assert math.isfinite(g["weight_norm"]) and g["update_ratio"] is not None and g["update_ratio"] > 0
        assert g["weight_norm"] == pytest.approx(w["weight_norm"], rel=1e-5)  # both measured in float32 or wider
        assert g["update_ratio"] == pytest.approx(w["update_ratio"], rel=1e-3)  # eager subtracts in bf16


def test_native_pairs_refuse_tensors_laid_out_differently():
    with pytest.raises(lw.GradError, match="laid out alike"):
        native.copy_sumsq([torch.empty(4, dtype=torch.float64)], [torch.ones(4)])
    with pytest.raises(lw.GradError, match="laid out alike"):
        native.distance_sumsq([torch.ones(6)], [torch.ones(3)])
    with pytest.raises(lw.GradError, match="laid out alike"):
        native.copy_sumsq([torch.empty(3, 2).t()], [torch.ones(2, 3).t().contiguous().t()])


@needs_compiler
def test_the_engine_sends_only_pairs_laid_out_alike_to_the_native_kernels():
    from layerwise._grad_engine import copy_primitives, distance_primitives

    src = [torch.tensor([1.0, -0.0, 2.5, 3.0]), torch.arange(6.0), torch.ones(2, 3).t()]
    dst = [torch.empty(4, dtype=torch.float64), torch.empty(6), torch.empty(3, 2)]  # other dtype; alike; other strides
    prims = copy_primitives(dst, src, [None] * 3, None, compile=True)
    assert prims.values()["sumsq"].tolist() == pytest.approx([16.25, 55.0, 6.0], rel=1e-6)
    assert all(torch.equal(d, s.to(d.dtype)) for d, s in zip(dst, src))
    after = [s + 1 for s in src]
    assert distance_primitives(dst, after, [None] * 3, None, compile=True).values()["sumsq"].tolist() == pytest.approx(
        [4.0, 6.0, 6.0], rel=1e-6)


@needs_compiler
def test_tensor_subclasses_and_negative_views_are_left_to_torchs_kernels():
    """A wrapper subclass has no memory of its own (data_ptr() is 0) and a negative view stores the
    values it negates: the C loops would read null or the wrong sign."""
    from torch.testing._internal.two_tensor import TwoTensor

    net = torch.nn.Linear(3, 4, bias=False)
    net.weight.grad = torch._neg_view(torch.arange(12.0).reshape(4, 3))
    want = {"norm": torch.arange(12.0).norm().item(), "mean": -5.5, "max_abs": 11.0}
    for compile in (None, True, False):
        got = lw.grad_stats(net, stats=list(want), compile=compile)["weight"]
        assert got == pytest.approx(want), compile
    assert lw.grad_stats(net, stats="norm", compile=True)["weight"]["norm"] == pytest.approx(want["norm"])
    assert not native.takes([torch.ones(2), TwoTensor(torch.ones(2), torch.ones(2))])
    assert not native.fits(TwoTensor(torch.ones(2), torch.ones(2)), torch.ones(2), native.DTYPES)
    assert native.sumsq([TwoTensor(torch.ones(2), torch.ones(2))]) is None  # refused before any pointer is read
    assert native.primitives([torch.ones(3), torch._neg_view(torch.ones(3))]) is None
    net.weight.grad = TwoTensor(torch.ones(4, 3), 2 * torch.ones(4, 3))
    try:
        eager = lw.grad_stats(net, stats="norm", compile=False)["weight"]
    except RuntimeError as e:  # what torch's kernels make of it, the same with every flag
        with pytest.raises(type(e)):
            lw.grad_stats(net, stats="norm")
    else:
        assert lw.grad_stats(net, stats="norm")["weight"] == eager


@needs_compiler
def test_a_monitor_with_compile_false_never_calls_the_native_kernels(monkeypatch):
    for name in ("primitives", "sumsq", "copy_sumsq", "distance_sumsq"):
        monkeypatch.setattr(native, name, lambda *a, name=name: pytest.fail(f"native {name} with compile=False"))
    net = torch.nn.Linear(6, 3)
    monitor = lw.GradMonitor(net, every=1, stats="norm", compile=False)  # weight norms without a snapshot
    net(torch.randn(2, 6)).square().mean().backward()
    net.bias.grad[0] = math.nan  # the re-measure that names the non-finite layers
    with pytest.raises(lw.NonFiniteGradError):
        monitor.step()


@needs_compiler
@pytest.mark.parametrize("n", [31, 32, 64, 65, 4097])
def test_sums_of_squares_do_not_depend_on_where_an_element_falls(n):
    """Every square is rounded to the tensor's float type, in the vector lanes and in the scalar tail:
    squares below float32's range are zero wherever they are, as in torch's kernels."""
    tiny = torch.full((n,), 1e-30)
    huge = torch.full((n,), 3e19)  # its square overflows float32
    for x in (tiny, huge):
        eager = kernels.block([x], ("sumsq",), torch.device("cpu"), False)[0, 0].item()
        assert native.sumsq([x]).item() == native.primitives([x])[0, 0].item() == eager
    net = torch.nn.Linear(n, 1, bias=False)
    net.weight.grad = tiny[None].clone()
    assert lw.grad_stats(net).dead == lw.grad_stats(net, compile=False).dead == ["weight"]


@needs_compiler
def test_a_pickled_or_copied_ema_has_no_plan_and_never_compiles(monkeypatch):
    import copy
    import io
    import pickle

    net = torch.nn.Linear(30, 20)
    ema = lw.EMA(net, decay=0.9, compile=True)
    assert all(b.native is not None for b in ema._buckets) == native.lerps(True)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("a compiler ran"))
    buffer = io.BytesIO()
    torch.save(ema, buffer)
    buffer.seek(0)
    for twin in (torch.load(buffer, weights_only=False), copy.deepcopy(ema), pickle.loads(pickle.dumps(ema))):
        assert all(b.native is None for b in twin._buckets)
        assert all(torch.equal(a, b) for a, b in zip(twin.shadow, ema.shadow))


def test_a_zerotensor_gradient_is_measured_by_torchs_kernels():
    """autograd leaves an all-zero ZeroTensor (no memory: data_ptr() is 0) as the gradient of torch.sgn's input."""
    net = torch.nn.Linear(4, 4)
    (torch.randn(2, 4) @ torch.sgn(net.weight).T + net.bias).square().sum().backward()
    assert net.weight.grad._is_zerotensor() and not native.takes([net.weight.grad])
    for compile in (None, False):
        stats = lw.grad_stats(net, compile=compile)
        assert stats["weight"] == {"norm": 0.0, "mean": 0.0, "std": 0.0, "max_abs": 0.0, "zero_frac": 1.0}
        assert stats.dead == ["weight"]


@needs_compiler
@pytest.mark.skipif(not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists(), reason="no Python headers")
def test_a_wheel_carries_the_kernels_and_their_source_and_its_install_uses_them(tmp_path):
    """What pip installs from a wheel (not make's editable install): the library beside the package,
    _native.c with it (the hash it is checked against), and the default that takes them."""
    import sys
    import zipfile

    pytest.importorskip("setuptools", reason="built without isolation: the environment's setuptools builds it")
    root = Path(__file__).resolve().parents[1]
    project = tmp_path / "project"
    for name in ("setup.py", "pyproject.toml", "README.md"):
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / name, project / name)
    shutil.copytree(root / "src" / "layerwise", project / "src" / "layerwise",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(project)],
                   check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("layerwise-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "layerwise/_native.c" in names and any(n.startswith("layerwise/_native_kernels") for n in names)
    assert "-abi3-" in wheel.name  # one wheel for every Python from 3.10
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    probe = ("import layerwise, layerwise._native as n; "
             "print(layerwise.__file__, n.wanted(None), sorted(n._kernels)[0])")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=True,
                          env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    where, used, first = done.stdout.split()
    assert where.startswith(str(tmp_path / "site")) and used == "True" and first == "copy_bfloat16"
