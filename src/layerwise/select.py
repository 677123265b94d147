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
``re:PATTERN``      Python regex, full match against the parameter name (or a module path
                    above it, which selects its subtree like a path does)
``type:NAME``       parameters of modules of that class (or subclasses), or of a family:
                    ``norm``, ``embedding``, ``linear``, ``conv``, ``rnn``
``!SELECTOR``       remove what it matches from the union of the positive selectors
==================  ==========================================================================

A selector may also be an ``nn.Module`` subclass (like ``type:``) or a callable
``(name, param) -> bool``. Strings match the names of
``named_parameters(remove_duplicate=False)``, so a shared parameter is reachable through
each of its names; it is selected when any of its names matches and removed by a negation
when any of its names matches. A ``torch.compile``d model is addressed by its inner names.

Every consumer goes through :func:`resolve`: one walk of the model, each string compiled once
(cached), giving the parameters, the modules reached and the selectors that matched nothing.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ._selector import (
    FAMILIES,
    Pattern,
    Selector,
    as_selectors,
    closest,
    describe,
    gc_paused,
    missing,
    mro_names,
    parse,
    path_prefix,
    predicate,
    unwrap_compiled,
)
from ._tensors import named_tensor_groups, require_flag
from .errors import NotFoundError, OptionTypeError, SelectionError

__all__ = ["FAMILIES", "Resolution", "Selection", "SelectionError", "Selector", "Walk", "as_selectors", "closest",
           "describe", "parse", "path_prefix", "resolve", "select", "select_keys", "unwrap_compiled"]


