"""Sparsification: mergekit's exact top-k without its sort, and the random masks drawn in chunks."""

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from layerwise import _replay, _sparsify
from layerwise._replay import heap_select, replay
from layerwise._sparsify import della_magprune, prune_ranks, random


def pruned(x, lo, hi, smallest=False):
    """mergekit's selection: x times the mask of ranks [lo, hi) of torch's (unstable) argsort of |x|."""
    keep = torch.zeros(x.numel(), dtype=torch.bool)
    keep[torch.argsort(x.abs().flatten().float(), descending=not smallest)[lo:hi]] = True
    return x * keep.view(x.shape)


def tie_heavy(kind, n, g):
    return {"small integers": lambda: torch.randint(-6, 7, (n,), generator=g).float(),
            "bf16 differences": lambda: torch.randn(n, generator=g).bfloat16().float()
            - torch.randn(n, generator=g).bfloat16().float(),
            "mostly zeros": lambda: torch.randn(n, generator=g).bfloat16().float() * (torch.rand(n, generator=g) < 0.1),
            "all equal": lambda: torch.full((n,), -2.0),
            "periodic": lambda: (torch.arange(n) % 97).float()}[kind]()


@settings(max_examples=120, deadline=None)
@given(st.sampled_from(["small integers", "bf16 differences", "mostly zeros", "all equal", "periodic"]),
       st.integers(1, 3000), st.floats(0, 1), st.floats(0, 1), st.booleans(), st.booleans(),
       st.sampled_from([(64, 1), (256, 32), (1 << 20, 1 << 15)]), st.integers(0, 2**16))
def test_pruning_keeps_the_ranks_torch_s_unstable_sort_gives_among_ties(kind, n, a, b, smallest, outside, sizes, seed):
    # Ties at the boundaries, segments counted chunk by chunk or read whole, keys kept whole or read through
    # the index, one boundary (TIES) or two (breadcrumbs' slice of the ascending order): always argsort's
    # own choice, ties included.
    x = tie_heavy(kind, n, torch.Generator().manual_seed(seed))
    lo, hi = sorted((int(a * n), int(b * n)))
    with mock.patch.object(_replay, "CHUNK", sizes[0]), mock.patch.object(_replay, "_SMALL", sizes[1]), \
            mock.patch.object(_sparsify, "_REPLAY_MIN", 1):  # up to 8 chunks the keys are kept whole
        idx = replay(n, _sparsify._magnitudes(x, smallest), lo, hi, outside=outside)  # None: std::sort would heapsort
        order = torch.argsort(x.abs(), descending=not smallest)
        parts = [(lo, hi), (0, lo), (hi, n)] if outside else [(lo, hi)]
        assert idx is None or all(torch.equal(idx[i:j].sort().values.long(), order[i:j].sort().values) for i, j in parts)
        assert torch.equal(prune_ranks(x.clone(), lo, hi, smallest=smallest), pruned(x, lo, hi, smallest))


@pytest.mark.parametrize("kind, chunk", [  # the keys kept whole (up to 8 chunks), or read through idx
    ("small integers", 1 << 20), ("bf16 differences", 1 << 20), ("mostly zeros", 1 << 20), ("periodic", 1 << 20),
    ("small integers", 1 << 17), ("bf16 differences", 1 << 17)])
def test_the_replay_of_long_segments_equals_argsort(monkeypatch, kind, chunk):
    monkeypatch.setattr(_replay, "CHUNK", chunk)
    g = torch.Generator().manual_seed(1)
    n = 2 * (1 << 20) + 12_288  # counted chunk by chunk, then read whole, then through stop positions
    x = tie_heavy(kind, n, g).view(-1, 64)
    for lo, hi, smallest in ((0, 1, False), (0, n // 2, False), (0, n - 1, False), (n // 10, n - n // 20, True)):
        idx = replay(n, _sparsify._magnitudes(x.view(-1), smallest), lo, hi)
        order = torch.argsort(x.abs().view(-1), descending=not smallest)
        assert torch.equal(idx[lo:hi].sort().values.long(), order[lo:hi].sort().values), (lo, hi)
        assert torch.equal(prune_ranks(x.clone(), lo, hi, smallest=smallest), pruned(x, lo, hi, smallest))


def test_the_replay_reads_the_keys_and_holds_one_index_vector():
    x = tie_heavy("bf16 differences", _sparsify._REPLAY_MIN * 4, torch.Generator().manual_seed(3))
    seen = []

    def keys(where):
        seen.append(where.numel() if isinstance(where, torch.Tensor) else where.stop - where.start)
        return x[where].abs() if isinstance(where, slice) else x.index_select(0, where).abs_()

    idx = replay(x.numel(), keys, 0, 1000)
    assert idx.dtype == torch.int32 and idx.numel() == x.numel()
    assert torch.equal(idx[:1000].sort().values.long(), torch.argsort(x.abs(), descending=True)[:1000].sort().values)
    assert max(seen) <= _replay.CHUNK


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(["small integers", "bf16 differences", "mostly zeros", "all equal", "periodic"]),
       st.integers(64, 20_000), st.floats(0, 1), st.sampled_from([64, 4096, 1 << 20]), st.integers(0, 2**16))
def test_the_heap_replay_keeps_the_entries_torch_topk_s_heap_keeps_among_ties(kind, n, a, chunk, seed):
    # torch's CPU topk with k * 64 <= n: std::partial_sort's heap, whose choice among tied keys depends on
    # every entry that passed through it. SCE's mask is that choice (mergekit's torch.topk).
    x = tie_heavy(kind, n, torch.Generator().manual_seed(seed)).abs()
    k = max(1, int(a * n / 64))
    with mock.patch.object(_replay, "CHUNK", chunk):
        idx = heap_select(n, lambda w: x[w].clone(), k)
    assert torch.equal(idx.sort().values, x.topk(k).indices.sort().values)


def test_the_heap_replay_of_an_ascending_order_is_exact_and_holds_k_keys():
    # Ascending keys enter the heap one and all: every entry goes through Python, the slowest order.
    n, k = 1 << 17, 1 << 11
    ascending = (torch.arange(n) // 3).float()  # (each key three times: ties at every step)
    seen = []

    def keys(where):
        seen.append(where.stop - where.start)
        return ascending[where].clone()

    assert torch.equal(heap_select(n, keys, k).sort().values, ascending.topk(k).indices.sort().values)
    assert max(seen) <= max(k, 4096)


def test_pruning_falls_back_to_argsort_for_nan_a_depth_limit_and_another_sort(monkeypatch):
    g = torch.Generator().manual_seed(2)
    x = torch.randint(-4, 5, (300, 300), generator=g).float()
    assert torch.equal(prune_ranks(x.clone(), 0, 40_000), pruned(x, 0, 40_000))
    x[3, 4] = float("nan")  # torch's comparator puts nan first: argsort decides (and the nan stays)
    assert torch.equal(prune_ranks(x.clone(), 0, 40_000).nan_to_num(7.0), pruned(x, 0, 40_000).nan_to_num(7.0))
    x[3, 4] = 1.0
    monkeypatch.setattr(_sparsify, "replay", lambda *a, **k: None)  # the introsort's depth limit: heapsort
    assert torch.equal(prune_ranks(x.clone(), 0, 40_000), pruned(x, 0, 40_000))
    calls = []
    monkeypatch.setattr(_sparsify, "_replay_is_exact", lambda: False)
    monkeypatch.setattr(_sparsify, "replay", lambda *a, **k: calls.append(a))
    assert torch.equal(prune_ranks(x.clone(), 0, 40_000), pruned(x, 0, 40_000)) and not calls


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
