"""Model Stock, SCE, multislerp and nuslerp computed slice by slice: mergekit's numbers, in bounded memory."""

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from layerwise import _merge_sliced, _replay
from layerwise._merge_math import merge_tensor
from layerwise._merge_methods import get_method
from layerwise._merge_options import resolve_options


def opts(method, models, weight=None, **options):
    return resolve_options(get_method(method), ["w"], models, weights=weight, options=options)["w"]


# mergekit 0.1.5's definitions, stacked as it stacks them (merge_methods/model_stock.py, sce.py, multislerp.py)


def mk_model_stock(w_0, ws, filter_wise):
    shape = w_0.shape
    if filter_wise:
        if w_0.dim() == 1:
            w_0, ws = w_0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w_0, ws = w_0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w_0 for w in ws]
    cos = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cos.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    den = 1 + (n - 1) * cos
    singular = den.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), (n * cos) / torch.where(singular, torch.ones_like(den), den))
    return (t * (sum(ws) / n) + (1 - t) * w_0).reshape(shape)


def mk_sce(base, xs, select_topk):
    tvs = torch.stack([x - base for x in xs])
    if select_topk < 1:
        var = torch.var(tvs, dim=0, unbiased=False)
        k = int(torch.count_nonzero(var) * select_topk)
        mask = torch.zeros_like(var)
        mask.view(-1)[torch.topk(var.abs().view(-1), k=k).indices] = 1
        tvs = tvs * mask.unsqueeze(0)
    erase = tvs.sign() == (tvs.sum(0) >= 0).float() * 2 - 1
    w = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    w = w / w.sum().item()
    w = w.view(-1, *[1] * (tvs.dim() - 1)) * erase
    return base + (tvs * w).sum(0) / w.sum(0).clamp(min=1e-6)


def mk_multislerp(xs, base, weights, eps=1e-8):
    t = torch.stack(xs) - base
    flat = t.view(t.shape[0], -1)
    w = torch.tensor(weights)
    w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean = mean / torch.norm(mean)
    tangent = ((units - (units * mean).sum(-1, keepdim=True) * mean) * w.view(-1, 1)).sum(0)
    length = torch.norm(tangent) + eps
    res = (mean * torch.cos(length) + tangent * (torch.sin(length) / length)) * (norms.squeeze(-1) * w).sum()
    return res.view(t.shape[1:]) + base


def mk_nuslerp(t, v0, v1, row_wise, eps=1e-7):  # merge_methods/nuslerp.py, unflattened
    shape = v0.shape
    if row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=eps)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=eps)
    theta = torch.acos(torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1))
    sin = torch.sin(theta)
    colinear = (sin.abs() < 1e-8).squeeze()
    res = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin
    res[colinear] = (1 - t) * v0[colinear] + t * v1[colinear]
    return (res.transpose(0, -1) if row_wise else res).reshape(shape)


def inputs(shape, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=g).bfloat16().float()
    return base, [base + 0.01 * torch.randn(*shape, generator=g).bfloat16().float() for _ in range(n)]