class Walk:
    """The one walk of a model, a state dict or a key list that every resolution reads.

    Build it once and resolve many selector lists against it (``param_groups`` resolves each
    rule against one walk). For a model it holds every parameter once with all of its names
    (``named_parameters(remove_duplicate=False)``) and every module path.

    Example:
        >>> import layerwise as lw, torch
        >>> from layerwise.select import Walk
        >>> walk = Walk(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)))
        >>> [walk.resolve(s).selection().names() for s in ("0", "*.bias")]
        [['0.weight', '0.bias'], ['0.bias', '1.bias']]
    """

    def __init__(self, source: nn.Module | Mapping[str, torch.Tensor] | Iterable[str]):
        self.paths: list[str] = []  # module paths, in model order (pre-order)
        self.modules: list[nn.Module] = []
        self.parent: list[int] = []  # index of each module's parent (-1 for the root)
        self.names: list[str] = []  # every name of every group
        self.name_group: list[int] = []
        self.name_owner: list[int] = []  # module index holding the name (-1 without a model)
        self._sorted: dict[str, tuple[list[str], list[int]]] = {}
        self._aliases: list[tuple[str, ...]] | None = None  # None: one name per tensor
        if isinstance(source, nn.Module):
            model = unwrap_compiled(source)
            self.what, self.has_modules = type(model).__name__, True
            with gc_paused():
                self._walk(model)
            return
        self.has_modules = False
        if isinstance(source, Mapping):
            self.what = "the state dict"
            groups = named_tensor_groups(source)
        elif isinstance(source, Iterable) and not isinstance(source, (str, bytes)):
            self.what = "the keys"
            groups = [((key,), None) for key in source]
            if not all(isinstance(names[0], str) for names, _ in groups):
                raise OptionTypeError(f"keys to select from must be strings, got {source!r}")
        else:
            raise OptionTypeError(f"cannot select from {type(source).__name__} {source!r}: pass an nn.Module, "
                                  "a state dict or a list of keys")
        self.tensors = [t for _, t in groups]
        self._aliases = [names for names, _ in groups]
        for g, (names, _) in enumerate(groups):
            self.names += names
            self.name_group += [g] * len(names)
            self.name_owner += [-1] * len(names)

    def _walk(self, model: nn.Module) -> None:
        # named_parameters(remove_duplicate=False) is this very loop; doing it here gives the
        # modules too, in one pass.
        index: dict[str, int] = {}
        by_id: dict[int, int] = {}
        tensors: list[torch.Tensor] = []
        for path, module in model.named_modules(remove_duplicate=False):
            m = index[path] = len(self.paths)
            self.paths.append(path)
            self.modules.append(module)
            self.parent.append(index[path.rpartition(".")[0]] if path else -1)
            prefix = f"{path}." if path else ""
            for key, p in module._parameters.items():
                if p is not None:
                    g = by_id.setdefault(id(p), len(tensors))
                    if g == len(tensors):
                        tensors.append(p)
                    self.names.append(prefix + key)
                    self.name_group.append(g)
                    self.name_owner.append(m)
        self.tensors = tensors
        if len(tensors) == len(self.names):  # nothing shared: one name per tensor, in order
            return
        members: list[list[str]] = [[] for _ in tensors]
        for name, g in zip(self.names, self.name_group):
            members[g].append(name)
        self._aliases = [tuple(names) for names in members]

    def group(self, g: int) -> tuple[tuple[str, ...], torch.Tensor | None]:
        """Every name of tensor ``g`` and the tensor, built on demand (tuples for every tensor at
        walk time cost more in garbage collection than the walk itself)."""
        return (self.names[g],) if self._aliases is None else self._aliases[g], self.tensors[g]

    def resolve(self, *selectors: Selector, missing_ok: bool = False) -> Resolution:
        """See :func:`resolve`."""
        require_flag(missing_ok, "missing_ok")
        with gc_paused():
            return self._resolve(selectors, missing_ok)

    def _resolve(self, selectors: Sequence[Selector], missing_ok: bool) -> Resolution:
        positive, negative = set(), set()
        reaches: list[tuple[bool, Callable[[], set[int]]]] = []
        unmatched = []
        for selector in selectors:
            negate, groups, reach = self._one(selector)
            if not groups:  # found if it reaches a module (a norm without parameters)
                reached = reach()
                reach = lambda r=reached: r  # noqa: E731
                if not reached:
                    unmatched.append(selector)
            (negative if negate else positive).update(groups)
            reaches.append((negate, reach))
        if unmatched and not missing_ok:
            raise SelectionError(" ".join(missing(s, self.what, self.names, self.paths, self.modules) for s in unmatched)
                                 + " (Pass missing_ok=True to allow an empty match.)")
        # With no positive selector the union is everything: select(model, "!head") is all but the head.
        everything = all(negate for negate, _ in reaches)

        def modules() -> tuple[tuple[str, nn.Module], ...]:  # on demand: select() never needs them
            wanted = set(range(len(self.modules))) if everything else set().union(
                *(reach() for negate, reach in reaches if not negate))
            wanted.difference_update(*(reach() for negate, reach in reaches if negate))
            return tuple((self.paths[m], self.modules[m]) for m in sorted(wanted))

        groups = set(range(len(self.tensors))) if everything else positive
        return Resolution(tuple(map(self.group, sorted(groups - negative))), modules, tuple(unmatched))

    # ------------------------------------------------------------------ one selector

    def _one(self, selector: Selector) -> tuple[bool, set[int], Callable[[], set[int]]]:
        """(negated?, groups it matches, the modules it reaches when asked) for any selector form."""
        if isinstance(selector, str):
            pattern = parse(selector)
            if pattern.kind == "type":
                groups, modules = self._by_type(self._type_test(pattern), selector)
                return pattern.negate, groups, lambda: modules
            if pattern.matches(""):  # the model's own path (`**`, re:.*): it and everything below it
                return pattern.negate, set(range(len(self.tensors))), lambda: set(range(len(self.modules)))
            names = self._scan(pattern, self.names, "names")
            return (pattern.negate, {self.name_group[i] for i in names},
                    lambda: set(self._scan(pattern, self.paths, "paths")))
        if isinstance(selector, type) and issubclass(selector, nn.Module):
            groups, modules = self._by_type(lambda m: isinstance(m, selector), selector)
            return False, groups, lambda: modules
        if callable(selector) and not isinstance(selector, type):  # a class is a module type or nothing
            test = predicate(selector, self.what)
            groups = {g for g in range(len(self.tensors)) if any(test(n, self.tensors[g]) for n in self.group(g)[0])}
            return False, groups, lambda: self._fully_selected(groups)
        hint = " Pass several selectors as separate arguments." if isinstance(selector, (list, tuple, set)) else ""
        raise SelectionError(f"cannot select with {selector!r} ({type(selector).__name__}): a selector is a string, "
                             f"an nn.Module subclass, or a callable (name, param) -> bool.{hint}")

    def _scan(self, pattern: Pattern, items: list[str], which: str) -> list[int]:
        """Indices of ``items`` the pattern matches; with a literal prefix, only the candidates that
        start with it (found by bisection in a sorted copy, built once per walk)."""
        match = pattern.matches if pattern.ends else pattern.regex.match
        if not pattern.literal or len(items) < 64:
            return [i for i, item in enumerate(items) if match(item)]
        if which not in self._sorted:
            order = sorted(range(len(items)), key=items.__getitem__)
            self._sorted[which] = ([items[i] for i in order], order)
        keys, order = self._sorted[which]
        out = []
        literal = pattern.literal
        for k in range(bisect_left(keys, literal), len(keys)):
            if not keys[k].startswith(literal):
                break
            if match(keys[k]):
                out.append(order[k])
        return out

    def _type_test(self, pattern: Pattern) -> Callable[[nn.Module], bool]:
        family = FAMILIES.get(pattern.type_name)
        return family if family is not None else lambda m: pattern.type_name in mro_names(type(m))

    def _by_type(self, test: Callable[[nn.Module], bool], selector: Selector) -> tuple[set[int], set[int]]:
        """Modules passing ``test`` and everything below them; the parameters they hold."""
        if not self.has_modules:
            raise SelectionError(f"the selector {describe(selector)} needs a model; {self.what} has names only: "
                                 "select by name ('**.norm.*') instead")
        reached = [False] * len(self.modules)
        for m, module in enumerate(self.modules):
            reached[m] = test(module) or (m > 0 and reached[self.parent[m]])
        groups = {self.name_group[i] for i, owner in enumerate(self.name_owner) if reached[owner]}
        return groups, {m for m, r in enumerate(reached) if r}

    def _fully_selected(self, groups: set[int]) -> set[int]:
        """Modules whose parameters (below them too; at least one) are all in ``groups``: what a
        callable reaches, so that it agrees with the module paths it could have been written as."""
        has = [False] * len(self.modules)
        full = [True] * len(self.modules)
        for g, m in zip(self.name_group, self.name_owner):
            has[m] = True
            full[m] &= g in groups
        for m in range(len(self.modules) - 1, 0, -1):  # pre-order reversed: children before parents
            up = self.parent[m]
            has[up] |= has[m]
            full[up] &= full[m]
        return {m for m in range(len(self.modules)) if has[m] and full[m]}


