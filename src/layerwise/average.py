"""Averaging and merging models in memory: mean, task arithmetic, TIES, DARE, SLERP, greedy soup (EMA: ``ema.py``).

The per-tensor math lives in :func:`merge_tensors` and the checks and option resolution in
:func:`check_compatible` and :func:`merge_plan`;
``checkpoint.merge_files`` streams files through exactly these functions.
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ._tensors import alias_key
from .errors import MergeError
from .select import Selector, Walk, as_selectors, select_keys

__all__ = ["average", "greedy_soup", "merge"]

StateDict = Mapping[str, torch.Tensor]
ModelLike = nn.Module | StateDict

#: Each method's options and their defaults (``None``: required).
METHODS: dict[str, dict[str, float | None]] = {
    "linear": {},
    "task_arithmetic": {"scale": 1.0},
    "ties": {"density": 0.2, "scale": 1.0},  # Yadav et al. keep the top 20 % by default
    "dare": {"density": 0.1, "scale": 1.0, "seed": 0},  # Yu et al. drop 90 %
    "slerp": {"t": 0.5},
}
_NEEDS_BASE = ("task_arithmetic", "ties", "dare")
_COLINEAR = 0.9995  # |cos| above this: SLERP falls back to linear interpolation


# --------------------------------------------------------------------------- checks and options


def state_dict_of(model: ModelLike) -> StateDict:
    if isinstance(model, nn.Module):
        return model.state_dict()
    if isinstance(model, Mapping):
        return model
    raise MergeError(f"expected an nn.Module or a state dict, got {type(model).__name__}")


def check_compatible(specs: Sequence[tuple[str, Mapping[str, tuple[tuple[int, ...], torch.dtype]]]]) -> None:
    """Raise one :class:`MergeError` listing every key, shape and dtype difference to the first spec.

    ``specs`` are ``(label, {key: (shape, dtype)})``, from tensors or from file headers.
    """
    (ref_label, ref), problems = specs[0], []
    for label, spec in specs[1:]:
        missing = [k for k in ref if k not in spec]
        extra = [k for k in spec if k not in ref]
        if missing:
            problems.append(f"{label} lacks {len(missing)} key(s) of {ref_label}: {', '.join(missing)}")
        if extra:
            problems.append(f"{label} has {len(extra)} key(s) {ref_label} lacks: {', '.join(extra)}")
        for key in ref:
            if key in spec:
                for what, a, b in (("shape", ref[key][0], spec[key][0]), ("dtype", ref[key][1], spec[key][1])):
                    if a != b:
                        a, b = (tuple(a), tuple(b)) if what == "shape" else (a, b)
                        problems.append(f"{key}: {what} {a} in {ref_label} but {b} in {label}")
    if problems:
        hint = next((h for _, spec in specs[1:] if (h := _prefix_hint(ref, spec))), "")
        raise MergeError(f"the models differ ({len(problems)} difference{'s' * (len(problems) > 1)}): "
                         + "; ".join(problems) + "; they must have the same keys, shapes and dtypes" + hint)


_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")  # DDP / DataParallel, torch.compile, Lightning


def _prefix_hint(a: Iterable[str], b: Iterable[str]) -> str:
    """A hint when two key sets differ only by a wrapper's prefix on every key."""
    a, b = set(a), set(b)
    for prefix in _WRAPPER_PREFIXES:
        for outer, inner in ((a, b), (b, a)):
            if all(k.startswith(prefix) for k in outer) and {k.removeprefix(prefix) for k in outer} == inner:
                return (f" (every key differs only by the prefix {prefix!r}: one model is wrapped, by DDP, "
                        "torch.compile or a LightningModule; pass the inner model, e.g. model.module)")
    return ""


def check_method(method: str, *, has_base: bool, models: int) -> None:
    """The method exists and has what it needs: a base for task vectors, two models for SLERP."""
    if method not in METHODS:
        raise MergeError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    if not models:
        raise MergeError("no models to merge")
    if method in _NEEDS_BASE and not has_base:
        raise MergeError(f"{method} adds task vectors (model − base) to a base: pass base=<the common ancestor> "
                         "(--base on the command line)")
    if method == "slerp" and models != 2:
        raise MergeError(f"slerp interpolates exactly two models; got {models}")


