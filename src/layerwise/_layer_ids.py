"""Layer ids for layer-wise LR decay: from a block pattern, or from a timm ``group_matcher()``.

Both return ``{name: layer_id}`` for the trainable parameters (first name of each), ids
counted from 0 (embeddings, stem) to the top (head). The scale of a layer is
``decay ** (top - layer_id)``, the convention of BEiT and timm's ``param_groups_layer_decay``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import chain
from typing import Any

from torch import nn

from .errors import OptionError, SelectionError
from .select import Selector, Walk, parse, path_prefix, resolve

MATCH_PREV_GROUP = 99999.0  # timm: an ordinal ending in this joins the group before it (a ViT's final norm)

__all__ = ["layer_ids"]


def layer_ids(model: nn.Module, layers: Selector | None, trainable: Sequence[str]) -> tuple[dict[str, int], int]:
    """The layer id of each name in ``trainable`` and the top id (whose scale is 1).

    From ``layers=`` (BEiT: top L + 1 even without a head), else the model's ``group_matcher()``
    (timm: the top is the largest id).
    """
    if layers is not None:
        return _from_blocks(model, layers, set(trainable))
    matcher = getattr(model, "group_matcher", None)
    if not callable(matcher):
        raise OptionError(f"layer-wise LR decay needs the blocks: pass layers=<block pattern> (e.g. layers='blocks.*'); "
                          f"{type(model).__name__} has no timm-style group_matcher() to read them from")
    ids = _from_matcher(matcher(coarse=False), trainable, f"{type(model).__name__}.group_matcher()")
    fallen = unmatched_before_blocks(model, list(trainable))
    if fallen:
        warnings.warn(f"{', '.join(fallen)} match{'es' * (len(fallen) == 1)} no rule of {type(model).__name__}.group_matcher() although blocks "
                      "follow: as in timm, the head's lr (timm #2712's reg_token). Add to the stem's rule, or set "
                      "the lr with a rule", stacklevel=3)
    return ids, max(ids.values(), default=0)


def unmatched_before_blocks(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Names (in model order) that no rule of the model's ``group_matcher()`` matches although a
    matched name follows them: they fall back to the head's layer (timm #2712's ``reg_token``)."""
    matcher = getattr(model, "group_matcher", None)
    spec = matcher(coarse=False) if callable(matcher) else None
    if not isinstance(spec, Mapping):
        return []
    ordinal = _ordinal(spec, f"{type(model).__name__}.group_matcher()")
    matched = [ordinal(n)[0] != float("inf") for n in names]
    last = max((i for i, m in enumerate(matched) if m), default=-1)
    return [n for i, (n, m) in enumerate(zip(names, matched)) if not m and i < last]


def _from_matcher(spec: Any, names: Sequence[str], where: str) -> dict[str, int]:
    """timm's ``group_with_matcher``: ordinals per name, sorted, renumbered; ``(…, 99999)`` joins the group before.

    Only trainable names are numbered, so a frozen module (an EMA copy, a frozen stem) shifts no
    trained layer's scale (timm #2691 counts frozen ones, and scales every trained layer down).
    """
    ordinal = _ordinal(spec, where)
    keys = {name: ordinal(name) for name in names}
    ids: dict[tuple[float, ...], int] = {}
    lid = -1
    for key in sorted(set(keys.values())):
        lid += 0 if lid >= 0 and key[-1] == MATCH_PREV_GROUP else 1
        ids[key] = lid
    return {name: ids[key] for name, key in keys.items()}


def _ordinal(spec: Any, where: str) -> Callable[[str], tuple[float, ...]]:
    """timm's ordinal of a name: (group index, *regex groups, *suffix) of the first rule that matches.

    ``spec`` is what timm's ``group_with_matcher`` takes: ``{group: regex or [(regex, suffix), ...]}``,
    its compiled form ``[(regex, prefix, suffix), ...]``, or a callable ``name -> ordinal``.
    """
    def numbers(name: str, parts: Iterable[Any]) -> tuple[float, ...]:
        parts = tuple(parts)
        try:
            return tuple(map(float, parts))
        except (TypeError, ValueError):  # a None, a word: timm's sort would fail on them too
            raise OptionError(f"{where} gives {name!r} the ordinal {tuple(parts)!r}; layer decay sorts numbers: "
                              "give numeric regex groups such as r'^blocks\\.(\\d+)', or numbers") from None

    if callable(spec):
        def from_callable(name: str) -> tuple[float, ...]:
            value = spec(name)
            return numbers(name, value if isinstance(value, Iterable) and not isinstance(value, str) else (value,))
        return from_callable
    if isinstance(spec, Mapping):
        rules = []
        for group, (_, pattern) in enumerate(spec.items()):
            if pattern is not None:
                pairs = pattern if isinstance(pattern, (tuple, list)) else [(pattern, None)]
                rules += [(regex, (group,), suffix) for regex, suffix in _pairs(pairs, where)]
    elif isinstance(spec, (tuple, list)) and all(isinstance(r, (tuple, list)) and len(r) == 3 for r in spec):
        rules = list(spec)
    else:
        raise OptionError(f"{where} returned {type(spec).__name__} {spec!r:.80}; timm's form is a dict "
                          "{group: regex or [(regex, suffix), ...]}, a list of (regex, prefix, suffix) or a callable")
    try:
        rules = [(re.compile(regex), prefix, suffix) for regex, prefix, suffix in rules]
    except (re.error, TypeError) as e:
        raise OptionError(f"{where}: a rule's pattern is not a regular expression ({e})") from None

    def from_rules(name: str) -> tuple[float, ...]:
        for regex, prefix, suffix in rules:
            found = regex.match(name)  # re.match, as timm: anchored at the start only
            if found:
                return numbers(name, chain.from_iterable(filter(None, (prefix, found.groups(), suffix))))
        return (float("inf"),)  # matched by no rule: the head (and timm #2712's forgotten reg_token)
    return from_rules


