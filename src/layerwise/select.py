"""Selectors: one small language that addresses the parameters of a model.

==================  ==========================================================================
form                meaning
==================  ==========================================================================
``lstm``            every parameter under module ``lstm`` (a module path selects its subtree)
``lstm.bias_ih_l0`` one parameter
``*``               exactly one name segment: ``layers.*.attn``; inside a segment, any text
                    without dots: ``weight_*``
``**``              any number of segments, zero included: ``**.bias``, ``encoder.**``
``[0-5]``           a numeric segment in a range (inclusive) or a list: ``layers.[0-5]``,
``[1,3,7]``         ``layers.[1,3,7]``
``re:PATTERN``      Python regex, full match against the parameter name
``type:NAME``       parameters of modules of that class (or subclasses), or of a family:
                    ``norm``, ``embedding``, ``linear``, ``conv``, ``rnn``
``!SELECTOR``       remove what it matches from the union of the positive selectors
==================  ==========================================================================

A selector may also be an ``nn.Module`` subclass (like ``type:``) or a callable
``(name, param) -> bool``. Strings match the names of
``named_parameters(remove_duplicate=False)``, so a shared parameter is reachable through
each of its names; it is selected when any of its names matches and removed by a negation
when any of its names matches.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ._tensors import named_tensor_groups
from .errors import NotFoundError, SelectionError

__all__ = ["FAMILIES", "Selection", "SelectionError", "Selector", "select", "select_modules"]

Selector = str | type[nn.Module] | Callable[[str, torch.Tensor], bool]


def _is_norm(m: nn.Module) -> bool:
    norms = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm)
    # Libraries define their own norms (LlamaRMSNorm, FrozenBatchNorm2d, LayerNorm2d).
    return isinstance(m, norms) or re.search(r"Norm(\d[dD])?$", type(m).__name__) is not None


#: The ``type:`` families: a name and the test a module passes to belong to it.
FAMILIES: dict[str, Callable[[nn.Module], bool]] = {
    "norm": _is_norm,
    "embedding": lambda m: isinstance(m, (nn.Embedding, nn.EmbeddingBag))
    or type(m).__name__.endswith(("Embedding", "Embeddings")),
    "linear": lambda m: isinstance(m, (nn.Linear, nn.Bilinear)),
    "conv": lambda m: isinstance(m, nn.modules.conv._ConvNd),
    "rnn": lambda m: isinstance(m, (nn.RNNBase, nn.RNNCellBase)),
}


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class _Segment:
    """One dot-separated piece of a path selector."""

    deep: bool = False  # `**`
    pattern: re.Pattern | None = None  # literal text or a `*` glob
    numbers: Callable[[int], bool] | None = None  # `[0-5]` or `[1,3,7]`

    def matches(self, segment: str) -> bool:
        if self.numbers is not None:
            return segment.isdigit() and self.numbers(int(segment))
        return self.pattern.fullmatch(segment) is not None


@dataclass(frozen=True)
class ParsedSelector:
    """A string selector parsed once (cached) into a plain object."""

    text: str
    negate: bool
    kind: str  # "path", "re" or "type"
    segments: tuple[_Segment, ...] = ()
    regex: re.Pattern | None = None
    type_name: str = ""

    @property
    def body(self) -> str:
        return self.text[1:] if self.negate else self.text


def _fail(text: str, start: int, end: int, problem: str, hint: str) -> SelectionError:
    caret = " " * start + "^" * max(1, end - start)
    return SelectionError(f"{problem} in selector {text!r}\n    {text}\n    {caret}\n{hint}")


_RANGE_HINT = "A numeric segment is a range [a-b] with integers a <= b, or a list [i,j,k]: e.g. 'layers.[0-5]'."


def _parse_numbers(text: str, start: int, inner: str) -> Callable[[int], bool]:
    end = start + len(inner) + 2
    range_match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", inner)
    if range_match:
        lo, hi = int(range_match[1]), int(range_match[2])
        if lo > hi:
            raise _fail(text, start, end, f"empty range {lo} > {hi}", _RANGE_HINT)
        return lambda n: lo <= n <= hi
    items = inner.split(",")
    if all(i.strip().isdigit() for i in items):
        wanted = frozenset(int(i) for i in items)
        return wanted.__contains__
    raise _fail(text, start, end, f"bad numeric segment [{inner}]", _RANGE_HINT)


def _parse_path(text: str, offset: int) -> tuple[_Segment, ...]:
    body = text[offset:]
    depth = 0
    for i, char in enumerate(text[offset:], start=offset):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth == 0 and char in ", \t":
            raise _fail(text, i, i + 1, f"unexpected {char!r}",
                        "Pass several selectors as separate arguments: select(model, 'lstm', 'head').")
    segments = []
    pos = offset
    for piece in body.split("."):
        end = pos + len(piece)
        if piece == "":
            raise _fail(text, pos, pos + 1, "empty name segment", "Segments are separated by single dots: 'encoder.layers.0'.")
        if piece == "**":
            segments.append(_Segment(deep=True))
        elif "**" in piece:
            raise _fail(text, pos, end, "'**' inside a segment", "'**' stands alone between dots ('**.bias'); use '*' within a segment ('weight_*').")
        elif "[" in piece or "]" in piece:
            if not (piece.startswith("[") and piece.endswith("]")) or piece.count("[") != 1:
                raise _fail(text, pos, end, "a numeric range must be a whole segment", _RANGE_HINT)
            segments.append(_Segment(numbers=_parse_numbers(text, pos, piece[1:-1])))
        else:
            glob = ".*".join(re.escape(part) for part in piece.split("*")).replace(".*", "[^.]*")
            segments.append(_Segment(pattern=re.compile(glob)))
        pos = end + 1
    return tuple(segments)


@functools.lru_cache(maxsize=4096)
def parse(text: str) -> ParsedSelector:
    """Parse a string selector; raise :class:`SelectionError` quoting it with a caret under the fault."""
    if not isinstance(text, str):
        raise SelectionError(f"a selector string was expected, got {type(text).__name__}: {text!r}")
    if text.strip() == "":
        raise SelectionError(f"empty selector {text!r}: use '**' for every parameter, or a module path like 'encoder'")
    negate = text.startswith("!")
    offset = int(negate)
    if negate and text[1:2] in ("", "!"):
        raise _fail(text, 0, 2, "'!' must be followed by one selector", "Write '!head' to remove what 'head' matches.")
    if text.startswith("re:", offset):
        pattern = text[offset + 3:]
        if not pattern:
            raise _fail(text, offset, offset + 3, "empty regular expression", "Write re:PATTERN, e.g. 're:.*\\.bias'.")
        try:
            regex = re.compile(pattern)
        except re.error as e:
            at = offset + 3 + (e.pos or 0)
            raise _fail(text, at, at + 1, f"invalid regular expression ({e.msg})", "The pattern after 're:' is a Python regex, matched against the whole name.") from None
        return ParsedSelector(text, negate, "re", regex=regex)
    if text.startswith("type:", offset):
        name = text[offset + 5:]
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise _fail(text, offset + 5, len(text), "expected a module class or family name", f"Write type:NAME with NAME a class (type:LSTM) or a family: {', '.join(FAMILIES)}.")
        return ParsedSelector(text, negate, "type", type_name=name)
    return ParsedSelector(text, negate, "path", segments=_parse_path(text, offset))


def _prefix_match_len(segments: Sequence[_Segment], parts: Sequence[str], i: int = 0, j: int = 0) -> int | None:
    """Shortest j such that ``segments[i:]`` matches ``parts[...:j]``; the rest of the name is the subtree."""
    if i == len(segments):
        return j
    seg = segments[i]
    if seg.deep:
        for k in range(j, len(parts) + 1):
            end = _prefix_match_len(segments, parts, i + 1, k)
            if end is not None:
                return end
        return None
    if j < len(parts) and seg.matches(parts[j]):
        return _prefix_match_len(segments, parts, i + 1, j + 1)
    return None


def path_prefix(selector: str, name: str) -> str | None:
    """The module path at which a path selector matches ``name`` (``None`` if it does not).

    ``path_prefix("layers.*", "layers.3.attn.weight") == "layers.3"``; layer-wise decay uses it
    to tell the numbered blocks apart.
    """
    parsed = parse(selector)
    if parsed.kind != "path":
        raise SelectionError(f"selector {selector!r} must be a module path pattern like 'encoder.layers.*'")
    parts = name.split(".")
    end = _prefix_match_len(parsed.segments, parts)
    return None if end is None else ".".join(parts[:end])


# --------------------------------------------------------------------------- matching


class _Context:
    """What matching needs to know of the thing being selected from, built lazily."""

    def __init__(self, source: nn.Module | Mapping[str, torch.Tensor]):
        self.source = source
        self.groups = named_tensor_groups(source)
        self._modules: dict[str, nn.Module] | None = None

    @property
    def what(self) -> str:
        return type(self.source).__name__ if isinstance(self.source, nn.Module) else "the state dict"

    @property
    def modules(self) -> dict[str, nn.Module]:
        if self._modules is None:
            if not isinstance(self.source, nn.Module):
                raise SelectionError("type: selectors and module classes need a model; a state dict has names only")
            self._modules = dict(self.source.named_modules(remove_duplicate=False))
        return self._modules

    def chain(self, parts: Sequence[str]) -> Iterator[nn.Module]:
        """The module at path ``parts`` and every module above it."""
        for k in range(len(parts) + 1):
            module = self.modules.get(".".join(parts[:k]))
            if module is not None:
                yield module

    def owners(self, name: str) -> Iterator[nn.Module]:
        """The module that holds parameter ``name`` and every module above it."""
        return self.chain(name.split(".")[:-1])

    def names(self) -> list[str]:
        return [n for names, _ in self.groups for n in names]

    def module_paths(self) -> list[str]:
        if not isinstance(self.source, nn.Module):
            return sorted({n.rsplit(".", 1)[0] for n in self.names() if "." in n})
        return [p for p in self.modules if p]


def _class_names(module: nn.Module) -> frozenset[str]:
    return _mro_names(type(module))


@functools.cache
def _mro_names(cls: type) -> frozenset[str]:
    return frozenset(c.__name__ for c in cls.__mro__ if c not in (nn.Module, object))


def _module_test(parsed: ParsedSelector, ctx: _Context) -> Callable[[nn.Module], bool]:
    """For a ``type:`` selector: does one module (not its parents) belong to the type or family?"""
    name = parsed.type_name
    family = FAMILIES.get(name)
    if family is not None:
        return family
    present = sorted({n for m in ctx.modules.values() for n in _class_names(m)})
    if name not in present:
        close = difflib.get_close_matches(name, present + list(FAMILIES), n=1, cutoff=0.6)
        hint = f"did you mean type:{close[0]}? " if close else ""
        start = len(parsed.text) - len(name)
        raise _fail(parsed.text, start, len(parsed.text), f"unknown module type {name!r}",
                    f"{hint}Families: {', '.join(FAMILIES)}. Classes in {ctx.what}: {', '.join(present)}.")
    return lambda m: name in _class_names(m)


def _predicate(selector: Selector, ctx: _Context) -> tuple[bool, Callable[[str, torch.Tensor], bool]]:
    """(negate, predicate on one name) for any selector form."""
    if isinstance(selector, str):
        parsed = parse(selector)
        if parsed.kind == "path":
            return parsed.negate, lambda n, _: _prefix_match_len(parsed.segments, n.split(".")) is not None
        if parsed.kind == "re":
            return parsed.negate, lambda n, _: parsed.regex.fullmatch(n) is not None
        test = _module_test(parsed, ctx)
        return parsed.negate, lambda n, _: any(test(m) for m in ctx.owners(n))
    if isinstance(selector, type) and issubclass(selector, nn.Module):
        return False, lambda n, _: any(isinstance(m, selector) for m in ctx.owners(n))
    if callable(selector):
        return False, lambda n, p: bool(selector(n, p))
    raise SelectionError(
        f"cannot select with {selector!r} ({type(selector).__name__}): a selector is a string, "
        "an nn.Module subclass, or a callable (name, param) -> bool")


def select_modules(model: nn.Module, *selectors: Selector) -> list[tuple[str, nn.Module]]:
    """The modules the selectors reach, in model order: the module at a matched path and everything
    below it, modules of a selected type and everything below them. Callables reach no module.

    Freezing uses this to find normalization layers without parameters (``affine=False``).
    """
    ctx = _Context(model)
    tests = []
    for selector in selectors:
        negate, test = False, None
        if isinstance(selector, str):
            parsed = parse(selector)
            negate = parsed.negate
            if parsed.kind == "path":
                test = lambda parts, s=parsed.segments: _prefix_match_len(s, parts) is not None
            elif parsed.kind == "re":
                test = lambda parts, r=parsed.regex: any(r.fullmatch(".".join(parts[:k])) for k in range(1, len(parts) + 1))
            else:
                is_type = _module_test(parsed, ctx)
                test = lambda parts, t=is_type: any(t(m) for m in ctx.chain(parts))
        elif isinstance(selector, type) and issubclass(selector, nn.Module):
            test = lambda parts, c=selector: any(isinstance(m, c) for m in ctx.chain(parts))
        if test is not None:
            tests.append((negate, test))
    positive = [t for neg, t in tests if not neg]
    negative = [t for neg, t in tests if neg]
    only_negations = all(isinstance(s, str) and parse(s).negate for s in selectors)
    out = []
    for path, module in ctx.modules.items():
        parts = path.split(".") if path else []
        wanted = only_negations or any(t(parts) for t in positive)
        if wanted and not any(t(parts) for t in negative):
            out.append((path, module))
    return out


def as_selectors(value: Selector | Iterable[Selector] | None) -> tuple[Selector, ...]:
    """One selector or several (a list or tuple; None for none) as a tuple of selectors."""
    if value is None:
        return ()
    if isinstance(value, (str, type)) or callable(value):
        return (value,)
    return tuple(value)


def describe(selector: Selector) -> str:
    if isinstance(selector, str):
        return repr(selector)
    if isinstance(selector, type):
        return f"type {selector.__name__}"
    return f"callable {getattr(selector, '__qualname__', selector)!r}"


def closest(text: str, candidates: Sequence[str], n: int = 5) -> list[str]:
    """Up to ``n`` candidates nearest to ``text``: names extending it first, then by similarity."""
    extending = [c for c in candidates if c.startswith(text) and c != text]
    similar = difflib.get_close_matches(text, candidates, n=n, cutoff=0.5)
    out: list[str] = []
    for c in extending + similar:
        if c not in out:
            out.append(c)
    return out[:n]


def _missing_message(selector: Selector, ctx: _Context) -> str:
    msg = f"selector {describe(selector)} matched no parameter of {ctx.what}."
    if isinstance(selector, str):
        body = parse(selector).body
        if body.startswith("type:"):
            present = sorted({type(m).__name__ for m in ctx.modules.values()})
            return msg + f" Modules present: {', '.join(present)}."
        near = closest(body.removeprefix("re:"), ctx.names() + ctx.module_paths())
        if near:
            msg += f" Closest names: {', '.join(near)}."
    return msg


def match(source: nn.Module | Mapping[str, torch.Tensor], *selectors: Selector,
          missing_ok: bool = False) -> list[tuple[tuple[str, ...], torch.Tensor]]:
    ctx = _Context(source)
    compiled = [(s, *_predicate(s, ctx)) for s in selectors]
    hits = [[any(pred(n, t) for n in names) for names, t in ctx.groups] for _, _, pred in compiled]
    if not missing_ok:
        missing = [_missing_message(s, ctx) for (s, _, _), h in zip(compiled, hits) if not any(h)]
        if missing:
            raise SelectionError(" ".join(missing) + " (Pass missing_ok=True to allow an empty match.)")
    positive = [h for (_, neg, _), h in zip(compiled, hits) if not neg]
    negative = [h for (_, neg, _), h in zip(compiled, hits) if neg]
    chosen = []
    for i, group in enumerate(ctx.groups):
        wanted = any(h[i] for h in positive) if positive else True
        if wanted and not any(h[i] for h in negative):
            chosen.append(group)
    return chosen


# --------------------------------------------------------------------------- the result


class Selection:
    """Selected tensors, each once, in model order, with all of its names.

    Iterating yields ``(name, param)`` pairs like ``named_parameters()``, using each tensor's
    first name; ``in`` accepts any of its names or the tensor itself.

    Example:
        >>> import layerwise as lw, torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
        >>> sel = lw.select(net, "*.bias")
        >>> sel.names()
        ['0.bias', '2.bias']
        >>> "2.bias" in sel, net[0].weight in sel, len(sel)
        (True, False, 2)
    """

    __slots__ = ("_groups", "_by_name", "_ids")

    def __init__(self, groups: Sequence[tuple[tuple[str, ...], torch.Tensor]]):
        self._groups = tuple(groups)
        self._by_name = {n: t for names, t in self._groups for n in names}
        self._ids = {id(t) for _, t in self._groups}

    def params(self) -> list[torch.Tensor]:
        """The tensors, each once."""
        return [t for _, t in self._groups]

    def names(self) -> list[str]:
        """One name per tensor (its first), aligned with :meth:`params`."""
        return [names[0] for names, _ in self._groups]

    def aliases(self) -> list[tuple[str, ...]]:
        """Every name of every tensor, aligned with :meth:`params`; shared tensors have several."""
        return [names for names, _ in self._groups]

    def numel(self) -> int:
        return sum(t.numel() for _, t in self._groups)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return ((names[0], t) for names, t in self._groups)

    def __len__(self) -> int:
        return len(self._groups)

    def __contains__(self, item: object) -> bool:
        if isinstance(item, str):
            return item in self._by_name
        return id(item) in self._ids

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._by_name[name]
        except KeyError:
            near = closest(name, list(self._by_name))
            raise NotFoundError(f"{name!r} is not in this selection" + (f"; closest: {', '.join(near)}" if near else "")) from None

    def __repr__(self) -> str:
        shown = ", ".join(self.names()[:4]) + (", ..." if len(self) > 4 else "")
        return f"Selection({len(self)} tensors, {self.numel():,} elements: {shown})"


def select(model: nn.Module | Mapping[str, torch.Tensor], *selectors: Selector, missing_ok: bool = False) -> Selection:
    """Select parameters of ``model`` (or tensors of a state dict) with selectors.

    Several selectors are a union; ``!`` negations are removed from it afterwards. With no
    positive selector, the union is every parameter (so ``select(model, "!head")`` is all but
    the head). A selector that matches nothing raises :class:`SelectionError` naming it and
    the closest existing names, unless ``missing_ok=True``.

    Example:
        >>> import layerwise as lw, torch
        >>> lstm = torch.nn.LSTM(4, 8, num_layers=2)
        >>> lw.select(lstm, "*_l1").names()
        ['weight_ih_l1', 'weight_hh_l1', 'bias_ih_l1', 'bias_hh_l1']
        >>> lw.select(lstm, "re:weight_.*", "!*_l1").names()
        ['weight_ih_l0', 'weight_hh_l0']
    """
    return Selection(match(model, *selectors, missing_ok=missing_ok))
