"""Gradient surgery: assign, scale, clip, reverse and de-conflict gradients, layer by layer.

Two moments to act on a gradient:

* after ``backward()``, on ``.grad``: :func:`set_grad`, :func:`clip_grad_norm` and
  :func:`pcgrad` (which runs the backward passes itself);
* during ``backward()``, on the gradient as it flows: :func:`grad_hook`, :func:`scale_grad`
  and :class:`GradReverse`. Tensor hooks run before the gradient is accumulated into
  ``.grad``, so under DistributedDataParallel they act before the all-reduce, identically
  on every rank; a ``.grad`` changed after ``backward()`` is changed on that rank only.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from ._hooks import Hooks
from ._tensors import buckets, pick, use_foreach
from .errors import GradError, NonFiniteGradError
from .groups import group_index
from .select import Selection, SelectionError, Selector, closest, describe, select

__all__ = [
    "GradError",
    "GradHooks",
    "GradReverse",
    "GradScale",
    "NonFiniteGradError",
    "clip_grad_norm",
    "grad_hook",
    "grad_reverse",
    "pcgrad",
    "scale_grad",
    "set_grad",
]

GradValue = torch.Tensor | float | Callable[[str, torch.Tensor], Any] | Mapping[str, Any]
_MISSING: Any = object()


def _trainable(model: nn.Module, selectors: Sequence[Selector], caller: str) -> list[tuple[str, torch.Tensor]]:
    """The selected parameters that can have a gradient; an error if every one is frozen."""
    sel = select(model, *selectors)
    chosen = [(name, p) for name, p in sel if p.requires_grad]
    if not sel:
        raise GradError(f"{caller}: {type(model).__name__} has no parameter to act on")
    if not chosen:
        shown = ", ".join(sel.names()[:5]) + (", ..." if len(sel) > 5 else "")
        raise GradError(f"{caller}: every selected parameter is frozen (requires_grad=False): {shown}. "
                        "Unfreeze them first, or select trainable ones.")
    return chosen


def _like(p: torch.Tensor) -> torch.Tensor:
    """A fresh tensor shaped, typed and laid out as ``p``, the layout ``backward()`` gives its ``.grad``."""
    return torch.empty_like(p, memory_format=torch.preserve_format)


# --------------------------------------------------------------------------- set_grad


def _by_key(sel: Selection, values: Mapping, what: str, *, exact: bool) -> list[tuple[str, torch.Tensor, Any]]:
    """(name, parameter, value) for each key of ``values``; keys may be any alias of a tied parameter."""
    index = {alias: i for i, names in enumerate(sel.aliases()) for alias in names}
    unknown = [k for k in values if k not in index]
    if unknown:
        known = list(index)
        hints = [f"{k!r}" + (f" (closest: {', '.join(near)})" if (near := closest(str(k), known)) else "") for k in unknown]
        raise SelectionError(f"set_grad changed nothing: no {what} is named {'; '.join(hints)}.")
    first: dict[int, str] = {}
    twice = []
    for k in values:
        if index[k] in first:
            twice.append(f"{first[index[k]]!r} and {k!r}")
        first.setdefault(index[k], k)
    if twice:
        raise GradError(f"set_grad changed nothing: {'; '.join(twice)} name one tied parameter. Give it one value.")
    if exact:
        missing = [names[0] for i, names in enumerate(sel.aliases()) if i not in first]
        if missing:
            raise GradError(f"set_grad changed nothing: no value for {', '.join(missing)}. "
                            "Add the missing values to the dict, or select only the parameters you give values for.")
    params = sel.params()
    return [(k, params[index[k]], v) for k, v in values.items()]


def set_grad(model: nn.Module, selector: Selector | Mapping[str, Any], value: GradValue = _MISSING, *,
             mode: Literal["replace", "add"] = "replace", allow_frozen: bool = False,
             allow_nonfinite: bool = False) -> list[str]:
    """Give the selected parameters a gradient directly; returns their names.

    ``value`` is a tensor of each parameter's exact shape, a number (every element), a
    callable ``(name, param) -> tensor or number``, or a dict ``{name: tensor}`` whose keys
    are exactly the selected parameters. ``set_grad(model, {name: tensor})`` selects by the
    keys; a tied parameter may be named by any of its names. Values are cast to the
    parameter's dtype and device and always copied: a later change to the caller's tensor
    does not reach ``.grad``. ``mode="replace"`` overwrites ``.grad``; ``mode="add"`` adds to
    it, as another ``backward()`` would.

    Every value is checked before any gradient changes: a wrong shape, a frozen parameter
    (unless ``allow_frozen=True``) or a non-finite value (unless ``allow_nonfinite=True``)
    raises an error naming each offending parameter, and leaves all gradients as they were.

    Under DistributedDataParallel the all-reduce happens inside ``backward()``, so a gradient
    assigned afterwards is local to its rank: assign the same value on every rank to keep the
    replicas identical, or act during backward with :func:`grad_hook`.

    Example:
        >>> import layerwise as lw, torch
        >>> net = torch.nn.Linear(2, 1)
        >>> lw.set_grad(net, "weight", torch.tensor([[1.0, -2.0]]))
        ['weight']
        >>> lw.set_grad(net, {"bias": torch.tensor([0.5])})
        ['bias']
        >>> lw.set_grad(net, "**", 1.0, mode="add")
        ['weight', 'bias']
        >>> net.weight.grad, net.bias.grad
        (tensor([[ 2., -1.]]), tensor([1.5000]))
    """
    if mode not in ("replace", "add"):
        raise GradError(f"mode must be 'replace' or 'add', got {mode!r}")
    if isinstance(selector, Mapping):
        if value is not _MISSING:
            raise GradError("set_grad(model, {name: value}) takes no separate value: "
                            "put the values in the dict, or pass a selector and a value")
        targets = _by_key(select(model), selector, f"parameter of {type(model).__name__}", exact=False)
    elif value is _MISSING:
        raise GradError(f"set_grad needs a value for selector {describe(selector)}: "
                        "set_grad(model, selector, value) or set_grad(model, {name: value})")
    elif isinstance(value, Mapping):
        targets = _by_key(select(model, selector), value, f"parameter selected by {describe(selector)}", exact=True)
    else:
        targets = [(name, p, value(name, p) if callable(value) else value) for name, p in select(model, selector)]

    grads, frozen, problems = [], [], []
    with torch.no_grad():
        for name, p, v in targets:
            if not (p.requires_grad or allow_frozen):
                frozen.append(name)
            elif isinstance(v, torch.Tensor) and v.shape != p.shape:
                problems.append(f"{name} has shape {tuple(p.shape)} but its value has shape {tuple(v.shape)}")
            elif isinstance(v, torch.Tensor):
                grads.append(_like(p).copy_(v))
            elif isinstance(v, numbers.Number):
                grads.append(torch.full_like(p, v, memory_format=torch.preserve_format))
            else:
                problems.append(f"the value for {name} is a {type(v).__name__}; expected a tensor or a number")
        if frozen:
            problems.append(f"frozen (requires_grad=False): {', '.join(frozen)}; unfreeze them or pass allow_frozen=True")
        if problems:
            raise GradError("set_grad changed nothing: " + "; ".join(problems) + ".")
        if grads and not allow_nonfinite:
            # One transfer to the host for all the checks, not one per tensor.
            finite = torch.stack([g.isfinite().all().to(grads[0].device) for g in grads]).tolist()
            bad = [name for (name, _, _), ok in zip(targets, finite) if not ok]
            if bad:
                raise NonFiniteGradError(f"set_grad changed nothing: nan or inf in the value for {', '.join(bad)}. "
                                         "Pass allow_nonfinite=True to assign such values anyway.")
        for (_, p, _), g in zip(targets, grads):
            if mode == "add" and p.grad is not None:
                p.grad.add_(g)
            elif p.grad is not None and p.grad.shape == g.shape and p.grad.dtype == g.dtype and p.grad.device == g.device:
                p.grad.copy_(g)  # in place: DDP's bucket views and other holders of .grad see the new value
            else:
                p.grad = g
    return [name for name, _, _ in targets]


# --------------------------------------------------------------------------- hooks


class GradHooks(Hooks):
    """The gradient hooks set by :func:`grad_hook`: ``remove()`` takes them all off.

    Removing twice is a no-op; used as a context manager, the hooks come off on exit.
    ``names`` lists the hooked parameters.

    Example:
        >>> import layerwise as lw, torch
        >>> net = torch.nn.Linear(2, 1)
        >>> with lw.grad_hook(net, "bias", fn=lambda name, grad: grad.clamp(max=0.5)) as hooks:
        ...     net(torch.ones(1, 2)).sum().backward()
        >>> hooks.names, net.bias.grad
        (['bias'], tensor([0.5000]))
    """

    def __init__(self, params: Sequence[tuple[str, torch.Tensor]],
                 fn: Callable[[str, torch.Tensor], torch.Tensor | None]):
        self.names = [name for name, _ in params]
        super().__init__(p.register_hook(functools.partial(fn, name)) for name, p in params)

    def __repr__(self) -> str:
        state = "active" if self._handles else "removed"
        return f"{type(self).__name__}({len(self.names)} parameters, {state})"


class GradScale(GradHooks):
    """The hooks set by :func:`scale_grad`; ``factor`` may be changed at any time (a schedule).

    Example:
        >>> import layerwise as lw, torch
        >>> net = torch.nn.Linear(2, 1)
        >>> scale = lw.scale_grad(net, "bias", factor=0.5)
        >>> scale.factor = 0.25
        >>> net(torch.ones(1, 2)).sum().backward()
        >>> net.bias.grad
        tensor([0.2500])
        >>> scale.remove()
    """

    def __init__(self, params: Sequence[tuple[str, torch.Tensor]], factor: float):
        self.factor = factor
        super().__init__(params, self._scale)

    def _scale(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        return grad * self.factor


def grad_hook(model: nn.Module, *selectors: Selector,
              fn: Callable[[str, torch.Tensor], torch.Tensor | None]) -> GradHooks:
    """Call ``fn(name, grad)`` on the gradient of each selected parameter during backward.

    ``fn`` returns the gradient to use instead, or ``None`` to keep it; it must not change
    ``grad`` in place. It runs once per backward per parameter (a shared parameter is one
    tensor and gets one hook, called with its first name), before the gradient is
    accumulated into ``.grad``: under DistributedDataParallel, before the all-reduce.
    Frozen parameters get no gradient and no hook. Returns a :class:`GradHooks` handle.

    Example:
        >>> import layerwise as lw, torch
        >>> net = torch.nn.Linear(2, 1)
        >>> seen = []
        >>> hooks = lw.grad_hook(net, fn=lambda name, grad: seen.append(name))
        >>> net(torch.ones(1, 2)).sum().backward()
        >>> sorted(seen)
        ['bias', 'weight']
        >>> hooks.remove()
    """
    return GradHooks(_trainable(model, selectors, "grad_hook"), fn)


def scale_grad(model: nn.Module, *selectors: Selector, factor: float) -> GradScale:
    """Multiply the gradients of the selected parameters by ``factor`` during backward.

    The product is taken in a tensor hook, before accumulation into ``.grad``, so it
    composes with gradient accumulation and with DistributedDataParallel (every rank scales
    its local gradient, then they are averaged). Returns a :class:`GradScale` handle: change
    its ``factor`` for a schedule, ``remove()`` it, or use it as a context manager.

    Example:
        >>> import layerwise as lw, torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> with lw.scale_grad(net, "0", factor=0.5):
        ...     net(torch.ones(1, 2)).sum().backward()
        >>> torch.equal(net[0].bias.grad, 0.5 * net[1].weight.detach().flatten())
        True
    """
    return GradScale(_trainable(model, selectors, "scale_grad"), factor)


# --------------------------------------------------------------------------- clipping


def _layer(name: str) -> str:
    return name.rpartition(".")[0]


def _check_finite(norms: Mapping[Any, torch.Tensor], label: Callable[[Any], str], norm_type: float,
                  members: Mapping[Any, list[tuple[str, torch.Tensor]]] | None = None) -> None:
    """Raise naming every unit whose norm is nan or inf (and the layers holding such values
    when a unit is more than one layer); one host sync when all is well."""
    first = next(iter(norms.values()))
    finite = torch.stack([n.to(first.device) for n in norms.values()]).isfinite()
    if finite.all():
        return
    parts = []
    for (unit, norm), ok in zip(norms.items(), finite.tolist()):
        if ok:
            continue
        detail = f"norm {norm.item()}"
        if members is not None:
            layers = dict.fromkeys(repr(_layer(name)) for name, p in members[unit]
                                   if p.grad is not None and not p.grad.isfinite().all())
            detail += f"; nan or inf in layer {', '.join(layers)}" if layers else ""
        parts.append(f"{label(unit)} ({detail})")
    raise NonFiniteGradError(
        f"clip_grad_norm changed nothing: the {norm_type}-norm of the gradients is non-finite in {', '.join(parts)}. "
        "Find where it comes from, or pass error_if_nonfinite=False to scale by the non-finite norm anyway.")


def _clip_layers(chosen: list[tuple[str, torch.Tensor]], max_norm: float, norm_type: float,
                 error_if_nonfinite: bool, foreach: bool | None) -> dict[str, torch.Tensor]:
    # One norm kernel per (device, dtype) for all parameters, pooled per layer with an index:
    # a loop over layers would launch a few kernels for each of many small layers.
    layers: dict[str, int] = {}
    grads, owners = [], []
    for name, p in chosen:
        owner = layers.setdefault(_layer(name), len(layers))
        if p.grad is not None:
            grads.append(p.grad)
            owners.append(owner)
    if not grads:
        return {layer: torch.tensor(0.0) for layer in layers}
    device = grads[0].device
    groups = buckets(grads)
    dtype = functools.reduce(torch.promote_types, (dt for _, dt in groups), torch.float32)
    parts = []
    for (dev, _), idx in groups.items():
        gs = pick(grads, idx)
        per_tensor = torch._foreach_norm(gs, norm_type) if use_foreach(gs, dev, foreach) else [
            torch.linalg.vector_norm(g, norm_type) for g in gs]
        parts.append(torch.stack(per_tensor).to(device, dtype))
    norms = torch.cat(parts)
    unit = torch.tensor([owners[i] for idx in groups.values() for i in idx], device=device)
    pooled = norms.new_zeros(len(layers))
    if math.isinf(norm_type):
        pooled.scatter_reduce_(0, unit, norms, "amax")
    else:
        pooled.index_add_(0, unit, norms.pow(norm_type)).pow_(1.0 / norm_type)
    result = dict(zip(layers, pooled.unbind()))
    if error_if_nonfinite:
        _check_finite(result, lambda layer: f"layer {layer!r}", norm_type)
    # As torch does: multiplying by a coefficient clamped to 1 avoids a host sync on `if norm > max_norm`.
    coef = (max_norm / (pooled + 1e-6)).clamp_(max=1.0)[unit]
    start = 0
    for (dev, _), idx in groups.items():
        gs, cs = pick(grads, idx), coef[start:start + len(idx)].to(dev).unbind()
        start += len(idx)
        if use_foreach(gs, dev, foreach):
            torch._foreach_mul_(gs, cs)
        else:
            for g, c in zip(gs, cs):
                g.mul_(c)
    return result


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

    Example:
        >>> import layerwise as lw, torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> _ = lw.set_grad(net, {"0.weight": torch.full((2, 2), 2.0), "0.bias": torch.zeros(2),
        ...                       "1.weight": torch.tensor([[0.3, 0.4]]), "1.bias": torch.zeros(1)})
        >>> lw.clip_grad_norm(net, 1.0, per="layer")
        {'0': tensor(4.), '1': tensor(0.5000)}
        >>> net[0].weight.grad.norm() <= 1.0, net[1].weight.grad
        (tensor(True), tensor([[0.3000, 0.4000]]))
    """
    if per not in ("selection", "layer", "group"):
        raise GradError(f"per must be 'selection', 'layer' or 'group', got {per!r}")
    if per == "group" and optimizer is None:
        raise GradError("per='group' clips each param group of an optimizer: pass optimizer=")
    if per != "group" and optimizer is not None:
        raise GradError(f"optimizer is used only with per='group' (got per={per!r}): leave it out, or pass per='group'")
    norm_type = float(norm_type)
    if not norm_type > 0:
        raise GradError(f"norm_type must be positive or inf, got {norm_type}")
    max_norm = float(max_norm)
    chosen = _trainable(model, selectors, "clip_grad_norm")
    with torch.no_grad():
        if per == "layer":
            return _clip_layers(chosen, max_norm, norm_type, error_if_nonfinite, foreach)
        if per == "selection":
            units: dict[Any, list[tuple[str, torch.Tensor]]] = {"total": chosen}
            label: Callable[[Any], str] = lambda _: "the selection"
        else:
            group_of = group_index(optimizer)
            stray = [name for name, p in chosen if id(p) not in group_of and p.grad is not None]
            if stray:
                raise GradError(f"per='group': {', '.join(stray)} have gradients but are in no param group of the "
                                "optimizer. Pass the optimizer that holds them, or leave them out of the selection.")
            units = {}
            for name, p in chosen:
                if id(p) in group_of:
                    units.setdefault(group_of[id(p)], []).append((name, p))
            units = dict(sorted(units.items()))
            label = lambda g: f"param group {g}"
        norms = {unit: get_total_norm([p.grad for _, p in ps if p.grad is not None], norm_type, False, foreach)
                 for unit, ps in units.items()}
        if error_if_nonfinite:
            _check_finite(norms, label, norm_type, units)
        for unit, ps in units.items():
            clip_grads_with_norm_([p for _, p in ps], max_norm, norms[unit], foreach)
    return norms