def _pairs(pairs: Sequence[Any], where: str) -> list[tuple[Any, Any]]:
    """A group's ``[(regex, suffix), ...]``, as timm unpacks it: a bare pattern in the list is refused by name
    (unpacked, a two-letter pattern would pass as a regex and a suffix)."""
    if not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pairs):
        raise OptionError(f"{where}: a group's list holds (regex, suffix) pairs, e.g. [(r'^blocks\\.(\\d+)', None), "
                          f"(r'^norm', (99999,))]; got {list(pairs)!r:.80}")
    return [tuple(p) for p in pairs]


def _from_blocks(model: nn.Module, layers: Selector, trainable: set[str]) -> tuple[dict[str, int], int]:
    """Blocks 1..L in model order; before the first 0; between two blocks the later one's; the
    final norm right after the last L; the rest L + 1."""
    if not isinstance(layers, str) or parse(layers).kind == "re":
        raise SelectionError(f"layers={layers!r} must be a module path pattern like 'encoder.layers.*' "
                             "or a type selector like 'type:TransformerEncoderLayer'")
    walk = Walk(model)
    if parse(layers).kind == "type":
        blocks: list[str] = []  # each outermost module of that type is one block
        for path, _ in resolve(walk, layers, missing_ok=True).modules:
            if not any(path.startswith(b + ".") for b in blocks):
                blocks.append(path)

        def block(name: str) -> str | None:
            return next((b for b in blocks if name.startswith(b + ".")), None)
    else:
        def block(name: str) -> str | None:
            return path_prefix(layers, name)

    everything = resolve(walk).selection()
    norms = {id(p) for _, p in resolve(walk, "type:norm", missing_ok=True).groups}
    order: dict[str, int] = {}
    assigned: list[tuple[str, int | None, bool]] = []
    for names, p in zip(everything.aliases(), everything.params()):
        key = next((b for b in map(block, names) if b is not None), None)
        if key is not None and key not in order:
            order[key] = len(order) + 1
        assigned.append((names[0], order.get(key) if key is not None else None, id(p) in norms))
    if not order:
        raise SelectionError(f"layers={layers!r} matches no numbered blocks of {type(model).__name__}; "
                             "give the pattern of the repeated blocks, e.g. 'encoder.layers.*' or 'blocks.*'")
    top = len(order)
    # The final norm is a sibling of the blocks' container (ViT's norm, ConvNeXt's norm_pre, a
    # Llama's model.norm); a norm inside the head (ConvNeXt's head.norm) stays with the head, as in timm.
    paths = [k.split(".") for k in order]
    common: list[str] = []
    for segments in zip(*paths):
        if len(set(segments)) > 1:
            break
        common.append(segments[0])
    container = paths[0][:-1] if len(paths) == 1 else common  # e.g. blocks, stages, model.layers
    outer = ".".join(container[:-1])
    ids: dict[str, int] = {}
    seen, after_top = 0, False
    for name, layer, is_norm in assigned:
        if layer is not None:
            seen, after_top = layer, False
        elif seen == top and not after_top and is_norm and _final_norm(name, outer):
            layer = top  # the final norm closes the last block (timm's MATCH_PREV_GROUP)
        else:
            after_top = seen == top
            # Before the first block: embeddings (0). Between blocks (a stage's downsample): the block
            # after, as timm's staged models number them. After the last: the head.
            layer = 0 if seen == 0 else top + 1 if seen == top else seen + 1
        if name in trainable:
            ids[name] = layer
    return ids, top + 1


def _final_norm(name: str, outer: str) -> bool:
    """A norm parameter right after the last block that closes it: one of a sibling of the blocks'
    container, but a pooled-feature ``fc_norm`` (global-pool ViTs), which timm and MAE leave in the head."""
    module, _, _ = name.rpartition(".")
    parent, _, last = module.rpartition(".")
    return parent == outer and last != "fc_norm"
