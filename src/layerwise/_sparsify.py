"""Sparsification of task vectors, as mergekit's ``sparsify.py`` defines it: magnitude (TIES), random (DARE),
magnitude_outliers (breadcrumbs) and della_magprune (DELLA).

Each function takes a task vector that is the caller's own (it may be modified in place), the resolved
options, the model's index and the tensor's key, and returns the sparsified vector. Temporaries are
bool masks or chunks of at most ``_CHUNK`` entries, so a whole-tensor merge stays within a few copies
of its largest tensor.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ._merge_sliced import _slices

Options = Mapping[str, Any]
_CHUNK = 1 << 20  # entries per chunk of random draws and per-row ranks (4 MB of float32)
_REPLAY_MIN = 1 << 16  # below this many entries torch's own argsort is cheap enough
_SMALL = 1 << 15  # a segment this short is partitioned through its stops' positions
_LEAF = 16  # libstdc++'s _S_threshold: ranges this small are left to the final insertion sort


def generator(seed: int, key: str, index: int) -> torch.Generator:
    """One stream per (seed, tensor, model): a file merge and an in-memory merge draw the same masks."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{key}:{index}".encode()))


def _rescaled(tau: torch.Tensor, keep: torch.Tensor, rescale: Any, density: float) -> torch.Tensor:
    """``tau`` masked by ``keep`` in place, its norm restored (``rescale`` l1/l2/linf, ``True`` = l1) or
    divided by density. Multiplying by the mask, as mergekit does, keeps a nan where it was."""
    if rescale is False:
        return tau.mul_(keep)
    if rescale == "density":
        return tau.mul_(keep).div_(density)
    norm = {"l2": torch.linalg.vector_norm, "linf": lambda x: x.abs().max()}.get(rescale, lambda x: x.abs().sum())
    before = norm(tau)
    after = norm(tau.mul_(keep))
    if before < 1e-7 or after < 1e-7:  # mergekit's eps: nothing sensible to restore
        return tau
    return tau.mul_(before / after)


# --------------------------------------------------------------------------- exactly mergekit's top-k


def _replay_top(values: torch.Tensor, k: int) -> torch.Tensor | None:
    """The mask of ``torch.argsort(values, descending=True)[:k]`` without sorting: ``values`` (float32,
    1-D, no nan; overwritten) is partitioned exactly as libstdc++'s introsort (torch's CPU sort) does,
    following only the side that holds position k, so it costs a selection, not a sort. Entries tied
    with the k-th largest are chosen as that sort's unstable order chooses them. None where the
    introsort would fall back to heapsort (a depth limit; adversarial inputs only).
    """
    n = values.numel()
    idx = torch.arange(n, dtype=torch.int32 if n < 2**31 else torch.int64)
    first, last, depth = 0, n, 2 * (n.bit_length() - 1)
    while last - first > _LEAF and first != k:
        if depth == 0:
            return None
        depth -= 1
        # __move_median_to_first(first, first + 1, mid, last - 1), with comp(a, b) = a > b
        a, b, c = first + 1, first + (last - first) // 2, last - 1
        va, vb, vc = values[a].item(), values[b].item(), values[c].item()
        if va > vb:
            m = b if vb > vc else c if va > vc else a
        else:
            m = a if va > vc else c if vb > vc else b
        values[[first, m]], idx[[first, m]] = values[[m, first]], idx[[m, first]]
        cut = first + 1 + _partition(values[first + 1:last], idx[first + 1:last], values[first], k - first - 1)
        if k < cut:
            last = cut
        else:
            first = cut
    keep = torch.zeros(n, dtype=torch.bool)
    if first < k < last:  # the final insertion sort is stable within a leaf
        order = torch.sort(values[first:last], descending=True, stable=True).indices
        idx[first:last] = idx[first:last][order]
    keep[idx[:k]] = True
    return keep


