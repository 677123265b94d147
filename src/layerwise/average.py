"""Averaging and merging models in memory: every merge method, greedy soup (EMA: ``ema.py``).

The methods themselves live in the private merge engine: ``_merge_methods`` (the registry),
``_merge_options`` (per-tensor option values) and ``_merge_math`` (the per-tensor math).
``checkpoint.merge_files`` streams files through the same engine, so a file equals the
in-memory result.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ._files import parse_dtype
from ._merge_math import merge_tensor, promoted_dtype
from ._merge_methods import METHODS, REQUIRED, check_method
from ._merge_options import merge_plan
from ._model_state import full_tensors, is_dtensor, laid_out_as
from ._tensors import alias_key
from .errors import MergeError, OptionTypeError
from .select import Selector

__all__ = ["average", "greedy_soup", "merge"]

StateDict = Mapping[str, torch.Tensor]
ModelLike = nn.Module | StateDict


# --------------------------------------------------------------------------- checks


def state_dict_of(model: ModelLike) -> StateDict:
    """A model's state dict; a sharded one's (FSDP2, DTensor) full tensors, every rank calling (a collective)."""
    if isinstance(model, nn.Module):
        state = model.state_dict(keep_vars=True)  # the parameters themselves: tied ones are one object
        state = full_tensors(state) if any(map(is_dtensor, state.values())) else model.state_dict()
    elif isinstance(model, Mapping) and all(isinstance(t, torch.Tensor) for t in model.values()):
        state = full_tensors(model) if any(map(is_dtensor, model.values())) else model
    else:
        raise MergeError(f"expected an nn.Module or a state dict of tensors, got {type(model).__name__}")
    meta = next((k for k, t in state.items() if t.device.type == "meta"), None)
    if meta is not None:  # shapes without values: the merge would fail reading them
        raise MergeError(f"{meta!r} is on the meta device (a shape without values): materialize the model first "
                         "(model.to_empty(device='cpu') and load its weights)")
    return state


def _same_kind(a: torch.dtype, b: torch.dtype) -> bool:
    return a == b or (a.is_floating_point and b.is_floating_point)


def check_compatible(specs: Sequence[tuple[str, Mapping[str, tuple[tuple[int, ...], torch.dtype]]]], *,
                     mixed_floats: bool = False) -> None:
    """Raise one :class:`MergeError` listing every key, shape and dtype difference to the first spec.

    ``specs`` are ``(label, {key: (shape, dtype)})``, from tensors or from file headers. With
    ``mixed_floats`` floating dtypes may differ (a merge promotes them).
    """
    (ref_label, ref), problems = specs[0], []
    same_dtype = _same_kind if mixed_floats else (lambda a, b: a == b)
    for label, spec in specs[1:]:
        missing = [k for k in ref if k not in spec]
        extra = [k for k in spec if k not in ref]
        if missing:
            problems.append(f"{label} lacks {len(missing)} key(s) of {ref_label}: {', '.join(missing)}")
        if extra:
            problems.append(f"{label} has {len(extra)} key(s) {ref_label} lacks: {', '.join(extra)}")
        for key in ref:
            if key in spec:
                if tuple(ref[key][0]) != tuple(spec[key][0]):
                    problems.append(f"{key}: shape {tuple(ref[key][0])} in {ref_label} but {tuple(spec[key][0])} "
                                    f"in {label}")
                if not same_dtype(ref[key][1], spec[key][1]):
                    problems.append(f"{key}: dtype {ref[key][1]} in {ref_label} but {spec[key][1]} in {label}")
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


# --------------------------------------------------------------------------- merge and average


def _alias_groups(state_dicts: Sequence[StateDict], keys: Sequence[str]) -> list[list[str]]:
    """Keys that are one tensor in every input (tied weights): merged once, stored once."""
    groups: dict[object, list[str]] = {}
    for k in keys:
        signature = tuple(alias_key(sd[k]) for sd in state_dicts)
        groups.setdefault(signature if None not in signature else ("unique", k), []).append(k)
    return list(groups.values())


def _check_into(into: nn.Module, result: StateDict) -> None:
    """Everything ``load_state_dict(strict=True)`` would refuse, before it writes the first tensor."""
    if not isinstance(into, nn.Module):
        raise MergeError(f"into= takes an nn.Module to load the result into, not {type(into).__name__}")
    target = into.state_dict()
    try:
        check_compatible([("the merged models", {k: (tuple(t.shape), t.dtype) for k, t in result.items()}),
                          ("into", {k: (tuple(t.shape), t.dtype) for k, t in target.items()})], mixed_floats=True)
    except MergeError as e:
        raise MergeError(f"into={type(into).__name__} cannot hold the result, nothing was loaded: {e}") from None


def merge(base: ModelLike | None, models: Sequence[ModelLike], method: str = "linear", *,
          weights: Sequence[Any] | None = None, select: Sequence[Selector] | Selector | None = None,
          into: nn.Module | None = None, compute_dtype: torch.dtype | str | None = None,
          dtype: torch.dtype | str | None = None,
          model_options: Sequence[Mapping[str, Any]] | None = None, **options: Any) -> dict[str, torch.Tensor]:
    """Merge ``models`` (modules or state dicts) into a new state dict with any of mergekit's methods.

    METHODS_TABLE

    Option names are mergekit's; ``weights=[...]`` gives each model's ``weight``,
    ``model_options=[{...}, ...]`` any per-model option of one model (it overrides the value
    given for all). Any option may be a scalar, a list of numbers interpolated across the layer
    index (mergekit's gradient: ``t=[0, 0.5, 1]``), a list of ``{"filter": substring, "value": v}``
    rules (the first whose filter is in the key wins), or ``{selector: value}`` (later entries
    override). ``lambda`` is also spelled ``scale`` (layerwise 0.1) or ``lambda_``.

    Defaults give mergekit 0.1.5's numbers. ``convention="layerwise"`` keeps layerwise 0.1's: TIES
    keeps every entry tied at the trim threshold and elects no sign where the weighted sum is zero;
    SLERP with a zero tensor interpolates linearly. ``rescale="density"`` gives DARE's paper's
    1/density rescaling instead of mergekit's norm-preserving one.

    Floating tensors are computed in ``compute_dtype`` (default float32, or wider when an input
    is) and returned in ``dtype`` (default: the inputs' promoted dtype); mixed float dtypes are
    promoted. ``select=`` restricts merging to those keys; the others come from ``base`` (or the
    first model). Integer and bool tensors (``num_batches_tracked``) are copied, never averaged.
    Tied tensors are merged once and stay tied. Inputs are never modified; ``into=model`` loads
    the result strictly, after checking that it fits (a failed call leaves ``into`` untouched).
    Every key, shape or dtype difference is reported in one :class:`MergeError`. Sharded (FSDP2)
    models are gathered whole on every rank, so every rank calls (a collective); ``into=`` an
    FSDP2 model keeps on each rank its shards of the result.

    Example:
        >>> import layerwise as lw, torch
        >>> base = {"w": torch.tensor([0.0, 0.0, 0.0])}
        >>> a, b = {"w": torch.tensor([1.0, -2.0, 0.5])}, {"w": torch.tensor([3.0, 1.0, 0.0])}
        >>> lw.merge(base, [a, b], "task_arithmetic", scale=0.5)["w"]
        tensor([ 2.0000, -0.5000,  0.2500])
        >>> lw.merge(base, [a, b], "ties")["w"]   # sign of entry 1 elected negative
        tensor([ 2.0000, -2.0000,  0.5000])
        >>> ones = {f"layers.{i}.w": torch.ones(1) for i in range(3)}
        >>> threes = {k: torch.full((1,), 3.0) for k in ones}
        >>> lw.merge(None, [ones, threes], "slerp", t=[0.0, 1.0])   # t from 0 to 1 across the layers
        {'layers.0.w': tensor([1.]), 'layers.1.w': tensor([2.]), 'layers.2.w': tensor([3.])}
    """
    if isinstance(models, (nn.Module, Mapping)) or not isinstance(models, Sequence):
        raise MergeError(f"models must be a list of modules or state dicts, not {type(models).__name__}")
    m = check_method(method, has_base=base is not None, models=len(models))
    dtype, compute_dtype = parse_dtype(dtype), parse_dtype(compute_dtype, "compute_dtype")
    sds = [state_dict_of(x) for x in models]
    base_sd = state_dict_of(base) if base is not None else None
    labelled = ([("base", base_sd)] if base_sd is not None else []) + [(f"model {i}", sd) for i, sd in enumerate(sds)]
    check_compatible([(label, {k: (tuple(t.shape), t.dtype) for k, t in sd.items()}) for label, sd in labelled],
                     mixed_floats=True)

    keys = list(sds[0])
    per_key, chosen = merge_plan(m, keys, len(sds), weights=weights, options=options, model_options=model_options,
                                 select=select)
    fallback = base_sd if base_sd is not None else sds[0]

    result: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for group in _alias_groups([sd for _, sd in labelled], keys):
            k = group[0]
            if k in chosen:
                out = merge_tensor(m, [sd[k] for sd in sds], base_sd[k] if base_sd is not None else None,
                                   per_key[k], compute_dtype, key=k, dtype=dtype)
            elif fallback[k].is_floating_point():  # the dtype the merged tensors get
                out = fallback[k].to(dtype or promoted_dtype([sd[k].dtype for _, sd in labelled], k), copy=True)
            else:
                out = fallback[k].clone()
            for alias in group:
                result[alias] = out
    result = {k: result[k] for k in keys}
    if into is not None:
        _check_into(into, result)
        own = into.state_dict()
        into.load_state_dict({k: laid_out_as(own[k], v) for k, v in result.items()}, strict=True)
    return result


def _methods_table() -> str:
    rows = [(f"``{m.name}``", m.summary + (" (needs a base)" if m.base == "required" else ""),
             ", ".join(f"{o.name}{'ᵢ' if o.per_model else ''}={'…' if o.default is REQUIRED else o.default}"
                       for o in m.options)) for m in METHODS.values()]
    widths = [max(len(r[i]) for r in rows + [("method", "result per floating tensor", "options")]) for i in range(3)]
    rule = "  ".join("=" * w for w in widths)
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n    ".join([rule, line(("method", "result per floating tensor", "options")), rule,
                          *map(line, rows), rule])


merge.__doc__ = merge.__doc__.replace("METHODS_TABLE", _methods_table())  # the registry is the one source


def average(models: Sequence[ModelLike], weights: Sequence[float] | None = None, *,
            into: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The (weighted) mean of several models' parameters and buffers, as a new state dict.

    Floating tensors are averaged in float32 or wider and cast back to their dtype; integer
    and bool tensors (``num_batches_tracked``) are copied from the first model. Weights are
    normalized to sum 1. Models that differ raise one :class:`MergeError` listing every
    difference. ``into=model`` loads the result with ``strict=True`` after checking it fits (a
    failed call leaves ``into`` as it was); tied parameters stay tied.

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
    if not callable(evaluate):
        raise OptionTypeError(f"greedy_soup: evaluate must be a callable model -> score, got {type(evaluate).__name__}")
    vessel = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    # A candidate that is the vessel (or shares its memory) would be overwritten by the first load.
    sds = [{k: t.clone() for k, t in sd.items()} if any(t.untyped_storage().data_ptr() in vessel for t in sd.values())
           else sd for sd in map(state_dict_of, candidates)]
    check_compatible([(f"candidate {i}", {k: (tuple(t.shape), t.dtype) for k, t in sd.items()}) for i, sd in enumerate(sds)])

    def score(state: StateDict, what: str) -> float:
        model.load_state_dict(state, strict=True)
        value = evaluate(model)
        try:
            number = float(value)
        except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several elements
            number = math.nan
        if math.isnan(number):  # it would order nothing: every comparison with nan is False
            raise MergeError(f"greedy_soup: evaluate returned {value!r:.100} for {what}; it must return a number "
                             "(higher is better), and the model is as it was")
        return number

    # A failed evaluation (or a raising one) leaves the vessel holding what it held, not a candidate.
    held = {k: t.detach().clone() for k, t in model.state_dict().items()}
    try:
        alone = [score(sd, f"candidate {i}") for i, sd in enumerate(sds)]
        order = sorted(range(len(sds)), key=lambda i: -alone[i])
        chosen, best = [order[0]], alone[order[0]]
        soup = {k: t.clone() for k, t in sds[order[0]].items()}
        for i in order[1:]:
            trial = average([sds[j] for j in chosen + [i]])
            s = score(trial, f"the soup of candidates {chosen + [i]}")
            if s >= best:
                chosen, best, soup = chosen + [i], s, trial
    except BaseException:
        model.load_state_dict(held, strict=True)
        raise
    model.load_state_dict(soup, strict=True)
    return soup, chosen