# --------------------------------------------------------------------------- gradient reversal


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(x: torch.Tensor, alpha: float) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, float], output: torch.Tensor) -> None:
        ctx.alpha = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * -ctx.alpha, None


def grad_reverse(x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Identity in the forward pass; multiplies the gradient by ``-alpha`` in the backward pass.

    The gradient reversal layer of domain-adversarial training (Ganin & Lempitsky, 2015): the
    features before it learn to fool the domain classifier after it. The output is a view
    of ``x``; clone it before changing it in place.

    Example:
        >>> import layerwise as lw, torch
        >>> x = torch.ones(3, requires_grad=True)
        >>> lw.grad_reverse(x, alpha=0.5).sum().backward()
        >>> x.grad
        tensor([-0.5000, -0.5000, -0.5000])
    """
    return _GradReverse.apply(x, alpha)


class GradReverse(nn.Module):
    """:func:`grad_reverse` as a module; set ``alpha`` between steps for a schedule.

    Example:
        >>> import layerwise as lw, torch
        >>> reverse = lw.GradReverse(alpha=1.0)
        >>> reverse.alpha = 2.0  # e.g. DANN's 2 / (1 + exp(-10 p)) - 1, updated each step
        >>> x = torch.ones(2, requires_grad=True)
        >>> reverse(x).sum().backward()
        >>> x.grad
        tensor([-2., -2.])
    """

    def __init__(self, alpha: float = 1.0):
        super().__init__()
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grad_reverse(x, self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


# --------------------------------------------------------------------------- PCGrad


def pcgrad(losses: Sequence[torch.Tensor], model: nn.Module, *selectors: Selector,
           reduction: Literal["mean", "sum"] = "mean", generator: torch.Generator | None = None) -> None:
    """Backward through several task losses with projected conflicting gradients (PCGrad).

    Each task's gradient of the selected parameters ``g_i`` is projected onto the normal plane
    of every other task's ``g_j`` with which it conflicts (``g_i . g_j < 0``), the others taken
    in a random order drawn from ``generator``, a CPU ``torch.Generator`` (torch's default
    one if None) (Yu et al., 2020, "Gradient Surgery for Multi-Task Learning"). The projected
    gradients are combined and written into ``.grad``, replacing it: call ``pcgrad`` instead
    of ``loss.backward()``.

    ``reduction`` ("mean" or "sum") combines the gradients of parameters every loss reaches;
    a selected parameter that only some losses reach (a task's head) gets the sum, as in the
    reference implementation, so it is not divided by the number of tasks. A loss that does
    not reach a parameter counts as a zero gradient there. Parameters outside the selection
    get the plain sum of the losses' gradients; parameters no loss reaches are left alone.
    Select the shared trunk to leave task heads out of the projection.

    The projections are done on the ``T x T`` Gram matrix of the task gradients, so beyond the
    ``T`` backward passes the surgery costs two matrix products per (device, dtype) of
    parameters, and nothing waits for the device. Under DistributedDataParallel the
    gradients written are local to each rank, as with :func:`set_grad`.

    Example:
        >>> import layerwise as lw, torch
        >>> net = torch.nn.Linear(2, 1, bias=False)
        >>> _ = torch.nn.init.ones_(net.weight)
        >>> losses = [net(torch.tensor([1.0, 0.0])).sum(), net(torch.tensor([-1.0, 1.0])).sum()]
        >>> lw.pcgrad(losses, net)
        >>> net.weight.grad  # the mean of (1, 0) + 0.5 (-1, 1) and (-1, 1) + (1, 0)
        tensor([[0.2500, 0.7500]])
    """
    losses = list(losses)
    if len(losses) < 2:
        raise GradError(f"pcgrad needs two losses or more, got {len(losses)}: with one task, call loss.backward()")
    if reduction not in ("mean", "sum"):
        raise GradError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    for i, loss in enumerate(losses):
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            got = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise GradError(f"pcgrad: loss {i} must be a one-element tensor, got {got}")
        if not loss.requires_grad:
            raise GradError(f"pcgrad changed nothing: loss {i} does not require grad (it depends on no trainable parameter)")
    chosen = [p for _, p in _trainable(model, selectors, "pcgrad")]
    ids = {id(p) for p in chosen}
    others = [p for p in select(model).params() if p.requires_grad and id(p) not in ids]
    tasks = len(losses)
    grads = [torch.autograd.grad(loss, chosen + others, retain_graph=i < tasks - 1, allow_unused=True)
             for i, loss in enumerate(losses)]
    unreached = [str(i) for i, g in enumerate(grads) if all(x is None for x in g[:len(chosen)])]
    if unreached:
        raise GradError(f"pcgrad changed nothing: loss {', '.join(unreached)} reaches none of the selected parameters "
                        f"({', '.join(map(describe, selectors)) or 'all'}). Select parameters every loss depends on "
                        "(the shared trunk), or leave those losses out.")
    # By parameter: each task's gradient, None where the task does not reach it.
    by_param = list(zip(*grads))
    projected = [(p, gs) for p, gs in zip(chosen, by_param) if any(g is not None for g in gs)]

    with torch.no_grad():
        groups = buckets([p for p, _ in projected])
        mats = {key: _task_matrix(pick(projected, idx), tasks, torch.promote_types(key[1], torch.float32))
                for key, idx in groups.items()}
        first = next(iter(mats.values()))
        gram = sum((m @ m.T).to(first.device) for m in mats.values())
        # Each projected gradient stays a combination of the original ones, pc_i = coef[i] @ G,
        # so a projection is a few ops on T numbers: pc_i . g_j = coef[i] @ gram[:, j].
        coef = torch.eye(tasks, dtype=gram.dtype, device=gram.device)
        for i in range(tasks):
            rest = [j for j in range(tasks) if j != i]
            for r in torch.randperm(tasks - 1, generator=generator).tolist():
                j = rest[r]
                dot = coef[i] @ gram[:, j]
                coef[i, j] -= torch.where(dot < 0, dot / gram[j, j], 0.0)
        weights = coef.sum(0)
        for key, idx in groups.items():
            entries = pick(projected, idx)
            merged = weights.to(mats[key]) @ mats[key]
            for (p, gs), flat in zip(entries, merged.split([p.numel() for p, _ in entries])):
                if reduction == "mean" and all(g is not None for g in gs):
                    flat = flat / tasks
                p.grad = _like(p).copy_(flat.view(p.shape))
        for p, gs in zip(others, by_param[len(chosen):]):
            reached = [g for g in gs if g is not None]
            if reached:
                p.grad = _like(p).copy_(reached[0])
                for g in reached[1:]:
                    p.grad.add_(g)


def _task_matrix(entries: Sequence[tuple[torch.Tensor, Sequence[torch.Tensor | None]]], tasks: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """(tasks x numel): row t is task t's gradient of the entries' parameters, zero where it does not reach one."""
    rows = [torch.cat([(gs[t] if gs[t] is not None else p.new_zeros(p.shape)).reshape(-1) for p, gs in entries])
            for t in range(tasks)]
    return torch.stack(rows).to(dtype)
