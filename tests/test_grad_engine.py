"""The private gradient engine: primitives of every layout, copies and distances."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from layerwise import _grad_kernels as grad_kernels
from layerwise._grad_engine import (
    PRIMITIVES,
    STATS,
    copy_primitives,
    derive,
    distance_primitives,
    local_primitives,
    local_tensors,
    to_host,
)
from layerwise._grad_kernels import _SMALL


@pytest.mark.parametrize("compile", [False, None])
def test_primitives_of_a_sparse_gradient_are_those_of_its_dense_form(compile):
    sparse = torch.sparse_coo_tensor([[1, 1, 3]], [[2.0, 0.0], [-1.0, 0.0], [0.0, 5.0]], (4, 2))
    prims = local_primitives(*local_tensors([sparse], ["w"]), PRIMITIVES, None, compile)
    prims.load(to_host(prims.tensors()))
    values = {name: v.item() for name, v in prims.values().items()}
    assert values == pytest.approx({"sumsq": 26.0, "sum": 6.0, "nonzero": 2.0, "max_abs": 5.0}, rel=1e-7)


# --------------------------------------------------------------------------- CPU primitives


def definition(x: torch.Tensor) -> dict[str, float]:
    """The four primitives of one tensor, the obvious way in float64."""
    d = x.detach().double()
    return {"sumsq": d.square().sum().item(), "sum": d.sum().item(), "nonzero": float((d != 0).sum()),
            "max_abs": d.abs().max().item() if d.numel() else 0.0}


def engine_values(tensors: list[torch.Tensor], foreach=None) -> list[dict[str, float]]:
    prims = local_primitives(tensors, [None] * len(tensors), PRIMITIVES, foreach, False)
    values = {k: v.tolist() for k, v in prims.values().items()}
    return [{k: values[k][i] for k in PRIMITIVES} for i in range(len(tensors))]


def assert_primitives(got: dict[str, float], want: dict[str, float], rel: float) -> None:
    scale = want["sumsq"] ** 0.5  # a cancelling sum is as exact as its terms' size allows
    assert got["sumsq"] == pytest.approx(want["sumsq"], rel=rel, nan_ok=True)
    assert got["sum"] == pytest.approx(want["sum"], rel=rel, abs=rel * scale, nan_ok=True)
    assert got["nonzero"] == want["nonzero"]
    assert got["max_abs"] == pytest.approx(want["max_abs"], nan_ok=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cpu_primitives_of_small_and_large_tensors_equal_their_definition(dtype):
    # Both sides of the batching threshold, exact zeros of both signs, a non-contiguous view.
    gen = torch.Generator().manual_seed(0)
    sizes = [1, 3, 17, _SMALL, _SMALL + 1, 40_000]
    tensors = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    tensors[2][:5] = 0.0
    tensors[4][::3] = -0.0
    tensors.append(torch.randn(300, 200, generator=gen).to(dtype).t())  # large and strided
    tensors.append(torch.zeros(20_000, dtype=dtype))  # dead
    rel = 1e-5 if dtype in (torch.float32, torch.float64) else 2e-3
    for got, x in zip(engine_values(tensors), tensors):
        assert_primitives(got, definition(x), rel)


def test_cpu_primitives_carry_nan_and_inf_at_every_size():
    tensors = [torch.ones(n) for n in (5, 6, 40_000, 40_001)]
    tensors[0][1] = tensors[2][7] = math.nan
    tensors[1][0] = tensors[3][-1] = -math.inf
    got = engine_values(tensors)
    assert [math.isnan(g["max_abs"]) for g in got] == [True, False, True, False]
    assert [g["max_abs"] for g in got[1::2]] == [math.inf, math.inf]
    assert [g["nonzero"] for g in got] == [5, 6, 40_000, 40_001]  # NaN and inf are not zeros


def test_cpu_primitives_without_numpy_equal_those_with_it(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    tensors = [torch.randn(n, generator=gen) for n in (4, 9, 30_000)]
    tensors[2][:100] = 0
    with_numpy = engine_values(tensors)
    monkeypatch.setattr(grad_kernels, "_numpy", lambda: None)
    for got, want in zip(engine_values(tensors), with_numpy):
        assert_primitives(got, want, 1e-6)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 3 * _SMALL), min_size=1, max_size=6), st.integers(0, 2**16),
       st.sampled_from([None, True, False]))
def test_cpu_primitives_equal_their_definition_whatever_the_sizes_and_path(sizes, seed, foreach):
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(n, generator=gen) * torch.rand(n, generator=gen).lt(0.8) for n in sizes]  # ~20% zeros
    for got, x in zip(engine_values(tensors, foreach), tensors):
        want = definition(x) if x.numel() else {"sumsq": 0.0, "sum": 0.0, "nonzero": 0.0, "max_abs": 0.0}
        assert_primitives(got, want, 1e-5)


def test_copy_and_distance_primitives_are_the_weights_and_update_norms():
    gen = torch.Generator().manual_seed(3)
    weights = [torch.randn(n, generator=gen) for n in (3, 40_000)] + [torch.randn(50, 40, generator=gen).t()]
    for foreach in (None, True, False):
        buffers = [torch.empty_like(w) for w in weights]
        copied = copy_primitives(buffers, weights, [None] * 3, foreach, False).values()["sumsq"]
        assert all(torch.equal(b, w) for b, w in zip(buffers, weights))
        assert copied.tolist() == pytest.approx([w.double().square().sum().item() for w in weights], rel=1e-6)
    after = [w + 0.01 * torch.randn(w.shape, generator=gen) for w in weights]
    for foreach in (None, True, False):
        before = [b.clone() for b in buffers]
        moved = distance_primitives(before, after, [None] * 3, foreach, False).values()["sumsq"]
        want = [(a.double() - w.double()).square().sum().item() for a, w in zip(after, weights)]
        assert moved.tolist() == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_primitives_of_a_tensor_measured_in_pieces_pool_exactly(monkeypatch, dtype):
    monkeypatch.setattr(grad_kernels, "_CHUNK_BYTES", 1024)  # pieces of _SMALL elements
    gen = torch.Generator().manual_seed(4)
    tensors = [torch.randn(n, generator=gen).to(dtype) for n in (3 * _SMALL + 5, _SMALL + 1, 2 * _SMALL)]
    tensors[0][-3:] = 0  # zeros in the last piece only
    tensors[0][_SMALL + 2] = -50  # the largest magnitude in a middle piece
    tensors[2][-1] = math.nan
    got = engine_values(tensors)
    rel = 1e-5 if dtype == torch.float32 else 2e-3
    for g, x in zip(got[:2], tensors[:2]):
        assert_primitives(g, definition(x), rel)
    assert got[0]["max_abs"] == 50 and got[0]["nonzero"] == 3 * _SMALL + 2
    assert math.isnan(got[2]["max_abs"]) and got[2]["nonzero"] == 2 * _SMALL


def test_copy_and_distance_of_tensors_in_pieces_pool_exactly(monkeypatch):
    monkeypatch.setattr(grad_kernels, "_CHUNK_BYTES", 1024)  # pieces of _SMALL elements
    gen = torch.Generator().manual_seed(5)
    weights = [torch.randn(3 * _SMALL + 7, generator=gen), torch.randn(4, generator=gen),
               torch.randn(2 * _SMALL, 3, generator=gen).t()]  # large, small, large and strided
    buffers = [torch.empty_like(w) for w in weights]
    copied = copy_primitives(buffers, weights, [None] * 3, False, False).values()["sumsq"]
    assert all(torch.equal(b, w) for b, w in zip(buffers, weights))
    assert copied.tolist() == pytest.approx([w.double().square().sum().item() for w in weights], rel=1e-6)
    after = [w + torch.randn(w.shape, generator=gen) for w in weights]
    moved = distance_primitives(buffers, after, [None] * 3, None, False).values()["sumsq"]
    want = [(a.double() - w.double()).square().sum().item() for a, w in zip(after, weights)]
    assert moved.tolist() == pytest.approx(want, rel=1e-5)


def test_cpu_primitives_asked_for_alone_are_those_of_the_full_set():
    gen = torch.Generator().manual_seed(6)
    tensors = [torch.randn(n, generator=gen) for n in (5, 7, 3 * _SMALL)]
    full = engine_values(tensors)
    for name in PRIMITIVES:
        alone = local_primitives(tensors, [None] * 3, (name,), None, False).values()[name].tolist()
        # Norms alone take _foreach_norm, whose float32 sums may split across threads: not bit-equal to the dot.
        assert alone == pytest.approx([f[name] for f in full], rel=1e-5)


# --------------------------------------------------------------------------- statistics from primitives

_SPECIAL = st.sampled_from([0.0, -0.0, math.nan, math.inf, -math.inf, 1e-300, 1e300])
_FLOAT = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64), _SPECIAL)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_FLOAT.map(abs), _FLOAT, _FLOAT.map(abs), _FLOAT.map(abs),
                          st.sampled_from([0.0, 1.0, 2.0, 3.0, 1e6, 2.0**53])), min_size=1, max_size=6))
def test_statistics_from_primitives_are_those_of_torch(rows):
    """``derive`` works on host floats (no torch call to dispatch): every statistic is the float64
    tensor arithmetic of torch.std's definition, to the last bit but one (Python's sqrt rounds
    correctly, torch's float64 sqrt not always), with NaN, infinities and empty tensors alike."""
    sumsq, total, nonzero, max_abs, numel = (list(column) for column in zip(*rows))
    got = derive({"sumsq": sumsq, "sum": total, "nonzero": nonzero, "max_abs": max_abs}, numel, STATS)
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in
         (("sumsq", sumsq), ("sum", total), ("nonzero", nonzero), ("max_abs", max_abs), ("numel", numel))}
    var = (t["sumsq"] - t["sum"].square() / t["numel"]).clamp_min(0) / (t["numel"] - 1)
    want = {"norm": t["sumsq"].sqrt(), "mean": t["sum"] / t["numel"],
            "std": torch.where(t["numel"] > 1, var.sqrt(), math.nan), "max_abs": t["max_abs"],
            "zero_frac": 1 - t["nonzero"] / t["numel"]}
    for stat in STATS:
        expected = want[stat]
        if stat in ("mean", "zero_frac"):  # an empty tensor (numel 0) has a sum and a count of 0: 0 / 0
            expected = torch.where(t["numel"] == 0, math.nan, expected)
        torch.testing.assert_close(torch.tensor(got[stat], dtype=torch.float64), expected, rtol=2.3e-16, atol=0,
                                   equal_nan=True, msg=stat)
