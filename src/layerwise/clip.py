"""Gradient clipping per selection, per layer or per param group; exact on DDP, FSDP2 and HSDP.

Plain gradients of one selection or group go through torch's own ``get_total_norm`` and
``clip_grads_with_norm_``, so the result is torch's to the bit. Per-layer units, and any unit
holding DTensor or sparse gradients (FSDP2, HSDP, tensor parallel; ``Embedding(sparse=True)``,
measured by its coalesced values, which torch's functions cannot measure), go through one pooled computation:
one norm kernel per (device, dtype), pooled per unit with an index, and the partial sums of
sharded gradients reduced in one all-reduce per sharded mesh dimension for all units at
once (one collective per call for FSDP2 and for HSDP, whose replicas hold equal shards).
"""

from __future__ import annotations

import functools
import math
import numbers
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from ._tensors import buckets, pick, require_flag, use_foreach
from .errors import GradError, NonFiniteGradError, OptionError, OptionTypeError
from .groups import group_index
from .select import Selector
from .surgery import trainable

__all__ = ["clip_grad_norm"]

Named = list[tuple[str, torch.Tensor]]


def _layer(name: str) -> str:
    return name.rpartition(".")[0]


def _dtensor_type() -> type | None:
    # A gradient can only be a DTensor once torch.distributed.tensor was imported: checking
    # sys.modules keeps `import layerwise` from paying for that import.
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def _local(g: torch.Tensor, dtensor: type | None) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """(tensor to measure, tensor to scale in place, reduction key) for one gradient.

    The key is ``(mesh, sharded mesh dims)`` for a sharded DTensor and None when the local
    tensor holds the whole gradient (a plain tensor, a replicated DTensor)."""
    if g.is_sparse:  # Embedding(sparse=True): its stored values, coalesced so that repeated rows add up first
        return g.coalesce().values(), g, None
    if dtensor is None or not isinstance(g, dtensor):
        return g, g, None
    from torch.distributed.tensor import Replicate

    measured = g
    if any(pl.is_partial() for pl in g.placements):
        # A pending sum has no norm of its own: measure the summed tensor; scaling each
        # summand by one factor scales the sum, so the local summand is scaled in place.
        measured = g.redistribute(g.device_mesh, [Replicate() if pl.is_partial() else pl for pl in g.placements])
    dims = tuple(d for d, pl in enumerate(measured.placements) if pl.is_shard())
    return measured.to_local(), g.to_local(), (measured.device_mesh, dims) if dims else None


def _pooled_norms(grads: Sequence[torch.Tensor], owners: Sequence[int], units: int, norm_type: float,
                  foreach: bool | None) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.device, list]]]:
    """Each unit's ``norm_type``-norm over its gradients (a 1-d tensor); each gradient's unit and
    the tensors to scale, both in (device, dtype) bucket order."""
    dtensor = _dtensor_type()
    if dtensor is None and not any(g.is_sparse for g in grads):  # every gradient is whole and dense
        measured, scaled, keys = grads, grads, [None] * len(grads)
    else:
        measured, scaled, keys = zip(*(_local(g, dtensor) for g in grads))
    device = measured[0].device
    groups = buckets(measured)
    # Norms are real: a complex gradient's norm in its real dtype (complex norms could not be clamped)
    dtype = functools.reduce(torch.promote_types, (dt.to_real() for _, dt in groups), torch.float32)
    parts = []
    for (dev, _), idx in groups.items():
        gs = pick(measured, idx)
        per_tensor = torch._foreach_norm(gs, norm_type) if use_foreach(gs, dev, foreach) else [
            torch.linalg.vector_norm(g, norm_type) for g in gs]
        parts.append(torch.stack(per_tensor).to(device, dtype))
    order = [i for idx in groups.values() for i in idx]
    unit = torch.tensor([owners[i] for i in order], device=device)
    norms = torch.cat(parts)
    if not math.isinf(norm_type):
        norms = norms.pow(norm_type)
    # One pooled vector per kind of reduction (None: the local tensors are whole); sharded ones
    # are summed (or maxed) over the ranks holding the other shards, every unit in one all-reduce.
    kinds = [keys[i] for i in order]
    distinct = list(dict.fromkeys(kinds))
    pooled = None
    for key in distinct:
        rows = slice(None) if len(distinct) == 1 else torch.tensor([k == key for k in kinds], device=device)
        part = norms.new_zeros(units)
        if math.isinf(norm_type):
            part.scatter_reduce_(0, unit[rows], norms[rows], "amax")
        else:
            part.index_add_(0, unit[rows], norms[rows])
        if key is not None:
            import torch.distributed as dist

            mesh, dims = key
            op = dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM
            for d in dims:
                dist.all_reduce(part, op=op, group=mesh.get_group(d))
        pooled = part if pooled is None else torch.maximum(pooled, part) if math.isinf(norm_type) else pooled + part
    if not math.isinf(norm_type):
        pooled = pooled.pow_(1.0 / norm_type)
    return pooled, unit, [(dev, pick(scaled, idx)) for (dev, _), idx in groups.items()]


