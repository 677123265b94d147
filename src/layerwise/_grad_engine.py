"""The gradient engine: per-tensor primitives computed on the device, pooled exactly.

Every statistic layerwise reports is derived from four per-tensor *primitives* (sum of
squares, sum, count of non-zeros, largest magnitude) plus the element count. They pool
exactly over tensors, shards and modules (sums add, maxima take the maximum), so per-module
statistics and those of sharded (FSDP2 / HSDP DTensor) parameters are those of the full
tensors. ``grads.py`` (one-shot statistics and checks) and ``monitor.py`` (the training monitor) are
built on this module, the kernels per device on ``_grad_kernels.py`` and ``_grad_compiled.py``
(``_native.py``'s C loops on CPU, by default where installed); nothing here touches the host unless asked
(:func:`to_host`).

Gradients of every layout are read as what they store: a sparse gradient
(``Embedding(sparse=True)``) by its coalesced values, its implicit zeros counted by the
caller from the parameter's size; a complex gradient by magnitudes (norm, max |x|, zeros),
its signed sum refused by name.
"""

from __future__ import annotations

import functools
import math
import operator
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import _grad_compiled, _native
from . import _grad_kernels as kernels
from ._tensors import pick
from .errors import GradError
from .select import Selector, closest, select

#: The statistics :func:`grad_stats` and :class:`GradMonitor` know, in their default order.
STATS = ("norm", "mean", "std", "max_abs", "zero_frac")

# Summed primitives first, max_abs last: one block of rows adds across shards, the other maxes.
PRIMITIVES = ("sumsq", "sum", "nonzero", "max_abs")
_NEEDS = {"norm": {"sumsq"}, "mean": {"sum"}, "std": {"sum", "sumsq"}, "max_abs": {"max_abs"}, "zero_frac": {"nonzero"}}