class Resolution:
    """What selectors resolve to: the parameters (each once, in model order, with all names),
    the modules reached (``(path, module)`` in model order) and the selectors that matched nothing.

    Example:
        >>> import layerwise as lw, torch
        >>> from layerwise.select import resolve
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2, affine=False))
        >>> res = resolve(net, "type:norm", "head", missing_ok=True)
        >>> res.selection().names(), [path for path, _ in res.modules], res.unmatched
        ([], ['1'], ('head',))
    """

    __slots__ = ("groups", "unmatched", "_modules")

    def __init__(self, groups: tuple[tuple[tuple[str, ...], torch.Tensor | None], ...],
                 modules: Callable[[], tuple[tuple[str, nn.Module], ...]], unmatched: tuple[Selector, ...]):
        self.groups, self.unmatched, self._modules = groups, unmatched, modules

    @property
    def modules(self) -> tuple[tuple[str, nn.Module], ...]:
        """``(path, module)`` of every module reached, in model order (found on first access)."""
        if callable(self._modules):
            self._modules = self._modules()
        return self._modules

    def selection(self) -> Selection:
        """The parameters as a :class:`Selection`."""
        return Selection(self.groups)


def resolve(source: nn.Module | Mapping[str, torch.Tensor] | Walk, *selectors: Selector, missing_ok: bool = False) -> Resolution:
    """Resolve selectors against a model (or a state dict, or a :class:`Walk` of either) in one walk.

    Several selectors are a union and ``!`` negations are removed from it afterwards, for
    parameters and modules alike; with no positive selector the union is everything. A
    selector that matches no parameter and reaches no module raises :class:`SelectionError`
    naming it and the closest existing names, unless ``missing_ok=True``; then it is listed in
    ``unmatched``. The modules a selector reaches: those at a matching path and everything
    below them (``type:``, classes: modules of that type and below); for a callable, the
    modules whose parameters it all selects.

    Example:
        >>> import layerwise as lw, torch
        >>> from layerwise.select import resolve
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> res = resolve(net, "1", "!**.bias")
        >>> [names for names, _ in res.groups], [path for path, _ in res.modules]
        ([('1.weight',)], ['1'])
    """
    walk = source if isinstance(source, Walk) else Walk(source)
    return walk.resolve(*selectors, missing_ok=missing_ok)


def select_keys(keys: Iterable[str] | Walk, *selectors: Selector, missing_ok: bool = False) -> list[str]:
    """The keys (of a state dict, a checkpoint header...) the selectors select, in their order.

    Names only: ``type:``, classes and callables need a model and are refused.

    Example:
        >>> from layerwise.select import select_keys
        >>> select_keys(["enc.0.weight", "enc.0.bias", "head.weight"], "enc.**", "!**.bias")
        ['enc.0.weight']
    """
    walk = keys if isinstance(keys, Walk) else Walk(list(keys) if isinstance(keys, Mapping) else keys)
    return [names[0] for names, _ in resolve(walk, *selectors, missing_ok=missing_ok).groups]


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
    return resolve(model, *selectors, missing_ok=missing_ok).selection()
