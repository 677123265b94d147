"""Whole-tensor methods computed slice by slice: Model Stock, SCE, multislerp, karcher and nuslerp.

Their definitions (mergekit 0.1.5) stack the models' tensors and build several more of that size;
here the inputs stay a list, the whole-tensor statistics (norms, dot products, energies) are summed
over slices of ``_SLICE`` entries, and the element-wise tail is written slice by slice into the
output. So a merge holds the inputs, the base and the output plus slice-sized temporaries: within
``(models + 2) × largest tensor + 64 MB`` in ``merge_files``. A statistic of a tensor that fits in
one slice is the whole-tensor reduction itself (mergekit's numbers to the bit); over several slices
the partial sums are added in float64 (within float32 rounding of mergekit's). SCE's top-k selection
holds one index vector (before the output exists) and then its mask as bits.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from ._replay import SELECT_LEAF, heap_select, replay
from .errors import MergeError

Options = Mapping[str, Any]
_SLICE = 1 << 20  # entries per slice: a few float32 temporaries of 4 MB each


def _slices(n: int, size: int | None = None) -> Iterator[slice]:
    size = size or _SLICE
    return (slice(start, min(start + size, n)) for start in range(0, n, size))


def _total(parts: list[torch.Tensor]) -> torch.Tensor:
    """The sum of per-slice reductions: the one part itself when there is one slice, else a float64 sum."""
    if len(parts) == 1:
        return parts[0]
    return torch.stack([p.double() for p in parts]).sum(0).to(parts[0].dtype)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1)


# --------------------------------------------------------------------------- Model Stock


def model_stock(xs: Sequence[torch.Tensor], base: torch.Tensor, o: Options, key: str) -> torch.Tensor:
    n, shape, by_row = len(xs), base.shape, o["filter_wise"]
    if by_row:  # one ratio per row of the last dimension (a vector is one row); slices of whole rows
        width = shape[-1] if base.ndim else 1
        ws, w0 = [x.reshape(-1, width) for x in xs], base.reshape(-1, width)
        blocks = [slice(s.start // width, s.stop // width) for s in _slices(w0.numel(), max(width, _SLICE // width * width))]
    else:  # one ratio for the tensor
        ws, w0 = [_flat(x) for x in xs], _flat(base)
        blocks = list(_slices(w0.numel()))
    whole = by_row or len(blocks) == 1  # each reduction lies within one slice: mergekit's own numbers
    norms: list[list[torch.Tensor]] = [[] for _ in range(n)]
    dots: dict[tuple[int, int], list[torch.Tensor]] = {(i, j): [] for i in range(n) for j in range(i + 1, n)}
    for s in blocks:
        offsets = [w[s] - w0[s] for w in ws]
        for i, a in enumerate(offsets):
            if whole:
                norms[i].append(torch.linalg.vector_norm(a, dim=-1))
            for j in range(i + 1, n):
                dots[i, j].append((a * offsets[j]).sum(dim=-1))
        del offsets
    gather = torch.cat if by_row else _total
    # Over several slices, each norm is still one reduction of the whole offset (mergekit's numbers),
    # one offset at a time, before the output exists.
    norm = [gather(parts) if whole else torch.linalg.vector_norm(w - w0) for parts, w in zip(norms, ws)]
    cosines = [(gather(dots[i, j]) / (norm[i] * norm[j]).clamp(min=1e-6)).clamp(-1, 1) for (i, j) in dots]
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6  # mergekit: no finite estimate there, so the base is kept
    t = torch.where(singular, torch.zeros_like(cos), (n * cos) / torch.where(singular, 1.0, denominator))
    out = torch.empty_like(w0)
    for s in blocks:
        ts = t[s] if by_row else t
        total = ws[0][s] + 0  # sum(ws) / n, added in mergekit's order
        for w in ws[1:]:
            total += w[s]
        out[s] = ts * (total / n) + (1 - ts) * w0[s]
    return out.reshape(shape)


# --------------------------------------------------------------------------- SCE


def sce(xs: Sequence[torch.Tensor], base: torch.Tensor, o: Options, key: str) -> torch.Tensor:
    n, b, flat = len(xs), _flat(base), [_flat(x) for x in xs]
    blocks = list(_slices(b.numel()))

    def tvs(s: slice) -> list[torch.Tensor]:
        return [x[s] - b[s] for x in flat]

    keep = _top_variance(flat, b, o["select_topk"]) if o["select_topk"] < 1 else None
    # Each model's energy: the mean square of its (selected) task vector, as a share of the total.
    energy = [[] for _ in range(n)]
    for s in blocks:
        mask = keep(s) if keep is not None else None
        for i, tv in enumerate(tvs(s)):
            energy[i].append((tv * mask if mask is not None else tv).square().sum())
    energies = torch.stack([_total(e) for e in energy]) / b.numel()
    total = energies.sum().item()
    weights = torch.full_like(energies, 1 / n) if abs(total) < 1e-6 else energies / total
    out = torch.empty_like(b)
    for s in blocks:
        mask = keep(s) if keep is not None else None
        parts = [tv * mask if mask is not None else tv for tv in tvs(s)]
        positive = sum(parts[1:], parts[0].clone()) >= 0  # the elected sign: + where the sum is >= 0
        merged, divisor = torch.zeros_like(b[s]), torch.zeros_like(b[s])
        for i, tv in enumerate(parts):
            w = weights[i] * torch.where(positive, tv > 0, tv < 0)  # mergekit: sign(tv) == elected sign
            merged += tv * w
            divisor += w
        out[s] = b[s] + merged / divisor.clamp(min=1e-6)
    return out.view(base.shape)


def _variance(flat: Sequence[torch.Tensor], b: torch.Tensor) -> Callable[[slice | torch.Tensor], torch.Tensor]:
    """The variance across models of the task vectors at some positions (a slice, or an index vector)."""
    def keys(where: slice | torch.Tensor) -> torch.Tensor:
        if isinstance(where, slice):
            tvs = [x[where] - b[where] for x in flat]
        else:
            bw = b.index_select(0, where)
            tvs = [x.index_select(0, where).sub_(bw) for x in flat]
        return _var(tvs).abs_()
    return keys


def _var(xs: list[torch.Tensor]) -> torch.Tensor:
    """``torch.var(torch.stack(xs), dim=0, unbiased=False)`` without the stack, several times faster:
    torch's CPU kernel runs Welford's update in float64, one model after another, which this repeats
    operation for operation (checked once per process and model count, else torch.var)."""
    if xs[0].dtype not in (torch.float32, torch.float64) or xs[0].device.type != "cpu" or not _welford_is_exact(len(xs)):
        return torch.var(torch.stack(xs), dim=0, unbiased=False)
    return _welford(xs)


def _welford(xs: list[torch.Tensor]) -> torch.Tensor:
    mean, m2 = xs[0].to(torch.float64, copy=True), torch.zeros(xs[0].shape, dtype=torch.float64)
    for i, x in enumerate(xs[1:], start=2):
        x = x.to(torch.float64, copy=True)
        delta = x - mean
        mean += delta / i
        m2 += delta.mul_(x.sub_(mean))
    return m2.div_(len(xs)).to(xs[0].dtype)


@functools.cache
def _welford_is_exact(models: int) -> bool:
    g = torch.Generator().manual_seed(models)
    xs = [torch.randn(4099, generator=g).mul_(10.0 ** (i - 2)).bfloat16().float() for i in range(models - 1)]
    xs = [*xs, torch.randint(-3, 4, (4099,), generator=g).float()]  # (small integers: exact ties)
    return torch.equal(_welford(xs), torch.var(torch.stack(xs), dim=0, unbiased=False))


def _top_variance(flat: Sequence[torch.Tensor], b: torch.Tensor, fraction: float) -> Callable[[slice], torch.Tensor]:
    """The mask, slice by slice, of mergekit's ``torch.topk(var.abs().view(-1), k)`` with
    ``k = int(count_nonzero(var) * fraction)``, ties chosen as torch's CPU topk chooses them.

    Where topk runs std::nth_element (k > n / 64) the selection is replayed (:mod:`._replay`): the
    variances are computed again where read, so the merge holds one index vector, not the variance,
    and the mask is kept as bits. Below that topk runs a heap (std::partial_sort), replayed too
    (:func:`._replay.heap_select`, k floats). torch.topk itself picks, holding the variance and its
    (value, index) pairs, only off libstdc++ (or where the introselect's depth limit is reached).
    """
    n, keys = b.numel(), _variance(flat, b)
    nonzero, finite = 0, True
    for s in _slices(n, max(1, _SLICE // 4)):  # (quarter slices: the variance's float64 temporaries)
        v = keys(s)
        nonzero += int(torch.count_nonzero(v))
        finite = finite and not v.sum().isnan()
    k = int(nonzero * fraction)
    idx = None
    if k and b.device.type == "cpu" and finite and _select_is_exact():
        idx = replay(n, keys, 0, k, SELECT_LEAF) if k * 64 > n else heap_select(n, keys, k)
    if idx is None and k:
        idx = torch.cat([keys(s) for s in _slices(n)]).topk(k).indices
    bits = torch.zeros((n + 7) // 8, dtype=torch.uint8, device=b.device)
    one = torch.ones(1, dtype=torch.uint8, device=b.device)
    for s in _slices(k):  # positions are distinct: adding their bits is or-ing them
        where = idx[s].long()
        bits.index_add_(0, where >> 3, one.expand(where.numel()) << (where & 7).to(torch.uint8))
    del idx
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device)

    def mask(s: slice) -> torch.Tensor:
        skip = s.start % 8
        byte = bits[s.start // 8:(s.stop + 7) // 8]
        return ((byte.unsqueeze(1) >> shifts) & 1).view(-1)[skip:skip + s.stop - s.start].bool()
    return mask


@functools.cache
def _select_is_exact() -> bool:
    """The replays assume libstdc++'s std::nth_element and std::partial_sort behind torch's CPU topk;
    another build is caught once per process on tie-heavy data, and then torch.topk is used."""
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 64, (50_000,), generator=g).float()
    for k in (100, 700, 1000, 25_000, 49_990):  # (the first two: topk's heap)
        n, keys = values.numel(), lambda w: values[w].clone()
        idx = heap_select(n, keys, k) if k * 64 <= n else replay(n, keys, 0, k, SELECT_LEAF)
        if idx is None or not torch.equal(idx[:k].sort().values.long(), values.topk(k).indices.sort().values):
            return False
    return True


# --------------------------------------------------------------------------- multislerp


def multislerp(xs: Sequence[torch.Tensor], base: torch.Tensor | None, o: Options, key: str) -> torch.Tensor:
    if len(xs) == 1:
        return xs[0].clone()
    eps, n = o["eps"], len(xs)
    flat = [_flat(x) for x in xs]
    b = _flat(base) if base is not None else None
    blocks = list(_slices(flat[0].numel()))
    w = torch.tensor(o["weight"], dtype=flat[0].dtype, device=flat[0].device)
    if o["normalize_weights"]:
        w = w / w.sum()

    def delta(i: int, s: slice) -> torch.Tensor:
        return flat[i][s] - b[s] if b is not None else flat[i][s]

    # The models' norms (whole-tensor reductions, as mergekit's: one task vector at a time, before the
    # output exists), then their unit vectors' weighted mean, in the output buffer.
    norms = torch.stack([torch.linalg.vector_norm(delta(i, slice(None))) for i in range(n)])
    scale = norms + eps
    mean = torch.empty_like(flat[0])
    for s in blocks:
        acc = delta(0, s) / scale[0] * w[0]
        for i in range(1, n):
            acc += delta(i, s) / scale[i] * w[i]
        mean[s] = acc
    mean_norm = torch.linalg.vector_norm(mean) if len(blocks) == 1 else \
        _total([mean[s].square().sum() for s in blocks]).sqrt()
    if mean_norm < eps:
        if n != 2:
            raise MergeError(f"multislerp: the weighted directions of {key} cancel out (antipodal tensors with "
                             "balancing weights); change the weights")
        for s in blocks:
            mean[s] = delta(0, s) * w[0] + delta(1, s) * w[1]
    else:
        mean /= mean_norm
        # The tangent vectors at the mean (each unit vector less its component along the mean), weighted.
        dots = [_total([(delta(i, s) / scale[i] * mean[s]).sum() for s in blocks]) for i in range(n)]

        def tangent(s: slice) -> torch.Tensor:
            acc = (delta(0, s) / scale[0] - dots[0] * mean[s]) * w[0]
            for i in range(1, n):
                acc += (delta(i, s) / scale[i] - dots[i] * mean[s]) * w[i]
            return acc

        length = _total([tangent(s).square().sum() for s in blocks]).sqrt() if len(blocks) > 1 else \
            torch.linalg.vector_norm(tangent(blocks[0]))
        length = length + eps
        average = (norms * w).sum()
        for s in blocks:
            mean[s] = (mean[s] * torch.cos(length) + tangent(s) * (torch.sin(length) / length)) * average
    if b is not None:
        mean += b
    return mean.view(xs[0].shape)


# --------------------------------------------------------------------------- karcher, nuslerp (flattened)


def karcher(xs: Sequence[torch.Tensor], base: torch.Tensor | None, o: Options, key: str) -> torch.Tensor:
    if len(xs) == 1:
        return xs[0].clone()
    tol, total = o["tol"], math.fsum(o["weight"])
    alphas = [w / total for w in o["weight"]]
    flat = [_flat(x) for x in xs]
    norms = [torch.linalg.vector_norm(f).item() for f in flat]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(xs[0])
    units = [(flat[i], norms[i]) for i in valid]  # each model's unit vector, x / |x|, formed slice by slice
    weights = [alphas[i] / math.fsum(alphas[j] for j in valid) for i in valid]
    blocks = list(_slices(flat[0].numel()))
    u = torch.empty_like(flat[0])
    for s in blocks:
        acc = None
        for a, (f, n) in zip(weights, units):
            term = a * (f[s] / n)
            acc = term if acc is None else acc + term
        u[s] = acc
    norm_u = torch.linalg.vector_norm(u).item()
    if norm_u < tol:
        for s in blocks:
            u[s] = units[0][0][s] / units[0][1]
    else:
        u.div_(norm_u)
    step = torch.empty_like(u)
    for _ in range(o["max_iter"]):
        step.zero_()
        for a, (f, n) in zip(weights, units):
            dot = _total([u[s] @ (f[s] / n) for s in blocks]).clamp(-1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() >= tol:
                c = a * (theta / torch.sin(theta))
                for s in blocks:
                    step[s] += c * (f[s] / n - dot * u[s])
        norm_step = torch.linalg.vector_norm(step)
        if norm_step.item() < tol:
            break
        cos, sin = torch.cos(norm_step), torch.sin(norm_step)
        for s in blocks:
            u[s] = cos * u[s] + sin * (step[s] / norm_step)
        if (n := torch.linalg.vector_norm(u).item()) > tol:
            u.div_(n)
    return u.mul_(math.fsum(a * n for a, n in zip(alphas, norms))).view(xs[0].shape)


def nuslerp_flat(t: float, x0: torch.Tensor, x1: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    """nuslerp with one angle for the whole tensor (``nuslerp_flatten``), of the models or of their task
    vectors from ``base``: the norms one task vector at a time, the result slice by slice."""
    f0, f1 = _flat(x0), _flat(x1)
    fb = _flat(base) if base is not None else None

    def v(f: torch.Tensor, s: slice) -> torch.Tensor:
        return f[s] - fb[s] if fb is not None else f[s]

    n0, n1 = (torch.linalg.vector_norm(v(f, slice(None))).clamp(min=1e-7) for f in (f0, f1))
    blocks = list(_slices(f0.numel()))
    theta = torch.acos(_total([((v(f0, s) / n0) * (v(f1, s) / n1)).sum() for s in blocks]).clamp(-1, 1))
    sin = torch.sin(theta)
    colinear = bool(sin.abs() < 1e-8)  # mergekit: interpolate linearly
    out = torch.empty_like(f0)
    for s in blocks:
        a, b = v(f0, s), v(f1, s)
        r = (1 - t) * a + t * b if colinear else (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / sin
        out[s] = fb[s] + r if fb is not None else r
    return out.view(x0.shape)


def _nuslerp_pair(t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool) -> torch.Tensor:
    """mergekit's nuslerp of two tensors held whole, one angle per row (``row_wise``: per column)."""
    shape = v0.shape
    if row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    theta = torch.acos((u0 * u1).sum(-1, keepdim=True).clamp(-1, 1))
    res = _nuslerp_rows(t, v0, v1, theta)
    if row_wise:
        res = res.transpose(0, -1)
    return res.reshape(shape)


def _nuslerp_rows(t: float, v0: torch.Tensor, v1: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    sin = torch.sin(theta)
    res = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin
    return torch.where(sin.abs() < 1e-8, (1 - t) * v0 + t * v1, res)  # colinear: mergekit interpolates linearly


def nuslerp_rows(t: float, x0: torch.Tensor, x1: torch.Tensor, base: torch.Tensor | None,
                 row_wise: bool) -> torch.Tensor:
    """nuslerp with one angle per row of the last dimension (``row_wise``: per position of the other
    dimensions, along dim 0), of the models or of their task vectors from ``base``, block of rows by
    block of rows: whole rows give the per-row numbers to the bit; along dim 0 over several blocks the
    sums of the blocks are added in float64."""
    shape, out = x0.shape, torch.empty_like(x0)
    by_row = not row_wise or x0.ndim < 2  # rows of the last dimension, else columns along dim 0
    rows, width = (-1, shape[-1] if x0.ndim else 1) if by_row else (shape[0], -1)
    m0, m1, mb, mo = (x.reshape(rows, width) if x is not None else None for x in (x0, x1, base, out))
    blocks = list(_slices(m0.shape[0], max(1, _SLICE // m0.shape[1])))

    def v(m: torch.Tensor, s: slice) -> torch.Tensor:
        return m[s] - mb[s] if mb is not None else m[s]

    if by_row or len(blocks) == 1:  # each angle's reductions within one block
        for s in blocks:
            r = _nuslerp_pair(t, v(m0, s).view(-1, *shape[1:]), v(m1, s).view(-1, *shape[1:]), row_wise)
            r = r.reshape(-1, m0.shape[1])
            mo[s] = r + mb[s] if mb is not None else r
        return out
    sums = [torch.zeros(m0.shape[1], dtype=torch.float64, device=m0.device) for _ in range(3)]
    for s in blocks:  # the columns' norms
        sums[0] += v(m0, s).square().sum(0, dtype=torch.float64)
        sums[1] += v(m1, s).square().sum(0, dtype=torch.float64)
    n0, n1 = (q.sqrt().to(m0.dtype).clamp(min=1e-7) for q in sums[:2])
    for s in blocks:  # the cosine of their unit vectors
        sums[2] += ((v(m0, s) / n0) * (v(m1, s) / n1)).sum(0, dtype=torch.float64)
    theta = torch.acos(sums[2].to(m0.dtype).clamp(-1, 1))
    for s in blocks:
        r = _nuslerp_rows(t, v(m0, s), v(m1, s), theta)
        mo[s] = r + mb[s] if mb is not None else r
    return out