@pytest.mark.parametrize("slice_size", [1 << 20, 1000])  # one slice (bit-equal), many slices
@pytest.mark.parametrize("shape", [(96, 130), (7,), (3, 5, 40)])
def test_sliced_methods_equal_mergekit_s_stacked_definitions(monkeypatch, slice_size, shape):
    monkeypatch.setattr(_merge_sliced, "_SLICE", slice_size)
    base, xs = inputs(shape)
    exact = slice_size > base.numel()
    for filter_wise in (False, True):
        got = merge_tensor("model_stock", list(xs), base, opts("model_stock", 3, filter_wise=filter_wise))
        torch.testing.assert_close(got, mk_model_stock(base, xs, filter_wise), atol=0 if exact else 1e-6, rtol=0)
    for topk in (1.0, 0.5):
        got = merge_tensor("sce", list(xs), base, opts("sce", 3, select_topk=topk))
        torch.testing.assert_close(got, mk_sce(base, xs, topk), atol=0 if exact else 1e-6, rtol=0)
    got = merge_tensor("multislerp", list(xs), base, opts("multislerp", 3, weight=[0.5, 0.3, 0.2]))
    torch.testing.assert_close(got, mk_multislerp(xs, base, [0.5, 0.3, 0.2]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("method, options, base", [
    ("karcher", {}, False), ("nuslerp", {}, True), ("nuslerp", {}, False),
    ("nuslerp", {"nuslerp_flatten": False}, True)])
def test_karcher_and_nuslerp_give_the_same_result_over_many_slices_as_over_one(monkeypatch, method, options, base):
    b, xs = inputs((96, 130), n=2 if method == "nuslerp" else 3, seed=4)
    o = opts(method, len(xs), weight=[0.3, 0.7] if method == "nuslerp" else [0.2, 0.3, 0.5], **options)
    whole = merge_tensor(method, list(xs), b if base else None, o)
    monkeypatch.setattr(_merge_sliced, "_SLICE", 1000)
    torch.testing.assert_close(merge_tensor(method, list(xs), b if base else None, o), whole, atol=1e-6, rtol=0)


def test_model_stock_keeps_the_base_where_the_ratio_is_singular():
    base = torch.zeros(4)
    a, b = torch.tensor([1.0, 0, 0, 0]), torch.tensor([-1.0, 0, 0, 0])  # cos = -1 with 2 models: 1 + (n-1)cos = 0
    assert torch.equal(merge_tensor("model_stock", [a, b], base, opts("model_stock", 2)), base)


@pytest.mark.parametrize("slice_size", [1 << 20, 1000])  # one block of rows, many
@pytest.mark.parametrize("shape", [(96, 130), (40,), (6, 5, 40)])
@pytest.mark.parametrize("row_wise", [False, True])
def test_nuslerp_with_an_angle_per_row_equals_mergekit_s_block_by_block(monkeypatch, slice_size, shape, row_wise):
    monkeypatch.setattr(_merge_sliced, "_SLICE", slice_size)
    base, (a, b) = inputs(shape, n=2, seed=5)
    b[0] = 3 * (a[0] - base[0]) + base[0]  # a colinear row (or the 1-D vector): interpolated linearly
    o = opts("nuslerp", 2, weight=[0.3, 0.7], nuslerp_flatten=False, nuslerp_row_wise=row_wise)
    expected = base + mk_nuslerp(0.7, a - base, b - base, row_wise)
    exact = not row_wise or slice_size > base.numel() or len(shape) < 2  # sums along dim 0 over blocks: float64
    torch.testing.assert_close(merge_tensor("nuslerp", [a, b], base, o), expected, atol=0 if exact else 1e-6, rtol=0)
    torch.testing.assert_close(merge_tensor("nuslerp", [a, b], None, o), mk_nuslerp(0.7, a, b, row_wise),
                               atol=0 if exact else 1e-6, rtol=0)


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(["small integers", "bf16", "mostly equal", "distinct"]), st.integers(1, 3000),
       st.one_of(st.floats(0, 0.03), st.floats(0, 0.999)), st.sampled_from([(64, 1), (256, 32), (1 << 20, 1 << 15)]),
       st.integers(0, 2**16))
def test_sce_selects_the_entries_torch_topk_picks_among_tied_variances(kind, n, fraction, sizes, seed):
    # mergekit's sce_mask: torch.topk(var.abs(), k) with k = int(count_nonzero(var) * select_topk); its ties
    # are std::nth_element's choice (k > n / 64) or std::partial_sort's heap's, both replayed.
    g = torch.Generator().manual_seed(seed)
    draw = {"small integers": lambda: torch.randint(-2, 3, (n,), generator=g).float(),
            "bf16": lambda: torch.randn(n, generator=g).bfloat16().float(),
            "mostly equal": lambda: torch.randint(0, 2, (n,), generator=g).float() * (torch.rand(n, generator=g) < 0.2),
            "distinct": lambda: torch.randn(n, generator=g)}
    xs, base = [draw[kind]() for _ in range(3)], torch.zeros(n)
    replays, topks = [], []
    _merge_sliced._select_is_exact()  # (its once-per-process self-check calls torch.topk)

    def counted(*args):
        replays.append(args)
        return _replay.replay(*args)

    def topk(self, *args, **kwargs):
        topks.append(args)
        return torch.topk(self, *args, **kwargs)

    with mock.patch.object(_replay, "CHUNK", sizes[0]), mock.patch.object(_replay, "_SMALL", sizes[1]), \
            mock.patch.object(_merge_sliced, "replay", counted), mock.patch.object(_merge_sliced, "_SLICE", 1000), \
            mock.patch.object(torch.Tensor, "topk", topk):
        keep = _merge_sliced._top_variance(xs, base, fraction)
        got = torch.cat([keep(s) for s in _merge_sliced._slices(n)])
    var = torch.var(torch.stack(xs), dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * fraction)
    expected = torch.zeros(n, dtype=torch.bool)
    expected[var.abs().topk(k).indices] = True
    assert torch.equal(got, expected)
    assert bool(replays) == (k * 64 > n)
    assert not topks  # never torch.topk itself: its (value, index) pairs are 4x the variance



@pytest.mark.parametrize("models", [1, 2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sce_s_variance_without_the_stack_is_torch_var_to_the_bit(models, dtype):
    g = torch.Generator().manual_seed(models)
    xs = [torch.randn(70_000, generator=g, dtype=dtype).mul_(10.0 ** i) for i in range(models)]
    xs[-1][:1000] = torch.randint(-2, 3, (1000,), generator=g).to(dtype)  # ties and exact zeros
    assert _merge_sliced._welford_is_exact(models)  # (else _var is torch.var itself)
    assert torch.equal(_merge_sliced._var(xs), torch.var(torch.stack(xs), dim=0, unbiased=False))