def _check_finite(norms: Mapping[Any, torch.Tensor], label: Callable[[Any], str], norm_type: float,
                  members: Mapping[Any, Named] | None = None) -> None:
    """Raise naming every unit whose norm is nan or inf (and the layers holding such values
    when a unit is more than one layer); one host sync when all is well."""
    first = next(iter(norms.values()))
    finite = torch.stack([n.to(first.device) for n in norms.values()]).isfinite()
    if finite.all():
        return
    dtensor = _dtensor_type()
    parts = []
    for (unit, norm), ok in zip(norms.items(), finite.tolist()):
        if ok:
            continue
        detail = f"norm {norm.item()}"
        if members is not None:
            layers = dict.fromkeys(repr(_layer(name)) for name, p in members[unit]
                                   if p.grad is not None and not _local(p.grad, dtensor)[0].isfinite().all())
            detail += f"; nan or inf in layer {', '.join(layers)}" if layers else ""
        parts.append(f"{label(unit)} ({detail})")
    raise NonFiniteGradError(
        f"clip_grad_norm changed nothing: the {norm_type}-norm of the gradients is non-finite in {', '.join(parts)}. "
        "Find where it comes from, or pass error_if_nonfinite=False to scale by the non-finite norm anyway.")


def _units(chosen: Named, per: str, optimizer: torch.optim.Optimizer | None) -> dict[Any, Named]:
    if per == "selection":
        return {"total": chosen}
    if per == "layer":
        layers: dict[Any, Named] = {}
        for name, p in chosen:
            layers.setdefault(_layer(name), []).append((name, p))
        return layers
    group_of = group_index(optimizer)
    stray = [name for name, p in chosen if id(p) not in group_of and p.grad is not None]
    if stray:
        raise GradError(f"per='group': {', '.join(stray)} have gradients but are in no param group of the "
                        "optimizer. Pass the optimizer that holds them, or leave them out of the selection.")
    groups: dict[Any, Named] = {}
    for name, p in chosen:
        if id(p) in group_of:
            groups.setdefault(group_of[id(p)], []).append((name, p))
    return dict(sorted(groups.items()))


