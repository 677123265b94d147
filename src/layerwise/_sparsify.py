"""Sparsification of task vectors, as mergekit's ``sparsify.py`` defines it: magnitude (TIES), random (DARE),
magnitude_outliers (breadcrumbs) and della_magprune (DELLA).

Each function takes a task vector that is the caller's own (it may be modified in place), the resolved
options, the model's index and the tensor's key, and returns the sparsified vector. Temporaries are
chunks of at most ``_CHUNK`` entries, and for the magnitude selections one int32 index vector of the
tensor's length (:mod:`._replay`): a merge holds its task vectors plus one tensor's worth, the slot
its output takes later.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from . import _replay
from ._merge_sliced import _slices
from ._replay import Keys, replay

Options = Mapping[str, Any]
_CHUNK = 1 << 20  # entries per chunk of random draws and per-row ranks (4 MB of float32)
_REPLAY_MIN = 1 << 16  # below this many entries torch's own argsort is cheap enough


def generator(seed: int, key: str, index: int) -> torch.Generator:
    """One stream per (seed, tensor, model): a file merge and an in-memory merge draw the same masks."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{key}:{index}".encode()))


def _rescaled(tau: torch.Tensor, prune: Callable[[torch.Tensor], Any], rescale: Any, density: float) -> torch.Tensor:
    """``tau`` pruned in place (``prune`` multiplies the dropped entries by 0, as mergekit's mask does: a
    nan stays), its norm restored (``rescale`` l1/l2/linf, ``True`` = l1) or divided by density."""
    if rescale is False or rescale == "density":
        prune(tau)
        return tau if rescale is False else tau.div_(density)
    norm = {"l2": torch.linalg.vector_norm, "linf": lambda x: x.abs().max()}.get(rescale, lambda x: x.abs().sum())
    before = norm(tau)
    prune(tau)
    after = norm(tau)
    if before < 1e-7 or after < 1e-7:  # mergekit's eps: nothing sensible to restore
        return tau
    return tau.mul_(before / after)


# --------------------------------------------------------------------------- exactly mergekit's top-k


def _magnitudes(flat: torch.Tensor, smallest: bool) -> Keys:
    """The sort keys of ``torch.argsort(flat.abs().float(), descending=not smallest)`` at some positions: an
    ascending sort compares exactly as a descending one of the negated magnitudes."""
    def keys(where: slice | torch.Tensor) -> torch.Tensor:
        v = (flat[where].abs() if isinstance(where, slice) else flat.index_select(0, where).abs_()).float()
        return v.neg_() if smallest else v
    return keys


def prune_ranks(tau: torch.Tensor, lo: int, hi: int, *, smallest: bool = False) -> torch.Tensor:
    """Multiply by 0, in place, every entry of ``tau`` outside ranks [lo, hi) of
    ``torch.argsort(tau.abs().float(), descending=not smallest)``: mergekit's magnitude pruning (TIES keeps
    [0, k), breadcrumbs [n_bottom, n - n_top) of the ascending order), ties at a boundary broken as that
    unstable sort breaks them. The replay (:mod:`._replay`) needs one index vector of the tensor's length;
    a nan, another sort library or its depth limit falls back to argsort.

    Example:
        >>> prune_ranks(torch.tensor([1.0, -5.0, 3.0, 5.0]), 0, 2)
        tensor([ 0., -5.,  0.,  5.])
    """
    flat, n = tau.view(-1), tau.numel()
    zeros = n - int(torch.count_nonzero(flat))  # (a nan counts as nonzero)
    if smallest and lo <= zeros:  # ranks [0, lo) are zeros: multiplying them by 0 changes nothing
        lo = 0
    if not smallest and hi >= n - zeros:  # so are ranks [hi, n): a sparse task vector needs no selection
        hi = n
    if lo == 0 and hi == n:
        return tau
    if n >= _REPLAY_MIN and tau.device.type == "cpu" and not flat.sum().isnan() and _replay_is_exact():
        small = n <= _replay.kept()  # its keys and a mask of it fit in the working memory
        idx = replay(n, _magnitudes(flat, smallest), lo, hi, outside=not small)
        if idx is not None and small:  # the keys were only read: tau is untouched until here
            keep = torch.zeros(n, dtype=torch.bool)
            keep[idx[lo:hi]] = True
            del idx
            for s in _slices(n, _CHUNK):  # (a float mask multiplies faster than a bool one, which promotes)
                flat[s].mul_(keep[s].to(flat.dtype))
            return tau
        if idx is not None:  # the dropped ranks, a chunk of positions at a time
            for part in (idx[:lo], idx[hi:]):
                for s in _slices(part.numel(), _CHUNK):
                    where = part[s].long()  # (index_copy_ takes int64 only: a chunk of them)
                    flat.index_copy_(0, where, flat.index_select(0, where).mul_(0))
            return tau
    order = torch.argsort(flat.abs().float(), descending=not smallest)
    for part in (order[:lo], order[hi:]):
        flat[part] *= 0
    return tau


@functools.cache
def _replay_is_exact() -> bool:
    """The replay assumes libstdc++'s std::sort behind torch's CPU sort; another build (libc++ on macOS,
    a future torch) is caught once per process on tie-heavy data, and then argsort is used."""
    g = torch.Generator().manual_seed(0)
    values = torch.randint(-64, 64, (_REPLAY_MIN + 12345,), generator=g).float()
    n = values.numel()
    for lo, hi, smallest in ((0, 1, False), (0, 777, False), (0, n // 2, False), (n // 5, n - 3, True)):
        order = torch.argsort(values.abs(), descending=not smallest)
        expected = torch.zeros(n, dtype=torch.bool)
        expected[order[lo:hi]] = True
        idx = replay(n, _magnitudes(values, smallest), lo, hi)
        if idx is None or not torch.equal(expected.nonzero().squeeze(1), idx[lo:hi].sort().values.long()):
            return False
    return True


# --------------------------------------------------------------------------- the sparsifiers


def magnitude(tau: torch.Tensor, o: Options, i: int, key: str) -> torch.Tensor:
    """Keep the ``density`` fraction of entries of largest magnitude (at least one)."""
    density = o["density"][i]
    if density >= 1:
        return tau
    k = max(1, int(density * tau.numel()))  # mergekit asserts k > 0: a 4-entry bias at 0.2 keeps its largest
    if o.get("convention") == "layerwise":  # every entry tied with the k-th largest is kept
        def prune(t: torch.Tensor) -> None:
            size = t.abs().flatten()
            t.mul_((size >= size.kthvalue(size.numel() - k + 1).values).view(t.shape))
    else:  # exactly the k entries mergekit's argsort picks
        def prune(t: torch.Tensor) -> None:
            prune_ranks(t, 0, k)
    return _rescaled(tau, prune, o["rescale"], density)


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
    # mergekit keeps torch.sort(|tau|).indices[n_bottom:n - n_top]: both ends of one (unstable) sort
    return _rescaled(tau, lambda t: prune_ranks(t, n_bottom, n - n_top, smallest=True), o["rescale"], density)


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