def method_weights(method: str, weights: Sequence[float] | None, n: int) -> list[float]:
    """Validated weights: normalized to sum 1 for ``linear``; per-model task-vector scales otherwise."""
    if method == "slerp":
        if weights is not None:
            raise MergeError("slerp interpolates two models with t=...; it takes no weights")
        return [1.0] * n
    if weights is None:
        return [1.0 / n] * n if method == "linear" else [1.0] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise MergeError(f"got {len(weights)} weights for {n} models; give one weight per model")
    bad = [f"weight {i} is {w}" for i, w in enumerate(weights) if not math.isfinite(w) or w < 0]
    if bad:
        raise MergeError(f"weights must be finite and non-negative: {'; '.join(bad)}")
    total = sum(weights)
    if total <= 0:
        raise MergeError(f"weights {weights} sum to zero; give at least one model a positive weight")
    return [w / total for w in weights] if method == "linear" else weights


def resolve_options(method: str, keys: Sequence[str], options: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Per-key option values. A value may be ``{selector: value}`` over the keys, applied in order
    (later entries override); keys no entry matches keep the method's default."""
    if method not in METHODS:
        raise MergeError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    allowed = METHODS[method]
    unknown = [k for k in options if k not in allowed]
    if unknown:
        raise MergeError(f"method {method!r} takes no option {', '.join(map(repr, unknown))}; "
                         f"its options are {', '.join(allowed) or 'none'}")
    per_key = {k: dict(allowed) for k in keys}
    names = Walk(keys)  # one walk of the keys for every {selector: value} entry
    for option, value in options.items():
        entries = value.items() if isinstance(value, Mapping) else [(None, value)]
        for selector, v in entries:
            chosen = keys if selector is None else select_keys(names, selector)
            for k in chosen:
                per_key[k][option] = v
    for k, opts in per_key.items():
        for option, v in opts.items():
            _check_option(method, option, v, k)
    return per_key


def merge_plan(method: str, keys: Sequence[str], models: int, weights: Sequence[float] | None,
               options: Mapping[str, Any], select: Selector | Iterable[Selector] | None
               ) -> tuple[list[float], dict[str, dict[str, float]], set[str]]:
    """What ``merge`` and ``merge_files`` both decide before touching a tensor: the weights, each
    key's options, and the keys to merge (the rest come from the base or the first model)."""
    selectors = as_selectors(select)
    chosen = set(select_keys(keys, *selectors)) if selectors else set(keys)
    return method_weights(method, weights, models), resolve_options(method, keys, options), chosen


def _check_option(method: str, option: str, value: Any, key: str) -> None:
    if option == "seed":
        if not isinstance(value, int) or isinstance(value, bool):
            raise MergeError(f"{method} option seed={value!r} for {key} must be an integer")
        return
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MergeError(f"{method} option {option}={value!r} for {key} must be a finite number")
    if option == "density" and not 0 < value <= 1:
        raise MergeError(f"{method} option density={value} for {key} must be in (0, 1]: the fraction of each "
                         "task vector kept")
    if option == "t" and not 0 <= value <= 1:
        raise MergeError(f"slerp option t={value} for {key} must be in [0, 1]")


# --------------------------------------------------------------------------- the per-tensor math


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction (at least one) of entries with the largest magnitude (ties at the cut kept)."""
    if density >= 1.0:
        return tau
    keep = max(1, int(tau.numel() * density))  # a 4-element bias at 20 % keeps its largest entry, not none
    magnitude = tau.abs().flatten()
    threshold = magnitude.kthvalue(magnitude.numel() - keep + 1).values
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))


def _dare(tau: torch.Tensor, density: float, seed: int, key: str, index: int) -> torch.Tensor:
    """Drop entries with probability 1 - density and rescale the rest; seeded per (seed, key, model)."""
    if density >= 1.0:
        return tau
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{key}:{index}".encode()))
    keep = (torch.rand(tau.shape, generator=gen) < density).to(tau.device)
    return torch.where(keep, tau / density, torch.zeros_like(tau))


def _slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return torch.lerp(a, b, t)
    cos = torch.clamp((a.flatten() @ b.flatten()) / (na * nb), -1.0, 1.0)
    if cos.abs() > _COLINEAR:
        return torch.lerp(a, b, t)
    theta = torch.arccos(cos)
    return (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)


def merge_tensors(method: str, tensors: Iterable[torch.Tensor], base: torch.Tensor | None,
                  weights: Sequence[float], options: Mapping[str, float], *, key: str = "",
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """Combine one tensor from each model into a new tensor (the math of ``merge`` and ``merge_files``).

    Floating tensors are combined in float32 (float64 for float64 inputs) and cast to ``dtype``
    (default: the input dtype); integer and bool tensors are copied from ``base``, else from the
    first model. ``weights`` come from :func:`method_weights`, ``options`` from
    :func:`resolve_options`. ``tensors`` is consumed one at a time by the summing methods
    (linear, task arithmetic, DARE), so a streaming caller holds one input tensor at a time;
    TIES and SLERP need them all. Input tensors are never written to.
    """
    inputs = iter(tensors)
    first = next(inputs)
    out_dtype = dtype or first.dtype
    if not (first.is_floating_point() or first.is_complex()):
        return (base if base is not None else first).clone()
    acc = _acc_dtype(first.dtype)
    if method == "linear":
        out = first.to(acc) * weights[0]
        del first
        for w, x in zip(weights[1:], inputs):
            out.add_(x, alpha=w)
            del x  # before the next read: one input alive at a time
    elif method in ("task_arithmetic", "dare"):
        b = base.to(acc)
        out = torch.zeros_like(b)
        everything = itertools.chain([first], inputs)
        del first
        for i, (w, x) in enumerate(zip(weights, everything)):
            tau = x.to(acc, copy=True).sub_(b)
            del x
            if method == "dare":
                tau = _dare(tau, options["density"], int(options["seed"]), key, i)
            out.add_(tau, alpha=w)
            del tau
        out.mul_(options["scale"]).add_(b)
    elif method == "slerp":
        out = _slerp(first.to(acc), next(inputs).to(acc), options["t"])
    else:  # ties: trim each task vector, elect a sign per entry, average the agreeing entries
        b = base.to(acc)
        trimmed = torch.stack([_trim(x.to(acc) - b, options["density"]) for x in itertools.chain([first], inputs)])
        w = torch.tensor(weights, dtype=acc, device=b.device).view(-1, *([1] * b.ndim))
        sign = torch.sign((w * trimmed).sum(0))
        agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
        mass = (w * agree).sum(0)
        merged = torch.where(mass > 0, (w * agree * trimmed).sum(0) / mass.clamp_min(torch.finfo(acc).tiny), 0.0)
        out = b + options["scale"] * merged
    return out.to(out_dtype)


# --------------------------------------------------------------------------- merge and average


def _alias_groups(state_dicts: Sequence[StateDict], keys: Sequence[str]) -> list[list[str]]:
    """Keys that are one tensor in every input (tied weights): merged once, stored once."""
    groups: dict[object, list[str]] = {}
    for k in keys:
        signature = tuple(alias_key(sd[k]) for sd in state_dicts)
        groups.setdefault(signature if None not in signature else ("unique", k), []).append(k)
    return list(groups.values())


def merge(base: ModelLike | None, models: Sequence[ModelLike], method: str = "linear", *,
          weights: Sequence[float] | None = None, select: Sequence[Selector] | Selector | None = None,
          into: nn.Module | None = None, **options: Any) -> dict[str, torch.Tensor]:
    """Merge ``models`` (modules or state dicts) into a new state dict.

    ==================  =======================================================  ===================
    method              result per floating tensor                               options
    ==================  =======================================================  ===================
    ``linear``          weighted mean (weights normalized to sum 1)
    ``task_arithmetic`` base + scale · Σ wᵢ (modelᵢ − base)                      scale=1
    ``ties``            base + scale · disjoint mean of the sign-elected,        density=0.2, scale=1
                        top-``density`` task vectors (Yadav et al., 2023)
    ``dare``            base + scale · Σ wᵢ · drop-and-rescale(modelᵢ − base)    density=0.1, scale=1,
                        (Yu et al., 2024), seeded per tensor                     seed=0
    ``slerp``           spherical interpolation of two models at ``t``; linear   t=0.5
                        when they are nearly colinear
    ==================  =======================================================  ===================

    Any numeric option may instead be ``{selector: value}`` over the state-dict keys, applied
    in order (e.g. ``t={"**.attn.**": 0.3, "**.mlp.**": 0.7}``); unmatched keys keep the
    default. ``select=`` restricts merging to those keys; the others come from ``base`` (or the
    first model). Integer and bool tensors (``num_batches_tracked``) are copied, never
    averaged. Tied tensors are merged once and stay tied. Inputs are never modified;
    ``into=model`` loads the result strictly. Every key, shape or dtype difference is reported
    in one :class:`MergeError`.

    Example:
        >>> import layerwise as lw, torch
        >>> base = {"w": torch.tensor([0.0, 0.0, 0.0])}
        >>> a, b = {"w": torch.tensor([1.0, -2.0, 0.5])}, {"w": torch.tensor([3.0, 1.0, 0.0])}
        >>> lw.merge(base, [a, b], "task_arithmetic", scale=0.5)["w"]
        tensor([ 2.0000, -0.5000,  0.2500])
        >>> lw.merge(base, [a, b], "ties", density=1.0)["w"]   # sign of entry 1 elected negative
        tensor([ 2.0000, -2.0000,  0.5000])
    """
    check_method(method, has_base=base is not None, models=len(models))
    sds = [state_dict_of(m) for m in models]
    base_sd = state_dict_of(base) if base is not None else None
    labelled = ([("base", base_sd)] if base_sd is not None else []) + [(f"model {i}", sd) for i, sd in enumerate(sds)]
    check_compatible([(label, {k: (tuple(t.shape), t.dtype) for k, t in sd.items()}) for label, sd in labelled])

    keys = list(sds[0])
    w, per_key, chosen = merge_plan(method, keys, len(sds), weights, options, select)
    fallback = base_sd if base_sd is not None else sds[0]

    result: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for group in _alias_groups([sd for _, sd in labelled], keys):
            k = group[0]
            if k in chosen:
                out = merge_tensors(method, [sd[k] for sd in sds], base_sd[k] if base_sd is not None else None,
                                    w, per_key[k], key=k)
            else:
                out = fallback[k].clone()
            for alias in group:
                result[alias] = out
    result = {k: result[k] for k in keys}
    if into is not None:
        into.load_state_dict(result, strict=True)
    return result


def average(models: Sequence[ModelLike], weights: Sequence[float] | None = None, *,
            into: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The (weighted) mean of several models' parameters and buffers, as a new state dict.

    Floating tensors are averaged in float32 or wider and cast back to their dtype; integer
    and bool tensors (``num_batches_tracked``) are copied from the first model. Weights are
    normalized to sum 1. Models that differ raise one :class:`MergeError` listing every
    difference. ``into=model`` loads the result with ``strict=True``; tied parameters stay tied.

    Example:
        >>> import layerwise as lw, torch
        >>> a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
        >>> third = torch.nn.Linear(2, 1)
        >>> avg = lw.average([a, b], into=third)
        >>> torch.allclose(third.weight, (a.weight + b.weight) / 2)
        True
    """
    return merge(None, models, "linear", weights=weights, into=into)


# --------------------------------------------------------------------------- greedy soup


def greedy_soup(candidates: Sequence[ModelLike], evaluate: Callable[[nn.Module], float], model: nn.Module,
                ) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Greedy model soup (Wortsman et al., 2022): average fine-tuned models while it helps.

    Scores every candidate alone with ``evaluate(model)`` (higher is better; a held-out
    metric), then walks them from best to worst and keeps a candidate in the uniform soup
    only if the soup's score does not drop. ``model`` is the vessel the candidates are loaded
    into for evaluation and ends holding the soup; it may be one of the candidates, whose
    weights are then copied first. Returns the soup's state dict and the chosen candidates'
    indices in the order they joined.

    Example:
        >>> import layerwise as lw, torch
        >>> nets = [torch.nn.Linear(1, 1, bias=False) for _ in range(3)]
        >>> for net, w in zip(nets, [1.0, 3.0, 10.0]):
        ...     torch.nn.init.constant_(net.weight, w)  # doctest: +ELLIPSIS
        Parameter ...
        >>> score = lambda m: -abs(m.weight.item() - 2.0)   # the best weight is 2
        >>> soup, chosen = lw.greedy_soup(nets, score, torch.nn.Linear(1, 1, bias=False))
        >>> chosen, soup["weight"].item()
        ([0, 1], 2.0)
    """
    if not candidates:
        raise MergeError("greedy_soup needs at least one candidate")
    vessel = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    # A candidate that is the vessel (or shares its memory) would be overwritten by the first load.
    sds = [{k: t.clone() for k, t in sd.items()} if any(t.untyped_storage().data_ptr() in vessel for t in sd.values())
           else sd for sd in map(state_dict_of, candidates)]
    check_compatible([(f"candidate {i}", {k: (tuple(t.shape), t.dtype) for k, t in sd.items()}) for i, sd in enumerate(sds)])

    def score(state: StateDict) -> float:
        model.load_state_dict(state, strict=True)
        return float(evaluate(model))

    alone = [score(sd) for sd in sds]
    order = sorted(range(len(sds)), key=lambda i: -alone[i])
    chosen, best = [order[0]], alone[order[0]]
    soup = {k: t.clone() for k, t in sds[order[0]].items()}
    for i in order[1:]:
        trial = average([sds[j] for j in chosen + [i]])
        s = score(trial)
        if s >= best:
            chosen, best, soup = chosen + [i], s, trial
    model.load_state_dict(soup, strict=True)
    return soup, chosen
