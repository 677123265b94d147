"""The per-tensor math of every merge method, and :func:`merge_tensor`, the one entry point to it.

Each method function takes the models' tensors and the base's (already in the compute dtype),
the options resolved for this tensor (globals as values, per-model options as tuples) and the
tensor's key (which seeds the random methods), and returns a new tensor. The definitions follow
mergekit 0.1.5 (``merge_methods/``, ``sparsify.py``) so that a recipe gives the same numbers;
where layerwise 0.1 differed, ``convention="layerwise"`` keeps the old numbers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from ._merge_methods import Method, get_method
from ._merge_sliced import _slices, _total, karcher, model_stock, multislerp, nuslerp_flat, nuslerp_rows, sce
from ._sparsify import SPARSIFY
from .errors import MergeError, OptionError

Options = Mapping[str, Any]
_COLINEAR = 0.9995  # |cos| above this: SLERP interpolates linearly (mergekit's DOT_THRESHOLD)


# --------------------------------------------------------------------------- the methods


def linear(xs: Sequence[torch.Tensor], base: torch.Tensor | None, o: Options, key: str,
           out: torch.Tensor | None = None) -> torch.Tensor:
    w = o["weight"]
    if o["normalize"]:  # divide the weights, not the sum: huge weights cannot overflow it
        total = math.fsum(w)
        w = [wi / total for wi in w]
    out = torch.mul(xs[0], w[0], out=out)
    for wi, x in zip(w[1:], xs[1:]):
        # alpha= must fit the dtype; a weight beyond it multiplies first (to inf, refused by merge_tensor)
        if abs(wi) <= torch.finfo(out.dtype).max:
            out.add_(x, alpha=wi)
        else:
            out.add_(x * wi)
    return out


def _gta(xs: list[torch.Tensor], base: torch.Tensor, o: Options, key: str, sparsify: str | None,
         consensus: bool, owned: Sequence[bool] = ()) -> torch.Tensor:
    """mergekit's generalized task arithmetic: sparsify each task vector, weight, elect signs, sum, normalize.

    Each task vector takes its input's memory where that is the merge's own copy (``owned``), and the
    sign election runs slice by slice into the first one: the merge holds the n task vectors and
    slices, never a stack of them.
    """
    w, n = o["weight"], len(xs)
    if o["normalize"] and (top := max(abs(wi) for wi in w)) > 1e6:  # huge weights would overflow: scale them
        w = [wi / top for wi in w]  # (only then: other weights elect signs exactly as mergekit's, ties included)
    deltas, mixed = [], None  # the weighted task vectors (kept for sign election), else their running sum
    for i in range(n):
        delta = (xs[i].sub_(base) if i < len(owned) and owned[i] else xs[i] - base).contiguous()
        xs[i] = None  # this list is merge_tensor's own: a streamed input is freed here, one at a time
        if sparsify:
            delta = SPARSIFY[sparsify](delta, o, i, key)
        delta.mul_(w[i])  # no alpha= anywhere: a weight must not have to fit the dtype
        if consensus:
            deltas.append(delta)
        else:
            mixed = delta if mixed is None else mixed.add_(delta)
        del delta
    if consensus:  # keep the entries whose sign is the sum's (mergekit: a zero sum elects +; layerwise: none)
        layerwise = o.get("convention") == "layerwise"
        flat = [d.view(-1) for d in deltas]
        for s in _slices(flat[0].numel()):
            parts = [f[s] for f in flat]
            total = parts[0].clone()
            for p in parts[1:]:
                total += p
            # The elected sign: mergekit's +1 where the sum is >= 0, else -1; layerwise's is 0 on a zero sum.
            elected = total.sign_() if layerwise else torch.where(total >= 0, 1.0, -1.0)
            merged, divisor = torch.zeros_like(total), torch.zeros_like(total)
            for wi, p in zip(w, parts):
                agree = (p * elected) > 0  # sign(p) == elected, p != 0 (nan: never)
                merged += p * agree  # a product, as mergekit's: a nan stays
                divisor += agree * wi
            if o["normalize"]:
                merged /= divisor.masked_fill_(divisor == 0, 1.0)
            parts[0].copy_(merged)
        mixed = deltas[0]
        del flat, deltas
    elif o["normalize"]:
        divisor = math.fsum(w)
        mixed.div_(1.0 if abs(divisor) < 1e-8 else divisor)
    if o["lambda"] != 1:
        mixed.mul_(o["lambda"])
    return mixed.add_(base)


def slerp(xs: Sequence[torch.Tensor], base: torch.Tensor | None, o: Options, key: str) -> torch.Tensor:
    a, b = (base, xs[0]) if len(xs) == 1 else xs
    t = o["t"]
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    fa, fb, out = a.reshape(-1), b.reshape(-1), torch.empty(a.numel(), dtype=a.dtype, device=a.device)
    blocks = list(_slices(out.numel()))  # the result is written slice by slice: no temporary of its size
    s0, s1 = 1 - t, t  # a linear interpolation, unless the angle says otherwise
    if not (o["convention"] == "layerwise" and (na == 0 or nb == 0)):
        # mergekit: a vector of norm <= 1e-8 is left unnormalized, so a zero tensor meets the other at 90°
        da, db = (na if na > 1e-8 else 1.0), (nb if nb > 1e-8 else 1.0)
        dot = _total([(fa[s] / da) @ (fb[s] / db) for s in blocks])
        if dot.abs() <= _COLINEAR:
            theta = torch.arccos(dot.clamp(-1, 1))
            # Scalar coefficients first, as mergekit: t = 0 gives exactly a, t = 1 exactly b.
            s0, s1 = torch.sin(theta - theta * t) / torch.sin(theta), torch.sin(theta * t) / torch.sin(theta)
    for s in blocks:
        out[s] = s0 * fa[s] + s1 * fb[s]
    return out.view(a.shape)


def nuslerp(xs: Sequence[torch.Tensor], base: torch.Tensor | None, o: Options, key: str) -> torch.Tensor:
    w0, w1 = o["weight"]
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    if o["nuslerp_flatten"] or xs[0].ndim == 0:  # one angle for the tensor: slice by slice
        return nuslerp_flat(t, xs[0], xs[1], base)
    return nuslerp_rows(t, xs[0], xs[1], base, o["nuslerp_row_wise"])


def nearswap(xs: Sequence[torch.Tensor], base: torch.Tensor, o: Options, key: str) -> torch.Tensor:
    weight = (o["t"] / (base - xs[0]).abs().clamp(min=1e-6)).clamp(0, 1)
    return weight * xs[0] + (1 - weight) * base


def passthrough(xs: Sequence[torch.Tensor], base: torch.Tensor | None, o: Options, key: str,
                out: torch.Tensor | None = None) -> torch.Tensor:
    scale = o["scale"][0]
    if scale != 1:
        return torch.mul(xs[0], scale, out=out)
    return xs[0].clone() if out is None else out.copy_(xs[0])


_SLICED = {"model_stock": model_stock, "multislerp": multislerp, "sce": sce, "karcher": karcher}  # in _merge_sliced
_WRITE_INTO = {"linear", "passthrough"}  # the functions that take out=: their result is written into it


def _function(method: Method):
    if method.function.startswith("gta:"):
        _, sparsify, consensus = method.function.split(":")
        sparse = None if sparsify == "none" else sparsify
        return lambda xs, base, o, key, owned=(): _gta(xs, base, o, key, sparse, consensus == "sum", owned)
    return _SLICED.get(method.function) or globals()[method.function]


# --------------------------------------------------------------------------- the entry point


def compute_dtype_of(dtypes: Iterable[torch.dtype], compute_dtype: torch.dtype | None = None) -> torch.dtype:
    """float32 unless an input is wider (float64, complex) or ``compute_dtype`` says otherwise."""
    if compute_dtype is not None:
        return compute_dtype
    out = torch.float32
    for d in dtypes:
        if not _is_float8(d):  # torch promotes float8 with nothing; float32 holds every float8 value
            out = torch.promote_types(out, d)
    return out


def _is_float8(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and dtype.itemsize == 1


def promoted_dtype(dtypes: Sequence[torch.dtype], key: str = "") -> torch.dtype:
    """The dtype torch promotes all of ``dtypes`` to (float16 with bfloat16: float32). A float8 dtype
    promotes only with itself: mixed with another dtype, the output dtype must be given."""
    try:
        return functools.reduce(torch.promote_types, dtypes)
    except RuntimeError:  # float8 with another dtype
        names = ", ".join(sorted({str(d).removeprefix("torch.") for d in dtypes}))
        raise OptionError(f"{key + ': ' if key else ''}the inputs are {names}, which torch promotes to no common "
                          "dtype (a float8 type mixes with nothing): pass dtype= (--dtype) for the output") from None


def merge_tensor(method: str | Method, tensors: Iterable[torch.Tensor], base: torch.Tensor | None,
                 options: Options, compute_dtype: torch.dtype | None = None, *, key: str = "",
                 dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Merge one tensor of each model (and the base's) with ``method``: the math behind every merge.

    ``options`` are this tensor's resolved options (``_merge_options.resolve_options``: globals as
    values, per-model options as one value per model). Floating tensors are computed in
    ``compute_dtype`` (default float32, or float64/complex when an input is) and returned in
    ``dtype`` (default: the inputs' promoted dtype). Integer and bool tensors are copied from
    ``base``, else from the first model; empty tensors give an empty result. ``tensors`` may be
    a generator: each input is converted as it is read, so a caller streaming from files holds one
    raw tensor at a time; the given tensors are only read (a converted copy may be reused).
    ``key`` names the tensor in errors and seeds the random methods.
    ``out`` (the inputs' shape, compute dtype) receives the result of linear and passthrough, so
    a caller merging slice after slice reuses one buffer (the other methods return a new tensor).

    Example:
        >>> import torch
        >>> merge_tensor("linear", [torch.tensor([1.0, 3.0]), torch.tensor([3.0, 5.0])], None,
        ...              {"weight": (1.0, 1.0), "normalize": True})
        tensor([2., 4.])
    """
    m = get_method(method) if isinstance(method, str) else method
    if isinstance(tensors, Sequence) and compute_dtype is None:  # all dtypes known up front
        compute_dtype = compute_dtype_of([t.dtype for t in tensors] + ([base.dtype] if base is not None else []))
    dtypes: list[torch.dtype] = []
    xs: list[torch.Tensor] = []
    owned: list[bool] = []  # a converted copy is the merge's own: it may be overwritten
    for x in tensors:
        if not xs:
            if not (x.is_floating_point() or x.is_complex()):
                return (base if base is not None else x).clone()
            if x.is_complex() and not m.complex_ok:
                raise MergeError(f"{key}: {m.name} needs magnitudes, signs or angles, which complex tensors lack; "
                                 "merge complex tensors with linear, task_arithmetic or passthrough, or leave "
                                 "them out with select=")
            cdt = compute_dtype_of([x.dtype] + ([base.dtype] if base is not None else []), compute_dtype)
        dtypes.append(x.dtype)
        xs.append(x.to(cdt))
        owned.append(xs[-1] is not x)  # (a read tensor may be a checkpoint's cached one: never overwritten)
        del x  # a streamed input in another dtype is released as soon as it is converted
    if not xs:
        raise MergeError(f"{key}: no tensors to merge")
    out_dtype = dtype or promoted_dtype(dtypes + ([base.dtype] if base is not None and base.is_floating_point() else []),
                                        key)
    if xs[0].numel() == 0:
        return torch.empty(xs[0].shape, dtype=out_dtype, device=xs[0].device)
    b = base.to(cdt) if base is not None and m.base != "none" else None
    given = list(tensors) if isinstance(tensors, Sequence) else []
    into: dict[str, Any] = {"out": out} if out is not None and m.function in _WRITE_INTO else {}
    if m.function.startswith("gta:"):
        into["owned"] = owned
    out = _function(m)(xs, b, options, key, **into)
    # A sum is finite when every entry is (or overflows: rare); only then the exact, slower checks.
    if not torch.isfinite(out.sum()) and not torch.isfinite(out).all():
        inputs = [t for t in [*xs, *given, b] if t is not None]  # a consumed input counts as finite
        if all(torch.isfinite(t).all() for t in inputs):
            raise MergeError(f"{key}: {m.name} overflows {cdt} (inf or nan) with these weights and options; "
                             "lower the weights or lambda, or pass compute_dtype=torch.float64")
    return out.to(out_dtype)