def stat_names(stats: str | Iterable[str]) -> tuple[str, ...]:
    """``stats`` validated and deduplicated, in the caller's order."""
    names = tuple(dict.fromkeys((stats,) if isinstance(stats, str) or not isinstance(stats, Iterable) else stats))
    for name in names:
        if name not in STATS:
            near = closest(str(name), STATS, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise GradError(f"unknown statistic {name!r}{hint}. Valid: {', '.join(STATS)}.")
    if not names:
        raise GradError(f"no statistic asked for. Valid: {', '.join(STATS)}.")
    return names


def needed(stats: Iterable[str], *extra: str) -> tuple[str, ...]:
    """The primitives behind ``stats``, in canonical order; ``sumsq`` always (it decides "dead")."""
    wanted = {"sumsq", *extra}.union(*(_NEEDS[s] for s in stats))
    return tuple(p for p in PRIMITIVES if p in wanted)


class Choice(NamedTuple):
    """The parameters :func:`chosen` picked, and ``memo``: what callers derive from this choice
    alone (sizes, row layouts), kept exactly as long as the choice is. Treat all three as read-only."""

    names: list[str]
    params: list[nn.Parameter]
    memo: dict


@dataclass
class _Remembered:
    """A resolved choice, holding no parameter alive: a replaced one is freed as usual."""

    ids: list[int]
    state: list[tuple[bool, int]]  # requires_grad and size: a `p.data = ...` may resize in place
    alive: list[weakref.ref]  # every parameter seen: alive and with the same ids, they are the same objects
    names: list[str]
    picked: list[weakref.ref]
    memo: dict


_is_none = functools.partial(operator.is_, None)
_is_not_none = functools.partial(operator.is_not, None)
_requires_grad = operator.attrgetter("requires_grad")
_deref = weakref.ref.__call__
_grad = operator.attrgetter("grad")
_layout = operator.attrgetter("layout")
_placement = operator.attrgetter("device", "dtype")

# model -> selector list -> what it resolved to
_CHOSEN: weakref.WeakKeyDictionary[nn.Module, dict[tuple, _Remembered]] = weakref.WeakKeyDictionary()


def chosen(model: nn.Module, selectors: Sequence[Selector]) -> Choice:
    """The parameters to look at: those selected, or with no selector every trainable one.

    Resolved once per model and selector list and reused while the model holds the same
    parameters with the same ``requires_grad`` and sizes (checking that is a fraction of resolving);
    a callable selector may look at anything, so it is resolved on every call.
    """
    # Every parameter slot of every module, in an order fixed per model: 3x faster than modules().
    # C-level map/filter throughout: right after a backward this Python runs from cold caches.
    params, stack = [], [model]
    while stack:
        m = stack.pop()
        if m is not None:
            params += filter(_is_not_none, m._parameters.values())
            stack += m._modules.values()
    ids = list(map(id, params))
    state = list(zip(map(_requires_grad, params), map(Tensor.numel, params)))
    key = tuple(selectors) if all(isinstance(s, (str, type)) for s in selectors) else None
    cache = _CHOSEN.setdefault(model, {}) if key is not None else {}
    hit = cache.get(key)
    if (hit is not None and hit.ids == ids and hit.state == state
            and not any(map(_is_none, map(_deref, hit.alive)))):
        return Choice(hit.names, list(map(_deref, hit.picked)), hit.memo)
    pairs = [(n, p) for n, p in select(model, *selectors) if selectors or p.requires_grad]
    choice = Choice([n for n, _ in pairs], [p for _, p in pairs], {})
    if key is not None:
        cache[key] = _Remembered(ids, state, list(map(weakref.ref, params)), choice.names,
                                 list(map(weakref.ref, choice.params)), choice.memo)
    return choice


def refuse_complex(names: Sequence[str], tensors: Sequence[Tensor | None], what: str) -> None:
    """Raise naming the first complex tensor: ``what`` (e.g. a signed mean) is not defined for it."""
    for name, t in zip(names, tensors):
        if t is not None and t.is_complex():
            raise GradError(f"{name!r} has a complex gradient ({t.dtype}): {what} is not defined for it. Ask for "
                            "stats=['norm', 'max_abs', 'zero_frac'] (magnitudes), or leave it out with a selector.")


# --------------------------------------------------------------------------- local tensors


def gradients(params: Sequence[Tensor]) -> tuple[list[Tensor], Sequence[int]]:
    """The gradients that exist, and the indices of their parameters."""
    grads = list(map(_grad, params))
    if not any(map(_is_none, grads)):
        return grads, range(len(grads))
    have = [i for i, g in enumerate(grads) if g is not None]
    return pick(grads, have), have


def local_tensors(tensors: Sequence[Tensor], names: Sequence[str]) -> tuple[list[Tensor], list[tuple | None]]:
    """What each tensor stores on this rank, and the (mesh, sharded mesh dims) to reduce it over.

    A DTensor gives its local shard; a sparse tensor its (coalesced) stored values, dense.
    """
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed:  # the common case, at C speed
        plain = list(tensors)
        if any(map(_requires_grad, plain)):  # a create_graph=True gradient has a graph
            plain = [t.detach() if t.requires_grad else t for t in plain]
        if set(map(_layout, plain)) <= {torch.strided}:
            return plain, [None] * len(plain)
    local: list[Tensor] = []
    shards: list[tuple | None] = []
    if distributed:
        from torch.distributed.tensor import DTensor
    for t, name in zip(tensors, names):
        t, shard = (t.detach() if t.requires_grad else t), None
        if distributed and isinstance(t, DTensor):
            if any(p.is_partial() for p in t.placements):
                raise GradError(f"{name!r} is a DTensor with placements {t.placements}: a Partial one is not reduced "
                                "yet. Compute statistics once the gradients are reduced (after backward).")
            dims = tuple(d for d, p in enumerate(t.placements) if p.is_shard())
            t, shard = t.to_local(), ((t.device_mesh, dims) if dims else None)
        if t.layout == torch.sparse_coo:
            t = t.coalesce().values()  # duplicate indices hold parts of one value: coalescing adds them
        elif t.layout != torch.strided:
            t = t.values()  # compressed layouts store each element once
        local.append(t)
        shards.append(shard)
    return local, shards


# --------------------------------------------------------------------------- primitives


@dataclass
class Prims:
    """Primitives of some tensors: per (device, dtype, shard) group, the tensors' indices and a
    (primitives × tensors) float64 block on the group's device."""

    needed: tuple[str, ...]
    count: int
    groups: dict[tuple, tuple[list[int], Tensor]] = field(default_factory=dict)

    def tensors(self) -> list[Tensor]:
        return [block for _, block in self.groups.values()]

    def load(self, blocks: Sequence[Tensor]) -> None:
        """Replace the blocks by ``blocks`` (as :meth:`tensors` ordered them), e.g. once on the host."""
        self.groups = {key: (cols, block) for (key, (cols, _)), block in zip(self.groups.items(), blocks)}

    def block(self) -> Tensor:
        """The (needed, count) float64 block of every tensor, in the tensors' order (call once on the host)."""
        blocks = list(self.groups.values())
        if len(blocks) == 1 and len(blocks[0][0]) == self.count:  # one group holds every tensor, in order
            return blocks[0][1]
        out = torch.full((len(self.needed), self.count), math.nan, dtype=torch.float64)
        for cols, block in blocks:
            out[:, cols] = block
        return out

    def values(self) -> dict[str, Tensor]:
        """Primitive name -> (count,) tensor, in the tensors' order (call once the blocks are on the host)."""
        return dict(zip(self.needed, self.block()))


def local_primitives(local: Sequence[Tensor], shards: Sequence[tuple | None], needed: tuple[str, ...],
                     foreach: bool | None, compile: bool | None) -> Prims:
    """The ``needed`` primitives of each tensor's local part, on its device; sharded ones still unreduced.

    Empty tensors (a rank's empty shard) count as one zero, which leaves every sum and maximum
    unchanged; element counts come from the caller. ``compile`` (see ``grad_stats``): one pass per
    tensor where ``_grad_compiled.block`` has a kernel for it."""
    prims = Prims(needed, len(local))
    for key, idx in _groups(local, shards).items():
        device, dtype, _ = key
        xs = pick(local, idx)
        if not all(map(Tensor.numel, xs)):
            xs = [x if x.numel() else x.new_zeros(1) for x in xs]
        prims.groups[key] = (idx, kernels.block(xs, needed, device, foreach) if compile is False
                             else _grad_compiled.block(xs, needed, device, foreach, compile))
    return prims


def _groups(tensors: Sequence[Tensor], shards: Sequence[tuple | None]) -> dict[tuple, list[int]]:
    if not any(shards) and len(placements := set(map(_placement, tensors))) == 1:  # the common case, at C speed
        return {(*placements.pop(), None): list(range(len(tensors)))}
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, (x, shard) in enumerate(zip(tensors, shards)):
        groups[(x.device, x.dtype, shard)].append(i)
    return groups


def copy_primitives(dst: Sequence[Tensor], src: Sequence[Tensor], shards: Sequence[tuple | None],
                    foreach: bool | None, compile: bool | None) -> Prims:
    """Copy ``src`` into ``dst`` and return ``sumsq`` of each (local parts; reduce with :func:`reduce_shards`).

    A fused copy, then a fused norm of the copy, on every device: on CPU that beat measuring each
    piece of the copy in cache (bench_grad_stats' every=1 breakdown, same caches: 2.9-3.3% of a
    step vs 3.5-3.6%, load 4-6); ``foreach=False`` still walks the pieces. Where ``_native.wanted(compile)``,
    on CPU the native kernel copies and measures in one pass."""
    return _written_sumsq(dst, src, shards, foreach is not False, kernels.copy_sumsq, torch._foreach_copy_,
                          _native.copy_sumsq if _native.wanted(compile) else None)


def distance_primitives(before: Sequence[Tensor], after: Sequence[Tensor], shards: Sequence[tuple | None],
                        foreach: bool | None, compile: bool | None) -> Prims:
    """``sumsq`` of ``after - before`` per tensor (local parts; reduce with :func:`reduce_shards`).

    ``before`` may be overwritten. On CPU each piece's difference goes to one small scratch buffer
    that stays in cache and is measured there (nothing is written back to memory); elsewhere one
    fused subtraction and one fused norm beat a launch per tensor. Where ``_native.wanted(compile)``,
    on CPU the native kernel reads each pair once and writes nothing.
    """
    return _written_sumsq(before, after, shards, foreach, kernels.distance_sumsq, torch._foreach_sub_,
                          _native.distance_sumsq if _native.wanted(compile) else None)


def _written_sumsq(out: Sequence[Tensor], src: Sequence[Tensor], shards: Sequence[tuple | None],
                   foreach: bool | None, on_cpu: Callable, fused: Callable, native: Callable | None) -> Prims:
    """``sumsq`` of what ``fused(out, src)`` writes into ``out``, per tensor: ``native(out, src)`` in one
    pass where given, for the pairs that :func:`_native.fits`; ``on_cpu(out, src)`` piece by piece in
    cache on CPU; elsewhere ``fused``, then one fused norm."""

    def eager(o: list[Tensor], s: list[Tensor]) -> Tensor:
        if key[0].type == "cpu" and not foreach or foreach is False:
            return on_cpu(o, s).reshape(-1)
        fused(o, s)
        xs, wide = [x if x.numel() else x.new_zeros(1) for x in o], torch.promote_types(o[0].dtype, torch.float32)
        norms = torch._foreach_norm(xs, 2) if wide.is_complex else torch._foreach_norm(xs, 2, dtype=wide)  # not bf16
        return torch.stack(norms).double().square()

    prims = Prims(("sumsq",), len(src))
    for key, idx in _groups(src, shards).items():
        o, s = pick(out, idx), pick(src, idx)
        fast = [j for j, (a, b) in enumerate(zip(o, s)) if _native.fits(a, b, _native.DTYPES)] if native else []
        rest = sorted(set(range(len(idx))).difference(fast))
        if not fast or not rest:
            block = native(o, s) if fast else eager(o, s)
        else:  # some tensors native, the others eager
            block = torch.empty(1, len(idx), dtype=torch.float64)
            block[:, fast], block[:, rest] = native(pick(o, fast), pick(s, fast)), eager(pick(o, rest), pick(s, rest))
        prims.groups[key] = (idx, block.reshape(1, -1))
    return prims


def reduce_shards(*all_prims: Prims) -> None:
    """Make the primitives of sharded tensors those of the full tensors, in place: ONE collective per
    mesh dimension for everything passed (an ``all_gather`` of the small blocks, then a sum or a
    maximum in rank order, so that every rank holds bit-identical results)."""
    by_mesh: dict[tuple, list[tuple[Prims, tuple]]] = defaultdict(list)
    for prims in all_prims:
        for key in prims.groups:
            if key[2] is not None:
                by_mesh[key[2]].append((prims, key))
    for (mesh, dims), members in by_mesh.items():
        blocks = [prims.groups[key][1] for prims, key in members]
        n_sum = [len(prims.needed) - ("max_abs" in prims.needed) for prims, _ in members]
        sums = [b[:n].reshape(-1) for b, n in zip(blocks, n_sum)]
        maxes = [b[n:].reshape(-1) for b, n in zip(blocks, n_sum)]
        flat = torch.cat(sums + maxes)
        split = sum(s.numel() for s in sums)
        for d in dims:
            group = mesh.get_group(d)
            parts = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, flat, group=group)
            gathered = torch.stack(parts)
            flat = torch.cat([gathered[:, :split].sum(0), gathered[:, split:].amax(0)])
        sum_parts = flat[:split].split([s.numel() for s in sums])
        max_parts = flat[split:].split([m.numel() for m in maxes])
        for (prims, key), b, s, m in zip(members, blocks, sum_parts, max_parts):
            cols = prims.groups[key][0]
            prims.groups[key] = (cols, torch.cat([s, m]).view(b.shape))


