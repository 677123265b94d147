"""Merge options per tensor: one resolver for scalars, gradients, filter rules and selector maps.

A setting (the value given for one option) is one of:

- a scalar (number, bool, string): the same everywhere;
- a list of numbers, a mergekit "gradient": interpolated at the tensor's position
  ``t = layer_index / (num_layers - 1)`` in its layer stack, ``t = 0`` outside any stack;
- a list of ``{"filter": substring, "value": setting}`` rules (mergekit): the first rule whose
  filter is a substring of the tensor name wins; a rule without filter (or ``"*"``) matches all;
- a ``{selector: setting}`` map (layerwise): later entries override earlier ones.

:func:`value_at` resolves one setting for one tensor (the recipes call it with the position
of a sliced layer); :func:`resolve_options` resolves and checks every option of a method for
every key. Imports no torch unless a selector map must be matched.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ._merge_methods import ALIASES, REQUIRED, Method
from .errors import MergeError

UNSET = object()  # no rule of a setting applies to this tensor: the default does
_SCALARS = (int, float, bool, str)
_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_positions(keys: Sequence[str]) -> dict[str, float]:
    """mergekit's ``t`` of each key: ``i / (n - 1)`` for the ``i``-th of ``n`` layers of the stack the key
    is in (keys sharing the text before their first numeric segment), 1 in a stack of one layer (as
    mergekit's planner), 0 outside any stack.

    Example:
        >>> layer_positions(["embed.weight", "layers.0.w", "layers.1.w", "layers.2.w", "head.weight"])
        {'embed.weight': 0.0, 'layers.0.w': 0.0, 'layers.1.w': 0.5, 'layers.2.w': 1.0, 'head.weight': 0.0}
    """
    found = {k: m for k in keys if (m := _INDEX.search(k))}
    count: dict[str, int] = {}
    for m in found.values():
        count[m.string[:m.start(1)]] = max(count.get(m.string[:m.start(1)], 0), int(m.group(1)) + 1)
    out = {}
    for k in keys:
        m = found.get(k)
        n = count[k[:m.start(1)]] if m else 1
        out[k] = (int(m.group(1)) / (n - 1) if n > 1 else 1.0) if m else 0.0
    return out


def _is_rule_list(setting: Any) -> bool:
    return isinstance(setting, (list, tuple)) and bool(setting) and all(isinstance(r, Mapping) for r in setting)


def _gradient(setting: Sequence[Any], t: float) -> Any:
    """mergekit's ``evaluate_setting`` for a list: numbers interpolate, other scalars step."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return setting[i0] if frac == 0 else (1 - frac) * setting[i0] + frac * setting[i1]
    return setting[int(t * (len(setting) - 1))]


def compile_setting(setting: Any, keys: Sequence[str], where: str) -> Callable[[str, float], Any]:
    """``setting`` as a function ``(key, t) -> value`` (``UNSET`` where no rule applies). Selector maps are
    matched against ``keys`` once, here; a selector matching none of them is a SelectionError."""
    if setting is None or isinstance(setting, _SCALARS):
        return lambda key, t: setting
    if _is_rule_list(setting):
        rules = []
        for rule in setting:
            unknown = set(rule) - {"filter", "value"}
            if unknown or "value" not in rule:
                raise MergeError(f"{where}: a rule is {{filter: text, value: setting}}, not {dict(rule)!r}")
            flt = rule.get("filter")
            if flt is not None and not isinstance(flt, str):
                raise MergeError(f"{where}: a rule's filter is a substring of tensor names, not {flt!r}")
            rules.append((flt, compile_setting(rule["value"], keys, where)))

        def first_rule(key: str, t: float) -> Any:
            for flt, value in rules:
                if flt is None or flt == "*" or flt in key:
                    return value(key, t)
            return UNSET
        return first_rule
    if isinstance(setting, (list, tuple)):
        if not setting or not all(isinstance(v, _SCALARS) for v in setting):
            raise MergeError(f"{where}: a list is a gradient of numbers (e.g. [0, 0.5, 1]) or a list of "
                             f"{{filter, value}} rules, not {list(setting)!r}")
        return lambda key, t: _gradient(setting, t)
    if isinstance(setting, Mapping):
        from .select import Walk, select_keys

        names = Walk(keys)  # one walk of the keys for every selector of the map
        entries = [(set(select_keys(names, selector)), compile_setting(v, keys, where))
                   for selector, v in setting.items()]

        def last_selector(key: str, t: float) -> Any:
            out = UNSET
            for chosen, value in entries:
                if key in chosen and (v := value(key, t)) is not UNSET:
                    out = v
            return out
        return last_selector
    raise MergeError(f"{where}: a setting is a scalar, a list (gradient or filter rules) or a {{selector: value}} "
                     f"map, not {type(setting).__name__}")


def value_at(setting: Any, key: str, t: float = 0.0, keys: Sequence[str] | None = None) -> Any:
    """The value of one setting for tensor ``key`` at layer position ``t`` (``UNSET`` if no rule applies);
    selector maps are matched against ``keys`` (default: just ``key``, no match required).

    Example:
        >>> value_at([0.0, 0.5, 1.0], "layers.3.w", t=0.75)
        0.75
        >>> value_at([{"filter": "attn", "value": 0.2}, {"value": 0.9}], "layers.0.mlp.w")
        0.9
    """
    if keys is None and isinstance(setting, Mapping):
        from .select import select_keys

        setting = {s: v for s, v in setting.items() if select_keys([key], s, missing_ok=True)}
    return compile_setting(setting, [key] if keys is None else keys, f"option for {key}")(key, t)


def _canonical(method: Method, options: Mapping[str, Any]) -> dict[str, Any]:
    names = {o.name for o in method.options}
    out: dict[str, Any] = {}
    given: dict[str, str] = {}  # the name each option was given by, for the message
    for name, value in options.items():
        real = ALIASES.get(name, name) if name not in names else name
        if real not in names:
            raise MergeError(f"method {method.name!r} takes no option {name!r}; its options are "
                             f"{', '.join(sorted(names)) or 'none'} (see `layerwise merge --help`)")
        if real in out:
            raise MergeError(f"{method.name}: {given[real]!r} and {name!r} are the same option; give one")
        given[real] = name
        out[real] = value
    return out


def resolve_options(method: Method, keys: Sequence[str], models: int, *, weights: Sequence[Any] | None = None,
                    options: Mapping[str, Any] | None = None,
                    model_options: Sequence[Mapping[str, Any]] | None = None,
                    positions: Mapping[str, float] | None = None) -> dict[str, dict[str, Any]]:
    """Every option of ``method`` for every key, checked: globals as values, per-model options as tuples.

    ``weights`` are the per-model ``weight`` settings; ``options`` apply to every model;
    ``model_options[i]`` override them for model ``i``. ``positions`` default to
    :func:`layer_positions`. Every bad value is named with its key and option.
    """
    if not isinstance(options or {}, Mapping):
        raise MergeError(f"options must be a mapping of option names to values, not {type(options).__name__}")
    options = _canonical(method, options or {})
    if model_options is not None and (isinstance(model_options, (str, bytes, Mapping)) or not isinstance(
            model_options, Sequence) or not all(isinstance(mo, Mapping) for mo in model_options)):
        raise MergeError("model_options must be a list with one {option: value} mapping per model, "
                         f"not {model_options!r}")
    model_options = [_canonical(method, mo) for mo in (model_options or [{}] * models)]
    if len(model_options) != models:
        raise MergeError(f"got options for {len(model_options)} models, but {models} models")
    if weights is not None:
        if hasattr(weights, "tolist") and not isinstance(weights, (list, tuple)):  # a tensor or a NumPy array
            weights = weights.tolist()
        if isinstance(weights, (str, bytes, Mapping)) or not isinstance(weights, Sequence):
            raise MergeError(f"weights must be a list with one weight per model, not {weights!r}")
        if len(weights) != models:
            raise MergeError(f"got {len(weights)} weights for {models} models; give one weight per model")
        if not any(o.name == "weight" for o in method.options):
            raise MergeError(f"{method.name} takes no weights (its options are "
                             f"{', '.join(o.name for o in method.options) or 'none'})")
        for mo, w in zip(model_options, weights):
            mo.setdefault("weight", w)
    globals_, per_model = [o for o in method.options if not o.per_model], [o for o in method.options if o.per_model]
    for mo in model_options:
        bad = [name for name in mo if name not in {o.name for o in per_model}]
        if bad:
            raise MergeError(f"{method.name}: {', '.join(bad)} apply to all models, not to one; "
                             f"per-model options are {', '.join(o.name for o in per_model) or 'none'}")
    positions = layer_positions(keys) if positions is None else positions

    def compiled(o: Any, setting: Any, who: str) -> Callable[[str, float], Any]:
        return compile_setting(setting, keys, f"{method.name} option {o.name}{who}")

    plan = [(o, None, compiled(o, options[o.name], "") if o.name in options else None) for o in globals_]
    for o in per_model:
        for i, mo in enumerate(model_options):
            given = mo.get(o.name, options.get(o.name, UNSET))
            plan.append((o, i, compiled(o, given, f" of model {i}") if given is not UNSET else None))
    out = {}
    for key in keys:
        t = positions.get(key, 0.0)
        values: dict[str, Any] = {o.name: [None] * models for o in per_model}
        for o, i, setting in plan:
            v = UNSET if setting is None else setting(key, t)
            if v is UNSET:
                v = o.default
            if v is REQUIRED:
                raise MergeError(f"{method.name} needs the option {o.name} ({o.help}); none was given for {key}")
            complaint = o.check(v)
            if complaint:
                who = "" if i is None else f" of model {i}"
                raise MergeError(f"{method.name} option {o.name}={v!r}{who} for {key} {complaint}")
            if i is None:
                values[o.name] = v
            else:
                values[o.name][i] = v
        out[key] = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        _check_together(method, key, out[key])
    return out


def _check_together(method: Method, key: str, o: Mapping[str, Any]) -> None:
    """Checks across options: a normalized sum of weights that is zero or overflows; DELLA's window."""
    if "weight" in o:
        if not math.isfinite(sum(abs(w) for w in o["weight"])):
            raise MergeError(f"{method.name} weights {list(o['weight'])} for {key} overflow when summed; "
                             "scale them down (only their ratios matter to a normalized merge)")
        divided = method.name == "karcher" or (method.name == "linear" and o["normalize"])
        if divided and math.fsum(o["weight"]) == 0:
            raise MergeError(f"{method.name} weights {list(o['weight'])} for {key} sum to zero; give weights with a "
                             "non-zero sum (they are divided by it)")
    if "epsilon" in o:
        for i, (d, e) in enumerate(zip(o["density"], o["epsilon"])):
            if d < 1 and not (0 < d - e and d + e < 1):
                raise MergeError(f"{method.name}: density={d} ± epsilon={e} of model {i} for {key} must stay "
                                 "inside (0, 1); lower epsilon")


def merge_plan(method: Method, keys: Sequence[str], models: int, *, weights: Sequence[Any] | None = None,
               options: Mapping[str, Any] | None = None, model_options: Sequence[Mapping[str, Any]] | None = None,
               select: Any = None) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """What ``merge`` and ``merge_files`` both decide before touching a tensor: each key's options, and
    the keys to merge (``select``; the rest come from the base or the first model)."""
    from .select import as_selectors, select_keys

    selectors = as_selectors(select)
    chosen = set(select_keys(keys, *selectors)) if selectors else set(keys)
    per_key = resolve_options(method, keys, models, weights=weights, options=options, model_options=model_options)
    return per_key, chosen
