"""The gradient engine's kernels: the primitives of a group of tensors of one device and dtype.

Which kernel computes which primitive is chosen per device by measurement
(``benchmarks/bench_grad_stats.py`` prints the table behind every choice here): on CUDA fused
``torch._foreach_*`` launches; on CPU every primitive of a piece of a tensor while it is still
in cache, with BLAS and NumPy kernels where torch's CPU reductions are slower.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ._tensors import pick, use_foreach

# Kernels when foreach=None, chosen by benchmarks/bench_grad_stats.py (its kernel table; torch
# 2.13). On CUDA _foreach_norm fuses ord 2, inf and 0 into a few launches for all tensors; torch
# has no fused signed sum (Σrelu(x) − Σ|x| would copy every gradient), so that one is a loop.
# On CPU foreach ops are themselves a C++ loop over per-tensor kernels, so the win is locality:
# every primitive of a piece of memory while it is still in cache (2.7x one flat norm where the
# best kernel for each primitive, one pass each, takes 4.5-4.9x, and torch's kernels in cache
# 3.8-4.4x): the sum of squares as a BLAS dot, max |x| and non-zeros by NumPy (torch's CPU aminmax,
# count_nonzero and ne are 1.5-3x slower). Norms alone: a BLAS dot per large tensor and one
# _foreach_norm for the small ones, 1.01-1.05x one flat norm where _foreach_norm over all takes 1.17x.
_FUSED_ON = {"cuda": {"sumsq", "max_abs", "nonzero"}, "xpu": {"sumsq", "max_abs", "nonzero"}}


def block(xs: list[Tensor], needed: tuple[str, ...], device: torch.device, foreach: bool | None) -> Tensor:
    """The ``needed`` primitives of ``xs`` (one device and dtype, none empty), as a (primitives, tensors) float64 block."""
    dtype = xs[0].dtype
    acc = torch.promote_types(dtype, torch.float32)
    if device.type == "cpu" and not foreach and not dtype.is_complex:
        if needed == ("sumsq",):
            big, small = _split_small(xs)
            dots = [sumsq(xs[i].reshape(-1)) for i in big]
            return _pooled(dots, big, small, _small_sumsq(pick(xs, small)), len(xs)).reshape(1, -1)
        return _in_cache(xs, needed, acc)
    fused = use_foreach(xs, device, foreach)
    chosen = _FUSED_ON.get(device.type, {"sumsq"}) if foreach is None else set(needed)
    return torch.stack([_kernel(p, xs, acc, fused and p in chosen).double() for p in needed])


def _kernel(primitive: str, xs: list[Tensor], acc: torch.dtype, fused: bool) -> Tensor:
    """One primitive of each tensor in ``xs`` (one device and dtype, none empty), as a 1-D tensor."""
    if xs[0].is_complex():
        acc = xs[0].real.dtype if acc.is_complex else acc
        if primitive == "sumsq":  # Σ|z|² is the sum of squares of the real view
            xs = [torch.view_as_real(x) for x in xs]
        elif primitive == "max_abs":  # aminmax has no complex form; the inf-norm is max |z|
            return torch.stack([torch.linalg.vector_norm(x, math.inf) for x in xs]).to(acc)
        else:  # the fused kernel wants a complex dtype to count complex non-zeros
            fused = False
    if primitive == "sumsq":
        norms = torch._foreach_norm(xs, 2, dtype=acc) if fused else [torch.linalg.vector_norm(x, dtype=acc) for x in xs]
        return torch.stack(norms).double().square()
    if primitive == "sum":
        return torch.stack([x.sum(dtype=acc) for x in xs])
    if primitive == "nonzero":
        return torch.stack(torch._foreach_norm(xs, 0, dtype=acc) if fused else [torch.count_nonzero(x) for x in xs])
    if fused:
        return torch.stack(torch._foreach_norm(xs, math.inf, dtype=acc))
    lo, hi = zip(*(torch.aminmax(x) for x in xs))
    return torch.maximum(torch.stack(hi), torch.stack(lo).neg())


def _numpy():
    try:
        import numpy
    except ImportError:  # optional: torch's own kernels count too, only slower
        return None
    return numpy


# Tensors up to this many elements are measured together (one copy, one segmented reduction per
# primitive): below it a Python call per tensor costs more than reading its bytes.
_SMALL = 1 << 14
# Larger tensors are measured in pieces of this size, every primitive of a piece while it is in
# L2. Measured on a 2 MB L2 (a 131 MB tensor, ÷ its norm): 64 KB 4.2x (call overhead), 256-512 KB
# 2.6x, 2 MB 3.3x, whole 5.6x; 512 KB leaves room for the `a != 0` mask and a neighbour.
_CHUNK_BYTES = 1 << 19


def _in_cache(xs: list[Tensor], needed: tuple[str, ...], acc: torch.dtype) -> Tensor:
    """Every primitive of one piece of memory before the next (CPU, real dtypes), as a (primitives, tensors) block.

    Tensors are walked in pieces of at most ``_CHUNK_BYTES`` (a tensor of a few MB or GB is
    many pieces), and only the first kernel on a piece reads memory; the others find it in
    cache. That first one is the sum of squares as a BLAS dot (faster than a norm, and more
    accurate than squaring one), or for 16-bit floats the piece's exact float32 copy into a
    buffer that stays in cache; max |x| and non-zeros come from NumPy (its max, min and
    ``count_nonzero(a != 0)`` run 2-5x faster than torch's CPU ``aminmax`` and ``count_nonzero``).
    Small tensors are measured together. Kernel choices: benchmarks/bench_grad_stats.py's table.
    """
    np = _numpy()
    if np is None:
        return _in_cache_torch(xs, needed, acc)
    if any(map(Tensor.is_neg, xs)):  # NumPy reads memory: a negative view's values made real first
        xs = [x.resolve_neg() for x in xs]
    out = np.empty((len(needed), len(xs)))
    small = [i for i, x in enumerate(xs) if x.numel() <= _SMALL]
    big: Sequence[int] = range(len(xs))
    if len(small) > 1:
        out[:, small] = _segmented(pick(xs, small), needed, np)
        big = [i for i, x in enumerate(xs) if x.numel() > _SMALL]
    if not big:
        return torch.from_numpy(out)
    wide = xs[0].dtype in (torch.float32, torch.float64)  # else widened piece by piece (NumPy has no bfloat16)
    step = max(_SMALL, _CHUNK_BYTES // (xs[0].element_size() if wide else 4))
    widened = None if wide else torch.empty(step, dtype=torch.float32)
    pieces, firsts = [], []  # firsts: where each tensor's pieces start
    for i in big:
        v = xs[i].reshape(-1)
        firsts.append(len(pieces))
        pieces += [v] if v.numel() <= step else v.split(step)
    row = {p: k for k, p in enumerate(needed)}
    with_sumsq, with_sum, with_nonzero, with_max = "sumsq" in row, "sum" in row, "nonzero" in row, "max_abs" in row
    sumsq, sums = [], []
    nonzero = np.zeros(len(pieces))
    max_abs = np.zeros(len(pieces), dtype=np.float64 if xs[0].dtype == torch.float64 else np.float32)
    zero = max_abs.dtype.type(0)
    # One buffer for every `a != 0`: a fresh array per piece can cost a page fault per 4 kB.
    mask = np.empty(max(v.numel() for v in pieces) if with_nonzero else 0, dtype=bool)
    for j, v in enumerate(pieces):
        # First the kernel that reads memory, then those that find v in cache.
        if widened is not None:
            v = widened[:v.numel()].copy_(v)
        if with_sumsq:
            sumsq.append(torch.dot(v, v))
        if with_sum:
            sums.append(v.sum(dtype=acc))
        a = v.numpy()
        if with_nonzero:
            nonzero[j] = np.count_nonzero(np.not_equal(a, zero, out=mask[:a.size]))
        if with_max:
            max_abs[j] = np.maximum(a.max(), -a.min())  # np.maximum propagates NaN, Python's max() may not
    columns = {"nonzero": nonzero, "max_abs": max_abs}
    if with_sumsq:
        columns["sumsq"] = torch.stack(sumsq).double().numpy()
    if with_sum:
        columns["sum"] = torch.stack(sums).double().numpy()
    for p, k in row.items():
        if len(pieces) > len(big):  # pieces of one tensor pool like tensors of one module
            out[k, big] = (np.maximum if p == "max_abs" else np.add).reduceat(columns[p], firsts)
        else:
            out[k, big] = columns[p]
    return torch.from_numpy(out)


def _in_cache_torch(xs: list[Tensor], needed: tuple[str, ...], acc: torch.dtype) -> Tensor:
    """:func:`_in_cache` without NumPy: torch kernels only, a tensor at a time."""
    rows: dict[str, list[Tensor]] = {p: [] for p in needed}
    for x in xs:
        for p in needed:
            if p == "sumsq":
                rows[p].append(torch.linalg.vector_norm(x, dtype=acc).double().square())
            elif p == "sum":
                rows[p].append(x.sum(dtype=acc))
            elif p == "nonzero":
                rows[p].append(torch.count_nonzero(x))
            else:
                lo, hi = torch.aminmax(x)
                rows[p].append(torch.maximum(hi, lo.neg()))
    return torch.stack([torch.stack(rows[p]).double() for p in needed])


def _segmented(xs: list[Tensor], needed: tuple[str, ...], np) -> Tensor:
    """The primitives of small non-empty tensors: one float64 copy of them all, one reduceat per primitive."""
    flat = torch.cat([x.reshape(-1) for x in xs]).double().numpy()
    starts = np.cumsum([0] + [x.numel() for x in xs[:-1]])
    rows = []
    for p in needed:
        if p == "sumsq":
            rows.append(np.add.reduceat(flat * flat, starts))
        elif p == "sum":
            rows.append(np.add.reduceat(flat, starts))
        elif p == "nonzero":
            rows.append(np.add.reduceat(flat != 0, starts, dtype=np.float64))
        else:
            rows.append(np.maximum.reduceat(np.abs(flat), starts))  # np.maximum propagates NaN
    return torch.from_numpy(np.stack(rows))


def sumsq(v: Tensor) -> Tensor:
    """Σx² of a flat CPU tensor: a BLAS dot where there is one (float32/64), else a float32 norm squared."""
    if v.dtype in (torch.float32, torch.float64):
        return torch.dot(v, v)
    return torch.linalg.vector_norm(v, dtype=torch.float32).double().square()


def _flat_pieces(*ts: Tensor) -> list[tuple[Tensor, ...]]:
    """Matching pieces of at most ``_CHUNK_BYTES`` of same-shaped tensors, as flat views (reshaped copies
    for a tensor that is not contiguous: then nothing written to a piece reaches it)."""
    step = max(_SMALL, _CHUNK_BYTES // ts[0].element_size())
    flat = [t.view(-1) if t.is_contiguous() else t.reshape(-1) for t in ts]
    return list(zip(*(f.split(step) for f in flat))) if flat[0].numel() > step else [tuple(flat)]


def _pooled(parts: list[Tensor], owner: list[int], small: list[int], small_sumsq: Tensor | None,
            count: int) -> Tensor:
    """Per-tensor totals (float64) from the pieces' values (``owner``) and the small tensors' (``small``)."""
    values = torch.cat([v for v in (torch.stack(parts).double() if parts else None, small_sumsq) if v is not None])
    where = owner + small
    if where == list(range(count)):
        return values
    return values.new_zeros(count).index_add_(0, torch.tensor(where, device=values.device), values)


def _split_small(tensors: Sequence[Tensor]) -> tuple[list[int], list[int]]:
    """Indices of the tensors worth a Python call each, and of the small ones left to one foreach call."""
    big, small = [], []
    for i, t in enumerate(tensors):
        (small if 0 < t.numel() <= _SMALL else big).append(i)
    return big, small


def _small_sumsq(xs: list[Tensor]) -> Tensor | None:
    if not xs:
        return None
    norms = torch._foreach_norm(xs, 2, dtype=torch.promote_types(xs[0].dtype, torch.float32))
    return torch.stack(norms).double().square()


def copy_sumsq(dst: Sequence[Tensor], src: Sequence[Tensor]) -> Tensor:
    """Copy each ``src`` into ``dst`` and return Σx² of each (float64), every piece measured right after
    its copy, while it is in cache: a snapshot of the weights gives their norms for almost nothing.
    Small tensors take one fused copy and one fused norm."""
    big, small = _split_small(src)
    if small:
        torch._foreach_copy_([dst[i] for i in small], [src[i] for i in small])
    parts, owner = [], []
    for i in big:
        x, y = dst[i], src[i]
        if not x.is_contiguous():
            x.copy_(y)
            parts.append(sumsq(x.reshape(-1)))
            owner.append(i)
            continue
        for a, b in _flat_pieces(x, y):
            parts.append(sumsq(a.copy_(b)))
            owner.append(i)
    return _pooled(parts, owner, small, _small_sumsq([dst[i] for i in small]), len(src))


def distance_sumsq(before: Sequence[Tensor], after: Sequence[Tensor]) -> Tensor:
    """Σ(after - before)² of each pair (float64): each piece's difference goes to one scratch buffer that
    stays in cache and is measured there, so nothing is written back to memory. Small tensors take
    one fused subtraction and one fused norm."""
    big, small = _split_small(after)
    parts, owner = [], []
    scratch = None
    for i in big:
        for a, b in _flat_pieces(before[i], after[i]):
            if scratch is None or scratch.numel() < a.numel() or scratch.dtype != a.dtype:
                scratch = a.new_empty(max(_SMALL, _CHUNK_BYTES // a.element_size(), a.numel()))
            parts.append(sumsq(torch.sub(a, b, out=scratch[:a.numel()])))
            owner.append(i)
    diffs = torch._foreach_sub([before[i] for i in small], [after[i] for i in small]) if small else []
    return _pooled(parts, owner, small, _small_sumsq(diffs), len(after))
