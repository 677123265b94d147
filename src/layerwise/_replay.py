"""Which entries torch's CPU sort (or topk) puts first, found without sorting and within one index vector.

mergekit picks the entries to keep with ``torch.argsort(...)[:k]`` (TIES, breadcrumbs) or
``torch.topk(...)`` (SCE); among entries tied at the boundary, the unstable order of libstdc++'s
``std::sort`` / ``std::nth_element`` / ``std::partial_sort`` decides. :func:`replay` performs the same partitions (median of
three, Hoare's unguarded partition, the same depth limit) but only of the ranges that hold a boundary,
so it costs a selection, not a sort. Its one tensor of the input's length is the permutation ``idx``
(int32 below 2**31 entries): the sort keys are read through it chunk by chunk (``keys``), never copied,
and the swaps are found from counts of stops per block, so every other temporary is a chunk's.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterator, Sequence

import torch

CHUNK = 1 << 20  # positions read at once: a few temporaries of 4-8 MB
_SMALL = 1 << 15  # a segment this short is read once and partitioned through its stops' positions
SORT_LEAF = 16  # std::sort's _S_threshold: ranges this small are left to the final insertion sort
SELECT_LEAF = 3  # std::nth_element's: its loop runs while last - first > 3

Keys = Callable[[slice | torch.Tensor], torch.Tensor]  # positions -> a new float32 tensor of their sort keys


def replay(n: int, keys: Keys, lo: int, hi: int, leaf: int = SORT_LEAF, *, outside: bool = False
           ) -> torch.Tensor | None:
    """A permutation ``idx`` of ``range(n)`` whose entries [lo, hi) are the positions that a descending
    libstdc++ introsort (``leaf=SORT_LEAF``) or introselect (``SELECT_LEAF``) of the keys puts at ranks
    [lo, hi); with ``outside``, idx[:lo] and idx[hi:] hold the others' too (else only as a set, together).
    ``keys(where)`` (a slice, or an index tensor) returns the keys at those positions of the input; they
    must not be nan. None where the library would switch to heapsort (its depth limit: adversarial
    inputs only), so the caller falls back to torch's own sort.

    Example:
        >>> x = torch.tensor([3.0, 1.0, 3.0, 2.0])
        >>> replay(4, lambda w: x[w].clone(), 0, 2).tolist()[:2]
        [0, 2]
    """
    bounds = [b for b in (lo, hi) if 0 < b < n]
    r = _Replay(n, keys, bounds, (lo, hi, outside))
    if n <= kept():  # the keys of a tensor this small are kept whole (working memory) and permuted along
        step = max(1, CHUNK // 4)  # (quarter chunks: the keys' own temporaries stay small beside them)
        first = keys(slice(0, min(n, step)))
        whole = torch.empty(n, dtype=first.dtype, device=first.device)
        whole[:first.numel()] = first
        for s in _slices(first.numel(), n, step):
            whole[s] = keys(s)
        r.cache = 0, n, whole
    # (first, last, depth limit left): the ranges that hold a bound, the only ones partitioned further
    segments = [(0, n, 2 * (n.bit_length() - 1))] if any(0 < b < n for b in bounds) else []
    while segments:
        first, last, depth = segments.pop()
        if last - first <= leaf:  # the final insertion sort: stable within the leaf
            r.order(first, last, torch.sort(r.read(first, last), descending=True, stable=True).indices)
            continue
        if depth == 0:
            return None
        cut = r.partition(first, last)
        segments += [(lo, hi, depth - 1) for lo, hi in ((first, cut), (cut, last)) if any(lo < b < hi for b in bounds)]
    return r.index()


class _Replay:
    """The permutation of one replay. Until the first partition is done it is the identity but for the
    pivot's swap, so that partition (the longest) reads the keys in place, not through ``idx``."""

    def __init__(self, n: int, keys: Keys, bounds: Sequence[int], wanted: tuple[int, int, bool]) -> None:
        self.n, self.keys, self.bounds, self.wanted, self.idx = n, keys, bounds, wanted, None
        self.sides = (True, True)  # whether the keys of the partition's left and right sides are read again
        self.kept = (True, True)  # whether their positions are (partitioned again, or ranks wanted)
        self.moved, self.key0 = -1, None  # the root's pivot swap: position moved holds entry 0's key
        self.cache: tuple[int, int, torch.Tensor] | None = None  # the last range read, until idx changes
        self.masks: tuple[int, torch.Tensor, torch.Tensor] | None = None  # a one-chunk partition's stops

    def index(self) -> torch.Tensor:
        if self.idx is None:
            self.idx = torch.arange(self.n, dtype=torch.int32 if self.n < 2**31 else torch.int64)
            if self.moved >= 0:
                self.idx[0], self.idx[self.moved] = self.moved, 0
        return self.idx

    def read(self, lo: int, hi: int) -> torch.Tensor:
        """The keys at positions [lo, hi) of the current arrangement (a segment that fits in a chunk is
        read once per partition: counted, searched and swapped from the same keys)."""
        if (v := self._covered(lo, hi)) is not None:
            return v
        if self.idx is not None and self.key0 is None:
            v = self.keys(self.idx[lo:hi])
        else:
            v = self.keys(slice(lo, hi))
            if lo <= self.moved < hi:
                v[self.moved - lo] = self.key0
        self.cache = lo, hi, v
        return v

    def partition(self, first: int, last: int) -> int:
        """std::__unguarded_partition_pivot: the median of three to ``first``, then [first + 1, last) split."""
        if last - first <= CHUNK:  # read once: the pivot, the partition and the side that goes on
            self.read(first, last)
        a, b, c = first + 1, first + (last - first) // 2, last - 1
        va, vb, vc = (self.read(i, i + 1).item() for i in (a, b, c))
        if va > vb:  # __move_median_to_first(first, a, b, c) with comp(x, y) = x > y
            m = b if vb > vc else c if va > vc else a
        else:
            m = a if va > vc else c if vb > vc else b
        p = self.read(m, m + 1).item()
        if self.idx is None:  # the root: remember the swap instead of applying it to an identity vector
            self.key0, self.moved = self.read(first, first + 1).item(), m
            self.index()
        else:
            self.idx[first], self.idx[m] = self.idx[m].item(), self.idx[first].item()
        if (v := self._covered(first, last)) is not None:
            v[0], v[m - first] = p, v[0].item()
        cut = self._partition(first + 1, last, p)
        self.key0 = None  # from now on the keys are read through idx
        return cut

    def _covered(self, lo: int, hi: int) -> torch.Tensor | None:
        """The cached keys of [lo, hi) (a view, to be kept in step with idx), or None (and no cache)."""
        if self.cache is not None and self.cache[0] <= lo and hi <= self.cache[1]:
            return self.cache[2][lo - self.cache[0]:hi - self.cache[0]]
        self.cache = None
        return None

    def order(self, first: int, last: int, order: torch.Tensor) -> None:
        """Rearrange positions [first, last) as ``order`` says."""
        idx = self.index()
        idx[first:last] = idx[first:last][order]
        if (v := self._covered(first, last)) is not None:
            v.copy_(v[order])

    def _swap(self, lpos: torch.Tensor, rpos: torch.Tensor) -> None:
        """Exchange the entries at positions lpos[i] and rpos[i] (all of lpos before all of rpos)."""
        moved = self.idx.index_select(0, lpos) if self.kept[1] else None
        if self.kept[0]:
            self.idx.index_copy_(0, lpos, self.idx.index_select(0, rpos))
        if moved is not None:
            self.idx.index_copy_(0, rpos, moved)
        if self._covered(int(lpos[0]), int(rpos[0]) + 1) is not None:  # the cached keys move with them
            lo, _, v = self.cache  # (only to a side that is partitioned again: the other is never read)
            lpos, rpos = (lpos - lo, rpos - lo) if lo else (lpos, rpos)
            moved = v.index_select(0, lpos) if self.sides[1] else None
            if self.sides[0]:
                v.index_copy_(0, lpos, v.index_select(0, rpos))
            if moved is not None:
                v.index_copy_(0, rpos, moved)

    def _partition(self, lo: int, hi: int, p: float) -> int:
        """Hoare's partition of [lo, hi) around ``p``; returns the cut.

        The scan from the left stops at each key <= p, from the right at each key >= p; the i-th stops
        swap while they have not crossed (L[i] < R[i]), and the cut is where the scans meet. So the swaps
        pair the first s stops of the left scan with the first s of the right one, found from counts of
        the stops: no element loop. A long segment is counted chunk by chunk and read again to swap.
        """
        m = hi - lo
        if m <= _SMALL:  # one read: every stop's position
            v = self.read(lo, hi)
            lpos, rpos = (v <= p).nonzero().squeeze(1), (v >= p).nonzero().squeeze(1).flip(0)
            q = min(lpos.numel(), rpos.numel())
            swaps = int((lpos[:q] < rpos[:q]).sum())
            cut = min(int(lpos[swaps]) if swaps < lpos.numel() else m, int(rpos[swaps - 1]) if swaps else m)
            self._goes_on(lo - 1, lo + cut, hi)
            if swaps:
                self._swap(lpos[:swaps].add_(lo), rpos[:swaps].add_(lo))
            return lo + cut
        counts = [torch.zeros(1, 2, dtype=torch.int64)]
        self.masks = None
        for s in _slices(lo, hi):  # stops per block (blocks tile the chunks; only the last one is short)
            v = self.read(s.start, s.stop)
            le, ge = v <= p, v >= p
            counts.append(torch.stack([_per_block(le), _per_block(ge)], 1))
        if m <= CHUNK:  # one chunk: its stops are searched and gathered from these masks
            self.masks = lo, le, ge
        before = torch.cat(counts).cumsum(0)  # stops of each scan before each block boundary
        before_le, before_ge = before[:, 0].contiguous(), before[:, 1].contiguous()
        n_le, n_ge = int(before_le[-1]), int(before_ge[-1])
        # s = max_j min(F(j), G(j)), F(j) = #le before j, G(j) = #ge from j on; F - G never decreases, so the
        # maximum is where it first reaches 0: found among block boundaries, then inside the block before.
        c = int(torch.searchsorted(before_le - (n_ge - before_ge), 0))
        if c == 0:  # no key >= p (impossible with a median pivot): no swap, the cut at the first key <= p
            return self._position(lo, hi, before_le, 1, True, p) if n_le else hi
        blo = lo + (c - 1) * _block()
        cle, cge = (torch.cumsum(self._stopped(blo, min(blo + _block(), hi), le, p), 0) for le in (True, False))
        f0, g0 = int(before_le[c - 1]), n_ge - int(before_ge[c - 1])
        t = int(torch.searchsorted((f0 - g0) + cle + cge, 0))  # F - G at j = blo + 1 + t first reaches 0
        swaps = max(f0 + (int(cle[t - 1]) if t else 0), g0 - int(cge[t]))  # max(F(j - 1), G(j))
        cut = min(self._position(lo, hi, before_le, swaps + 1, True, p) if swaps < n_le else hi,
                  self._position(lo, hi, before_ge, n_ge - swaps + 1, False, p) if swaps else hi)
        self._goes_on(lo - 1, cut, hi)
        if swaps:  # the i-th stop of [lo, cut) from the left with the i-th of [cut, hi) from the right
            lefts, rights = self._stops(lo, cut, True, p), self._stops(cut, hi, False, p)
            left = right = torch.empty(0, dtype=torch.int64)
            done = 0
            while done < swaps:
                left = left if left.numel() else next(lefts)
                right = right if right.numel() else next(rights)
                q = min(left.numel(), right.numel(), swaps - done)
                if q:
                    self._swap(left[:q], right[:q])
                left, right, done = left[q:], right[q:], done + q
        return cut

    def _goes_on(self, first: int, cut: int, last: int) -> None:
        """Which sides are partitioned again (their keys are read), and which positions are still wanted:
        a side that is not partitioned again lies within the wanted ranks or outside them."""
        self.sides = (any(first < b < cut for b in self.bounds), any(cut < b < last for b in self.bounds))
        lo, hi, outside = self.wanted
        self.kept = (self.sides[0] or outside or lo <= first and cut <= hi,
                     self.sides[1] or outside or lo <= cut and last <= hi)

    def _position(self, lo: int, hi: int, before: torch.Tensor, rank: int, le: bool, p: float) -> int:
        """The position of the rank-th (1-based) stop of one scan, counted from ``lo``."""
        c = int(torch.searchsorted(before, rank)) - 1  # before[c] < rank <= before[c + 1]
        blo = lo + c * _block()
        ranks = torch.cumsum(self._stopped(blo, min(blo + _block(), hi), le, p), 0)
        return blo + int(torch.searchsorted(ranks, rank - int(before[c])))  # the first reaching that rank

    def _stops(self, lo: int, hi: int, le: bool, p: float) -> Iterator[torch.Tensor]:
        """The left scan's stops in [lo, hi) in order (``le``), or the right scan's from the end, chunk by chunk."""
        step = max(1, CHUNK // 4)  # a quarter chunk: their int64 positions take 2 MB
        for s in (_slices(lo, hi, step) if le else reversed(list(_slices(lo, hi, step)))):
            at = self._stopped(s.start, s.stop, le, p).nonzero().squeeze(1).add_(s.start)
            yield at if le else at.flip(0)

    def _stopped(self, lo: int, hi: int, le: bool, p: float) -> torch.Tensor:
        """Where the left scan (``le``: keys <= p) or the right one (keys >= p) stops in [lo, hi)."""
        if self.masks is not None and self.masks[0] <= lo:
            start, whole_le, whole_ge = self.masks
            return (whole_le if le else whole_ge)[lo - start:hi - start]
        v = self.read(lo, hi)
        return v <= p if le else v >= p


def heap_select(n: int, keys: Keys, k: int) -> torch.Tensor:
    """The positions of the k largest keys that libstdc++'s ``std::partial_sort`` keeps (torch's CPU topk
    where k * 64 <= n), ties included. Its heap is replayed with :mod:`heapq`, whose sift is the same
    operation for operation (the same child on ties, the same strict tests), over the keys as Python floats
    that carry their positions: k of them held, the keys read chunk by chunk.

    Example:
        >>> x = torch.tensor([1.0, 3.0, 2.0, 3.0, 3.0] * 26)  # 130 keys, k = 2: torch.topk takes its heap
        >>> sorted(heap_select(130, lambda w: x[w].clone(), 2).tolist()), sorted(x.topk(2).indices.tolist())
        ([1, 3], [1, 3])
    """
    heap = [_Entry(v) for v in keys(slice(0, k)).tolist()]
    for at, entry in enumerate(heap):
        entry.at = at
    heapq.heapify(heap)  # std::make_heap: the same sifts from the same last parent down
    # Chunks of about k: the heap's top rises as they pass, so about k ln(n / k) entries are looked at in
    # Python in a random order (all of them in an ascending one: slow, still exact and bounded).
    for s in _slices(k, n, min(max(k, 4096), CHUNK)):
        chunk = keys(s)
        above = torch.nonzero(chunk > heap[0]).view(-1)
        for v, at in zip(chunk[above].tolist(), above.add_(s.start).tolist()):
            if v > heap[0]:  # std::__heap_select: comp(i, first), i.e. greater than the heap's smallest
                entry = _Entry(v)
                entry.at = at
                heapq.heapreplace(heap, entry)  # std::__pop_heap: the same sift from the top
    return torch.tensor([entry.at for entry in heap], dtype=torch.int64)


class _Entry(float):
    """A key that compares as the float it is (in C: heapq's sifts stay fast) and knows its position."""
    __slots__ = ("at",)


def _slices(lo: int, hi: int, step: int | None = None) -> Iterator[slice]:
    step = step or CHUNK
    return (slice(start, min(start + step, hi)) for start in range(lo, hi, step))


def _block() -> int:
    """Stops are counted per block of this many positions, a divisor of CHUNK: a rank is then found by
    reading one block, not a chunk."""
    return math.gcd(CHUNK, 4096)


def _per_block(mask: torch.Tensor) -> torch.Tensor:
    b = _block()
    whole = mask.numel() // b * b
    if b % 1024 == 0:  # a bool is a byte 0/1: sum 128 int64 words (no carry between their byte lanes), then the lanes
        counts = mask[:whole].view(torch.int64).view(-1, 128).sum(1).view(torch.uint8).view(-1, b // 128).sum(1)
    else:
        counts = mask[:whole].view(torch.uint8).view(-1, b).sum(1)
    return torch.cat([counts, mask[whole:].sum().view(1)]) if whole < mask.numel() else counts


def kept() -> int:
    """Up to this many keys (32 MB of float32: working memory) are read once and kept, not read per partition."""
    return 8 * CHUNK