def _partition(seg: torch.Tensor, sidx: torch.Tensor, p: torch.Tensor, k: int) -> int:
    """libstdc++'s __unguarded_partition of ``seg`` (and its indices ``sidx``) around ``p``; returns the cut.

    Scanning from the left stops at each entry <= p, from the right at each entry >= p; the i-th stops
    swap while they have not crossed (L[i] < R[i]), and the cut is where the scans meet. So the swaps
    pair the first s entries <= p with the last s entries >= p, found with a few passes over two bool
    masks, not an element loop. The left side's indices are always brought up to date; the values
    only on the side that is partitioned further: the one holding position ``k`` (and the right side's
    indices when it is that one).
    """
    m = seg.numel()
    le, ge = seg <= p, seg >= p
    if m <= _SMALL:  # a short segment: every stop's position
        lpos, rpos = le.nonzero().squeeze(1), ge.nonzero().squeeze(1).flip(0)
        q = min(lpos.numel(), rpos.numel())
        swaps = int((lpos[:q] < rpos[:q]).sum())
        cut = min(int(lpos[swaps]) if swaps < lpos.numel() else m, int(rpos[swaps - 1]) if swaps else m)
        lpos, rpos = lpos[:swaps], rpos[:swaps]
    else:  # a long one: counts per chunk find s and the cut; positions only of the entries that move
        left, right = _Ranks(le), _Ranks(ge)
        # s = max_j min(F(j), G(j)), F(j) = #le before j, G(j) = #ge from j on; F - G never decreases, so
        # the maximum is where it first reaches 0: found among chunk boundaries, then inside the chunk before.
        f_at, g_at = left.before, right.count - right.before
        c = int(torch.searchsorted(f_at - g_at, 0))
        if c == 0:  # no entry >= p: nothing to swap (impossible with a median pivot; kept for safety)
            swaps = 0
        else:
            lo, hi = left.bounds(c - 1)
            cle, cge = torch.cumsum(le[lo:hi], 0), torch.cumsum(ge[lo:hi], 0)
            f0, g0 = int(f_at[c - 1]), int(g_at[c - 1])
            t = int(torch.searchsorted((f0 - g0) + cle + cge, 0))  # F - G at j = lo + 1 + t first reaches 0
            swaps = max(f0 + (int(cle[t - 1]) if t else 0), g0 - int(cge[t]))  # max(F(j - 1), G(j))
        cut = min(left.position(swaps + 1) if swaps < left.count else m,
                  right.position(right.count - swaps + 1) if swaps else m)
        if swaps:
            end, start = left.position(swaps) + 1, right.position(right.count - swaps + 1)
            lpos = le[:end].nonzero().squeeze(1)  # the first s entries <= p
            rpos = ge[start:].nonzero().squeeze(1).flip(0).add_(start)  # the last s entries >= p, from the end
        del left, right
    del le, ge
    if swaps:
        if k > cut:  # the right side goes on: it needs the left entries' values and indices
            seg.index_copy_(0, rpos, seg.index_select(0, lpos))
            moved = sidx.index_select(0, lpos)
            sidx.index_copy_(0, lpos, sidx.index_select(0, rpos))
            sidx.index_copy_(0, rpos, moved)
        else:  # the left side goes on (or is the answer): the right side is dropped
            seg.index_copy_(0, lpos, seg.index_select(0, rpos))
            sidx.index_copy_(0, lpos, sidx.index_select(0, rpos))
    return cut


class _Ranks:
    """Where the true entries of a bool vector are, by rank, from counts per chunk: no index vector of
    the whole mask is built."""

    chunk = 255 * 8  # bools per chunk: 255 words of 8 bytes sum without a carry between their bytes

    def __init__(self, mask: torch.Tensor) -> None:
        self.mask = mask
        whole = mask.numel() // self.chunk * self.chunk
        counts = [torch.zeros(1, dtype=torch.int32)]
        if whole:  # a bool is a byte 0/1: sum the chunk as int64 words, then each word's 8 byte lanes
            words = mask[:whole].view(torch.int64).view(-1, 255).sum(1)
            counts.append(words.view(torch.uint8).view(-1, 8).sum(1, dtype=torch.int32))
        if whole < mask.numel():
            counts.append(mask[whole:].sum(dtype=torch.int32).view(1))
        self.before = torch.cat(counts).cumsum(0, dtype=torch.int64)  # true entries before each chunk boundary
        self.count = int(self.before[-1])

    def bounds(self, c: int) -> tuple[int, int]:
        return c * self.chunk, min((c + 1) * self.chunk, self.mask.numel())

    def position(self, rank: int) -> int:
        """The position of the rank-th true entry (1-based) from the start."""
        c = int(torch.searchsorted(self.before, rank)) - 1  # before[c] < rank <= before[c + 1]
        lo, hi = self.bounds(c)
        return lo + int(self.mask[lo:hi].nonzero()[rank - int(self.before[c]) - 1])


