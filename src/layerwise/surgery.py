"""Assigning and reshaping gradients per layer: :func:`set_grad` after backward, hooks during it.

Two moments to act on a gradient:

* after ``backward()``, on ``.grad``: :func:`set_grad` here, :func:`~layerwise.clip.clip_grad_norm`
  and :func:`~layerwise.pcgrad.pcgrad` (which runs the backward passes itself);
* during ``backward()``, on the gradient as it flows: :func:`grad_hook`, :func:`scale_grad`
  and :class:`~layerwise.reverse.GradReverse`. Tensor hooks run before the gradient is
  accumulated into ``.grad``, so under DistributedDataParallel they act before the all-reduce,
  identically on every rank, and under ``torch.compile`` they run outside the compiled graph
  (no graph break); a ``.grad`` changed after ``backward()`` is changed on that rank only.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from ._hooks import Hooks, grad_hooks
from ._model_state import is_dtensor, laid_out_as
from ._tensors import require_flag, require_module
from .errors import GradError, NonFiniteGradError, OptionError, OptionTypeError
from .select import Selection, SelectionError, Selector, closest, describe, select

__all__ = ["GradHooks", "GradScale", "grad_hook", "scale_grad", "set_grad"]

GradValue = torch.Tensor | float | Callable[[str, torch.Tensor], Any] | Mapping[str, Any]
_MISSING: Any = object()


def trainable(model: nn.Module, selectors: Sequence[Selector], caller: str) -> list[tuple[str, torch.Tensor]]:
    """The selected parameters that can have a gradient; an error if every one is frozen.
    Shared by every gradient tool (clipping and PCGrad too), so they refuse alike."""
    require_module(model, caller)
    sel = select(model, *selectors)
    chosen = [(name, p) for name, p in sel if p.requires_grad]
    if not sel:
        raise GradError(f"{caller}: {type(model).__name__} has no parameter to act on")
    if not chosen:
        shown = ", ".join(sel.names()[:5]) + (", ..." if len(sel) > 5 else "")
        raise GradError(f"{caller}: every selected parameter is frozen (requires_grad=False): {shown}. "
                        "Unfreeze them first, or select trainable ones.")
    return chosen


def finite_real(caller: str, option: str, value: Any) -> float:
    """``value`` as a float if it is a finite real number, else the error naming ``option``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise OptionTypeError(f"{caller}: {option} must be a real number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise OptionError(f"{caller}: {option} must be finite, got {value}: it would make every gradient nan or inf")
    return float(value)


def like(p: torch.Tensor) -> torch.Tensor:
    """A fresh tensor shaped, typed and laid out as ``p``, the layout ``backward()`` gives its ``.grad``."""
    return torch.empty_like(p, memory_format=torch.preserve_format)


# --------------------------------------------------------------------------- set_grad


def shard_like(p: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A full-shape ``value`` laid out as the sharded (FSDP2, DTensor) parameter ``p``: each rank keeps its
    own shard of its own value, with no collective (as a gradient assigned after backward under DDP)."""
    return laid_out_as(p, value.detach().to(dtype=p.dtype))


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
    require_module(model, "set_grad")
    if mode not in ("replace", "add"):
        raise GradError(f"mode must be 'replace' or 'add', got {mode!r}")
    require_flag(allow_frozen, "allow_frozen", "set_grad")  # "no" would be truthy: the very thing it refuses
    require_flag(allow_nonfinite, "allow_nonfinite", "set_grad")
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

    grads, checks, frozen, problems = [], [], [], []
    with torch.no_grad():
        for name, p, v in targets:
            if not (p.requires_grad or allow_frozen):
                frozen.append(name)
            elif p.device.type == "meta":  # a shape without values: no gradient can be read or kept
                problems.append(f"{name} is on the meta device; materialize the model first (model.to_empty(...))")
            elif isinstance(v, torch.Tensor) and v.shape != p.shape:
                problems.append(f"{name} has shape {tuple(p.shape)} but its value has shape {tuple(v.shape)}")
            elif (v.is_complex() if isinstance(v, torch.Tensor) else isinstance(v, complex)) and not p.is_complex():
                # torch would drop the imaginary part with only a warning.
                problems.append(f"the value for {name} is complex but {name} is {p.dtype}; pass its real part")
            elif isinstance(v, torch.Tensor):
                sharded = is_dtensor(p) and not is_dtensor(v)
                grads.append(shard_like(p, v) if sharded else like(p).copy_(v))
                checks.append(v if sharded else grads[-1])
            elif isinstance(v, numbers.Number):
                grads.append(torch.full_like(p, v, memory_format=torch.preserve_format))
                checks.append(torch.tensor(v))
            else:
                problems.append(f"the value for {name} is a {type(v).__name__}; expected a tensor or a number")
        if frozen:
            problems.append(f"frozen (requires_grad=False): {', '.join(frozen)}; unfreeze them or pass allow_frozen=True")
        if problems:
            raise GradError("set_grad changed nothing: " + "; ".join(problems) + ".")
        if grads and not allow_nonfinite:
            # One transfer to the host for all the checks, not one per tensor.
            # A sharded (DTensor) gradient is checked through its full value, so that every rank given it agrees.
            full = [c.full_tensor() if is_dtensor(c) else c for c in checks]
            finite = torch.stack([c.isfinite().all().to(full[0].device) for c in full]).tolist()
            bad = [name for (name, _, _), ok in zip(targets, finite) if not ok]
            if bad:
                raise NonFiniteGradError(f"set_grad changed nothing: nan or inf in the value for {', '.join(bad)}. "
                                         "Pass allow_nonfinite=True to assign such values anyway.")
        for (_, p, _), g in zip(targets, grads):
            if mode == "add" and p.grad is not None:
                if p.grad.layout == g.layout:
                    p.grad.add_(g)
                else:  # sparse (Embedding(sparse=True)) + dense is dense, as in autograd; g is our own copy
                    p.grad = g.add_(p.grad)
            elif (p.grad is not None and p.grad.shape == g.shape and p.grad.dtype == g.dtype
                  and p.grad.device == g.device and p.grad.layout == g.layout):
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
                 fn: Callable[[str, torch.Tensor], torch.Tensor | None], model: nn.Module | None = None):
        self.names = [name for name, _ in params]
        super().__init__(grad_hooks(model, params, fn))

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

    def __init__(self, params: Sequence[tuple[str, torch.Tensor]], factor: float, model: nn.Module | None = None):
        self.factor = factor
        super().__init__(params, self._scale, model)

    @property
    def factor(self) -> float:
        return self._factor

    @factor.setter
    def factor(self, value: float) -> None:
        # Checked here: the hook runs inside backward, where a bad value would surface as a raw torch error.
        self._factor = finite_real("scale_grad", "factor", value)

    def _scale(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        return grad * self._factor


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
    if not callable(fn):
        raise OptionTypeError(f"grad_hook: fn must be a callable (name, grad) -> grad or None, got {type(fn).__name__}")

    def checked(name: str, grad: torch.Tensor) -> torch.Tensor | None:
        out = fn(name, grad)  # autograd would name neither the parameter nor the hook of a bad result
        if out is not None and not (isinstance(out, torch.Tensor) and out.shape == grad.shape):
            got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
            raise GradError(f"grad_hook: fn returned {got} for {name!r}; return a tensor of the gradient's shape "
                            f"{tuple(grad.shape)}, or None to keep the gradient")
        return out
    return GradHooks(trainable(model, selectors, "grad_hook"), checked, model)


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
    return GradScale(trainable(model, selectors, "scale_grad"), factor, model)
