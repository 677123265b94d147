"""Sparsification: mergekit's exact top-k without its sort, and the random masks drawn in chunks."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from layerwise import _sparsify
from layerwise._sparsify import _replay_top, della_magprune, random, top_mask


def argsort_mask(values, k):
    """mergekit's sparsify.magnitude selection: the first k of torch's (unstable) descending argsort."""
    keep = torch.zeros(values.numel(), dtype=torch.bool)
    keep[torch.argsort(values.abs().flatten().float(), descending=True)[:k]] = True
    return keep.view(values.shape)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=3000), st.floats(0, 1))
def test_the_replay_picks_the_entries_torch_s_unstable_sort_picks_among_ties(values, fraction):
    x = torch.tensor(values, dtype=torch.float32)
    k = max(1, min(x.numel(), int(fraction * x.numel())))
    assert torch.equal(_replay_top(x.clone(), k), argsort_mask(x, k))


@pytest.mark.parametrize("kind", ["bf16 differences", "few values", "all equal", "periodic"])
def test_the_replay_of_long_segments_equals_argsort(kind):
    g = torch.Generator().manual_seed(1)
    n = 3 * _sparsify._SMALL + 12_345  # partitioned through chunk counts, then through stop positions
    x = {"bf16 differences": lambda: (torch.randn(n, generator=g).bfloat16().float()
                                      - torch.randn(n, generator=g).bfloat16().float()).abs(),
         "few values": lambda: torch.randint(0, 5, (n,), generator=g).float(),
         "all equal": lambda: torch.zeros(n),
         "periodic": lambda: (torch.arange(n) % 97).float()}[kind]()
    for k in (1, 4097, n // 2, int(0.7 * n), n - 1):
        assert torch.equal(_replay_top(x.clone(), k), argsort_mask(x, k)), k


def test_top_mask_falls_back_to_argsort_for_nan_a_depth_limit_and_another_sort(monkeypatch):
    g = torch.Generator().manual_seed(2)
    x = torch.randint(-4, 5, (300, 300), generator=g).float()
    before = x.clone()
    assert torch.equal(top_mask(x, 40_000), argsort_mask(x, 40_000)) and torch.equal(x, before)
    assert torch.equal(top_mask(x, 40_000), argsort_mask(x, 40_000))
    x[3, 4] = float("nan")  # torch's comparator puts nan first: argsort decides
    assert torch.equal(top_mask(x, 40_000), argsort_mask(x, 40_000))

    def gives_up(values, k):  # the introsort's depth limit: the replay has reordered its copy and stops
        values.copy_(values.flip(0))

    monkeypatch.setattr(_sparsify, "_replay_top", gives_up)
    assert torch.equal(top_mask(x, 40_000), argsort_mask(x, 40_000))
    calls = []
    monkeypatch.setattr(_sparsify, "_replay_is_exact", lambda: False)
    monkeypatch.setattr(_sparsify, "_replay_top", lambda *a: calls.append(a))
    x[3, 4] = 1.0
    assert torch.equal(top_mask(x, 40_000), argsort_mask(x, 40_000)) and not calls


def test_the_self_check_accepts_this_torch():
    assert _sparsify._replay_is_exact()


def test_dare_draws_the_same_mask_in_chunks_as_one_rand_call():
    tau = torch.randn(3 * _sparsify._CHUNK + 5)
    o = {"density": (0.3,), "rescale": False, "seed": 7}
    keep = torch.rand(tau.shape, generator=_sparsify.generator(7, "w", 0)) < 0.3
    assert torch.equal(random(tau.clone(), o, 0, "w"), tau * keep)


def test_della_keep_probability_rises_linearly_with_the_rank_in_each_row_across_chunks():
    g = torch.Generator().manual_seed(0)
    rows = 3 * _sparsify._CHUNK // 256 + 7  # several blocks of rows
    ranks = torch.stack([torch.randperm(256, generator=g) for _ in range(rows)])
    tau = (ranks + 1).float() * (torch.randint(0, 2, ranks.shape, generator=g) * 2 - 1)
    o = {"density": (0.5,), "epsilon": (0.4,), "rescale": False, "seed": 3}
    kept = (della_magprune(tau.clone(), o, 0, "w") != 0).float()
    by_rank = torch.zeros(256).index_add_(0, ranks.flatten(), kept.flatten()) / rows
    expected = 0.1 + 0.8 * torch.arange(256) / 255  # density - epsilon at the smallest, + epsilon at the largest
    assert (by_rank.view(8, 32).mean(1) - expected.view(8, 32).mean(1)).abs().max() < 0.015
    assert abs(kept.mean().item() - 0.5) < 0.005


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 3), st.floats(0, 1), st.floats(0, 1))
def test_smallest_prefixes_pick_what_the_ascending_sort_picks(seed, lo, hi):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (_sparsify._REPLAY_MIN + 999,), generator=g).float()  # replayed, tie-heavy
    order = torch.argsort(x.abs(), descending=False)  # mergekit's magnitude_outliers order
    for k in (int(lo * x.numel()), int(hi * x.numel())):
        expected = torch.zeros(x.numel(), dtype=torch.bool)
        expected[order[:k]] = True
        assert torch.equal(top_mask(x, k, smallest=True), expected)