@functools.cache
def _replay_is_exact() -> bool:
    """The replay assumes libstdc++'s std::sort behind torch's CPU sort; another build (libc++ on macOS,
    a future torch) is caught once per process on tie-heavy data, and then argsort is used."""
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 64, (_REPLAY_MIN + 12345,), generator=g).float()
    for k in (1, 777, values.numel() // 2, values.numel() - 3):
        expected = torch.zeros(values.numel(), dtype=torch.bool)
        expected[torch.argsort(values, descending=True)[:k]] = True
        got = _replay_top(values.clone(), k)
        if got is None or not torch.equal(got, expected):
            return False
    return True


def top_mask(x: torch.Tensor, k: int, *, smallest: bool = False) -> torch.Tensor:
    """The k entries of largest magnitude that ``torch.argsort(x.abs().float(), descending=True)[:k]``
    picks, as a bool mask: mergekit's magnitude pruning, ties with the k-th largest chosen as that
    sort chooses them. ``smallest=True``: the first k of the ascending argsort (the same sort on the
    negated magnitudes, comparison for comparison).

    Example:
        >>> top_mask(torch.tensor([1.0, -5.0, 3.0, 5.0]), 2)
        tensor([False,  True, False,  True])
    """
    values = x.abs().float().flatten()  # our own copy: the replay reorders it
    if smallest:
        values.neg_()
    if values.numel() >= _REPLAY_MIN and values.device.type == "cpu" and not values.sum().isnan() \
            and _replay_is_exact():
        keep = _replay_top(values, k)
        if keep is not None:
            return keep.view(x.shape)
        values = x.abs().float().flatten()
        if smallest:
            values.neg_()
    keep = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    keep[torch.argsort(values, descending=True)[:k]] = True
    return keep.view(x.shape)


# --------------------------------------------------------------------------- the sparsifiers


def magnitude(tau: torch.Tensor, o: Options, i: int, key: str) -> torch.Tensor:
    """Keep the ``density`` fraction of entries of largest magnitude (at least one)."""
    density = o["density"][i]
    if density >= 1:
        return tau
    k = max(1, int(density * tau.numel()))  # mergekit asserts k > 0: a 4-entry bias at 0.2 keeps its largest
    if o.get("convention") == "layerwise":  # every entry tied with the k-th largest is kept
        size = tau.abs().flatten()
        keep = (size >= size.kthvalue(size.numel() - k + 1).values).view(tau.shape)
    else:  # exactly the k entries mergekit's argsort picks
        keep = top_mask(tau, k)
    return _rescaled(tau, keep, o["rescale"], density)


def _masked_in_chunks(tau: torch.Tensor, masks: Iterator[tuple[slice, torch.Tensor, torch.Tensor | None]],
                      rescale: Any, density: float) -> torch.Tensor:
    """``tau`` multiplied in place by masks of consecutive chunks of its flat view, then rescaled as
    :func:`_rescaled` does, with the norms summed chunk by chunk (in float64): a random mask never
    exists whole, so a merge holds its task vectors plus a chunk. A chunk may come with its
    magnitudes (used up for the l1 norms)."""
    flat = tau.view(-1)
    measure = {"l2": lambda x: x.square().sum(), "linf": lambda x: x.abs().max()}.get(rescale, lambda x: x.abs().sum())
    combine = max if rescale == "linf" else sum
    norms = rescale not in (False, "density")
    before, after = [], []
    for s, keep, size in masks:
        part, keep = flat[s], keep.view(-1)
        if norms and size is not None and rescale in (True, "l1"):
            size = size.view(-1)
            before.append(float(size.sum()))
            after.append(float(size.mul_(keep).sum()))
            part.mul_(keep)
            continue
        if norms:
            before.append(float(measure(part)))
        part.mul_(keep)
        if norms:
            after.append(float(measure(part)))
    if rescale == "density":
        return tau.div_(density)
    if not norms:
        return tau
    b, a = combine(before), combine(after)
    if rescale == "l2":
        b, a = b ** 0.5, a ** 0.5
    if b < 1e-7 or a < 1e-7:  # mergekit's eps: nothing sensible to restore
        return tau
    return tau.mul_(b / a)


def random(tau: torch.Tensor, o: Options, i: int, key: str) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``, seeded per (seed, key, model)."""
    density = o["density"][i]
    if density >= 1:
        return tau
    g, n = generator(o["seed"], key, i), tau.numel()
    u = torch.empty(min(n, _CHUNK), device=tau.device)

    def masks() -> Iterator[tuple[slice, torch.Tensor, None]]:  # the numbers of one torch.rand(tau.shape) call
        for s in _slices(n, _CHUNK):
            yield s, u[:s.stop - s.start].uniform_(generator=g) < density, None

    return _masked_in_chunks(tau, masks(), o["rescale"], density)


def magnitude_outliers(tau: torch.Tensor, o: Options, i: int, key: str) -> torch.Tensor:
    """Breadcrumbs: drop the ``gamma`` fraction of largest entries, then the smallest down to ``density``."""
    density, gamma = o["density"][i], o["gamma"][i]
    if density >= 1:
        return tau
    n = tau.numel()
    n_top = int(gamma * n)
    n_bottom = n - int(density * n) - n_top
    if n_bottom < 0:  # fewer outliers dropped, to keep density
        n_top, n_bottom = n_top + n_bottom, 0
    # mergekit keeps torch.sort(|tau|).indices[n_bottom:n - n_top]: the first n - n_top of that order
    # less its first n_bottom, each a prefix of the same (unstable) sort
    keep = top_mask(tau, n - n_top, smallest=True)
    if n_bottom:
        keep &= ~top_mask(tau, n_bottom, smallest=True)
    return _rescaled(tau, keep, o["rescale"], density)


def della_magprune(tau: torch.Tensor, o: Options, i: int, key: str) -> torch.Tensor:
    """DELLA's MagPrune: keep probability from density − ε (smallest) to density + ε (largest), ranked per row."""
    density, epsilon = o["density"][i], o["epsilon"][i]
    if density >= 1:
        return tau
    rows = tau.reshape(1, -1) if tau.ndim < 2 else tau  # ranked along dim 1, as mergekit
    width = rows.shape[1]
    if width > 1:  # the probability of each rank, 0 = smallest; a one-entry row gets the middle one
        by_rank = torch.linspace(density - epsilon, density + epsilon, width, dtype=tau.dtype)
    else:
        by_rank = torch.full((1,), density, dtype=tau.dtype)
    by_rank = by_rank.view(1, width, *[1] * (rows.ndim - 2))
    row = rows[0].numel()
    per = max(1, _CHUNK // row)  # rows ranked at once: the temporaries are a block's
    g = generator(o["seed"], key, i)
    u = torch.empty(min(rows.shape[0], per), *rows.shape[1:])

    def masks() -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:  # the numbers of one torch.rand(rows.shape)
        for block in _slices(rows.shape[0], per):
            size = rows[block].abs()
            order = size.argsort(dim=1)  # its inverse permutation is the ranks: one sort, not two
            probs = torch.empty(size.shape, dtype=tau.dtype).scatter_(1, order, by_rank.expand_as(order))
            del order
            keep = u[:size.shape[0]].uniform_(generator=g) < probs
            yield slice(block.start * row, block.stop * row), keep, size

    return _masked_in_chunks(tau, masks(), o["rescale"], density)


SPARSIFY = {"magnitude": magnitude, "random": random, "magnitude_outliers": magnitude_outliers,
            "della_magprune": della_magprune}