def _check_options(max_norm: Any, per: str, optimizer: Any, norm_type: Any) -> tuple[float, float]:
    for option, value in (("max_norm", max_norm), ("norm_type", norm_type)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise OptionTypeError(f"clip_grad_norm: {option} must be a real number, got {type(value).__name__} {value!r}")
    if not max_norm >= 0:  # NaN fails too
        raise OptionError(f"clip_grad_norm: max_norm must be >= 0 (inf: no clipping), got {max_norm}; "
                          "a negative bound would flip the gradients' sign, NaN would make them NaN")
    if not norm_type > 0:
        raise OptionError(f"clip_grad_norm: norm_type must be positive or inf, got {norm_type}")
    if per not in ("selection", "layer", "group"):
        raise GradError(f"per must be 'selection', 'layer' or 'group', got {per!r}")
    if per == "group" and not isinstance(optimizer, torch.optim.Optimizer):
        raise GradError("per='group' clips each param group of an optimizer: pass optimizer=, a torch.optim.Optimizer"
                        + (f", not {type(optimizer).__name__}" if optimizer is not None else ""))
    if per != "group" and optimizer is not None:
        raise GradError(f"optimizer is used only with per='group' (got per={per!r}): leave it out, or pass per='group'")
    return float(max_norm), float(norm_type)


def clip_grad_norm(model: nn.Module, max_norm: float, *selectors: Selector,
                   per: Literal["selection", "layer", "group"] = "selection",
                   optimizer: torch.optim.Optimizer | None = None, norm_type: float = 2.0,
                   error_if_nonfinite: bool = False, foreach: bool | None = None) -> dict[Any, torch.Tensor]:
    """Clip gradient norms to ``max_norm`` per unit; returns each unit's norm before clipping.

    The units, and the keys of the returned dict of 0-d tensors:

    * ``per="selection"``: all selected gradients together, key ``"total"``; exactly
      ``torch.nn.utils.clip_grad_norm_`` on the selected parameters;
    * ``per="layer"``: each module that directly holds selected parameters, keyed by its
      name (``"blocks.0.attn"``; ``""`` for parameters of the model itself);
    * ``per="group"``: each param group of ``optimizer``, keyed by its index.

    A unit whose norm exceeds ``max_norm`` is scaled by ``max_norm / (norm + 1e-6)`` as torch
    does; the others are left bit-identical. Frozen parameters form no unit and parameters
    without a gradient are skipped (a unit with none has norm 0). Nothing waits for the
    device unless ``error_if_nonfinite=True``, which raises before clipping when a norm is
    nan or inf, naming the layers. ``foreach`` is torch's: fused kernels where supported.

    Sharded models: under DDP the gradients are already averaged, so every rank clips alike.
    Under FSDP2 and HSDP (DTensor gradients) each norm is that of the whole gradient, the
    same on every rank, and every unit's norm comes from one all-reduce per call; call it on
    every rank.

    Example:
        >>> import layerwise as lw, torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> _ = lw.set_grad(net, {"0.weight": torch.full((2, 2), 2.0), "0.bias": torch.zeros(2),
        ...                       "1.weight": torch.tensor([[0.3, 0.4]]), "1.bias": torch.zeros(1)})
        >>> lw.clip_grad_norm(net, 1.0, per="layer")
        {'0': tensor(4.), '1': tensor(0.5000)}
        >>> net[0].weight.grad.norm() <= 1.0, net[1].weight.grad
        (tensor(True), tensor([[0.3000, 0.4000]]))
        >>> lw.clip_grad_norm(net, -1.0)
        Traceback (most recent call last):
        ...
        layerwise.errors.OptionError: clip_grad_norm: max_norm must be >= 0 (inf: no clipping), got -1.0; ...
    """
    max_norm, norm_type = _check_options(max_norm, per, optimizer, norm_type)
    require_flag(error_if_nonfinite, "error_if_nonfinite", "clip_grad_norm")
    require_flag(foreach, "foreach", "clip_grad_norm", none=True)
    units = _units(trainable(model, selectors, "clip_grad_norm"), per, optimizer)
    label: Callable[[Any], str] = {"selection": lambda _: "the selection", "layer": lambda u: f"layer {u!r}",
                                   "group": lambda g: f"param group {g}"}[per]
    members = None if per == "layer" else units
    keys = list(units)
    grads = [(k, p.grad) for k, unit in enumerate(units.values()) for _, p in unit if p.grad is not None]
    dtensor = _dtensor_type()
    with torch.no_grad():
        if not grads:
            return {key: torch.tensor(0.0) for key in keys}
        # torch's own functions measure neither sparse nor sharded gradients
        if per != "layer" and not any(g.is_sparse or dtensor is not None and isinstance(g, dtensor) for _, g in grads):
            norms = {key: get_total_norm([p.grad for _, p in ps if p.grad is not None], norm_type, False, foreach)
                     for key, ps in units.items()}
            if error_if_nonfinite:
                _check_finite(norms, label, norm_type, members)
            for key, ps in units.items():
                clip_grads_with_norm_([p for _, p in ps], max_norm, norms[key], foreach)
            return norms
        pooled, unit, local = _pooled_norms([g for _, g in grads], [k for k, _ in grads], len(keys), norm_type, foreach)
        result = dict(zip(keys, pooled.unbind()))
        if error_if_nonfinite:
            _check_finite(result, label, norm_type, members)
        # As torch does: multiplying by a coefficient clamped to 1 avoids a host sync on `if norm > max_norm`.
        coef = (max_norm / (pooled + 1e-6)).clamp_(max=1.0)[unit]
        start = 0
        for dev, ts in local:
            cs = coef[start:start + len(ts)].to(dev).unbind()
            start += len(ts)
            if use_foreach(ts, dev, foreach):
                torch._foreach_mul_(ts, cs)
            else:
                for t, c in zip(ts, cs):
                    t.mul_(c)
    return result