def to_host(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Copy small tensors to the host as float64, with one transfer per device."""
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        by_device[t.device].append(i)
    out: list[Tensor] = [torch.empty(0)] * len(tensors)
    for device, idx in by_device.items():
        if device.type == "cpu":  # already there; copied all the same, as a transfer would (a live GradScaler scale)
            for i in idx:
                out[i] = tensors[i].to(torch.float64, copy=True)
            continue
        flat = torch.cat([tensors[i].reshape(-1).double() for i in idx]).cpu()
        for i, part in zip(idx, flat.split([tensors[i].numel() for i in idx])):
            out[i] = part.view(tensors[i].shape)
    return out


def histogram(x: Tensor, bins: int, zeros: int = 0) -> Tensor:
    """(min, max, counts of ``bins`` equal buckets) of ``x`` and ``zeros`` more zeros (a sparse
    gradient's implicit ones), on its device and without a sync."""
    if x.numel() + zeros == 0:
        return x.new_zeros(bins + 2, dtype=torch.float32)
    x = x.detach().flatten().float()
    lo, hi = torch.aminmax(x) if x.numel() else (x.new_zeros(()), x.new_zeros(()))
    if zeros:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    width = ((hi - lo) / bins).clamp_min(torch.finfo(torch.float32).tiny)
    # histc with a fixed range needs no host round trip; the data-dependent range is applied on the device.
    counts = torch.histc(((x - lo) / width).clamp_(0, bins), bins, 0, bins)
    if zeros:
        counts.index_add_(0, (-lo / width).clamp(0, bins - 1).long().reshape(1), counts.new_full((1,), zeros))
    return torch.cat([lo.reshape(1), hi.reshape(1), counts])


# --------------------------------------------------------------------------- statistics from primitives


def unscale(values: dict[str, Tensor], scale: Tensor | None) -> None:
    """Divide primitives measured on gradients still multiplied by a GradScaler's ``scale``."""
    if scale is not None:
        for name, power in (("sum", 1), ("sumsq", 2), ("max_abs", 1)):
            if name in values:
                values[name] = values[name] / scale ** power


def derive(values: dict[str, list[float]], numel: Sequence[float], stats: Sequence[str]) -> dict[str, list[float]]:
    """Statistics from primitives on the host, in Python floats: torch's IEEE double operations in the same
    order with nothing to dispatch (each torch call from cold caches: ~0.1 ms); ``std`` as ``torch.std``."""
    out = {}
    for stat in stats:  # only an empty tensor counts 0 elements: 0 / 0 is NaN, as torch gives it
        if stat == "norm":
            out[stat] = list(map(math.sqrt, values["sumsq"]))
        elif stat == "mean":
            out[stat] = [s / n if n else math.nan for s, n in zip(values["sum"], numel)]
        elif stat == "std":
            out[stat] = [math.sqrt(max(sq - s * s / n, 0.0) / (n - 1)) if n > 1 else math.nan
                         for sq, s, n in zip(values["sumsq"], values["sum"], numel)]
        elif stat == "max_abs":
            out[stat] = list(values["max_abs"])
        else:
            out[stat] = [1 - k / n if n else math.nan for k, n in zip(values["nonzero"], numel)]
    return out


def pool(values: dict[str, Tensor], numel: Tensor, group: Tensor, count: int) -> tuple[dict[str, Tensor], Tensor]:
    """Primitives and element counts of ``count`` groups, from those of tensors in group ``group[i]``."""
    pooled = {}
    for name, v in values.items():
        if name == "max_abs":
            pooled[name] = torch.zeros(count, dtype=v.dtype).scatter_reduce(0, group, v, "amax", include_self=False)
        else:
            pooled[name] = torch.zeros(count, dtype=v.dtype).index_add(0, group, v)
    return pooled, torch.zeros(count, dtype=numel.dtype).index_add(0, group, numel)
