"""Refuse ``re:`` patterns that can backtrack exponentially (private; :mod:`layerwise._selector` uses it).

Python's ``re`` has no timeout, so ``re:(a+)+$`` against a long name would hang the caller. The
hang needs a repetition whose body can match one stretch of text in many ways: a repeated
group whose inner repetitions are not separated by a character they cannot match
(``(\\w+\\.?)+``, ``(.*\\.)*``), or a repeated choice whose branches can start alike (``(a|ab)+``).
Such patterns are found in the parsed pattern and refused before matching; atomic groups and
possessive quantifiers, which cannot backtrack, are the fix offered.
"""

from __future__ import annotations

from re import _constants as C  # noqa: N812 - the parser's own names, stable across 3.11-3.13
from re import _parser

_ASCII = frozenset(range(128))
_ANYTHING = _ASCII | {-1}  # -1 stands for every non-ASCII character
_EMPTY = frozenset({-2})  # an empty branch: ambiguous only beside another empty one
_CATEGORIES = {
    C.CATEGORY_DIGIT: lambda c: chr(c).isdigit(), C.CATEGORY_WORD: lambda c: chr(c).isalnum() or c == 95,
    C.CATEGORY_SPACE: lambda c: chr(c).isspace(),
}
_NEGATED = {C.CATEGORY_NOT_DIGIT: C.CATEGORY_DIGIT, C.CATEGORY_NOT_WORD: C.CATEGORY_WORD,
            C.CATEGORY_NOT_SPACE: C.CATEGORY_SPACE}


def _category(code) -> frozenset[int]:
    if code in _NEGATED:
        return _ANYTHING - _category(_NEGATED[code])
    test = _CATEGORIES.get(code)
    return _ANYTHING if test is None else frozenset(c for c in _ASCII if test(c)) | {-1}


def _chars(item) -> frozenset[int]:
    """The characters one pattern item can start with (all of them when it is not a one-character item)."""
    op, av = item
    if op is C.LITERAL:
        return frozenset({av if av < 128 else -1})
    if op is C.NOT_LITERAL:
        return _ANYTHING - {av}
    if op is C.IN:
        chars: set[int] = set()
        for kind, value in av:
            if kind is C.LITERAL:
                chars.add(value if value < 128 else -1)
            elif kind is C.RANGE:
                chars |= set(range(value[0], min(value[1], 127) + 1)) | ({-1} if value[1] >= 128 else set())
            elif kind is C.CATEGORY:
                chars |= _category(value)
            elif kind is not C.NEGATE:
                return _ANYTHING
        return _ANYTHING - chars if av and av[0][0] is C.NEGATE else frozenset(chars)
    if op in (C.MAX_REPEAT, C.MIN_REPEAT, C.POSSESSIVE_REPEAT) and len(av[2]) == 1:
        return _chars(av[2][0])
    return _ANYTHING


def _flat(items) -> list:
    """A sequence with plain groups opened, so a separator inside a group still counts."""
    out = []
    for op, av in items:
        out.extend(_flat(av[-1]) if op is C.SUBPATTERN else [(op, av)])
    return out


def _inner(items):
    """The repetitions and choices under ``items`` that can still backtrack."""
    for op, av in items:
        if op in (C.MAX_REPEAT, C.MIN_REPEAT):
            yield op, av
            yield from _inner(av[2])
        elif op is C.SUBPATTERN:
            yield from _inner(av[-1])
        elif op is C.BRANCH:
            yield op, av
            for branch in av[1]:
                yield from _inner(branch)
        # ATOMIC_GROUP, POSSESSIVE_REPEAT and lookarounds commit: nothing below them backtracks.


def _ambiguous(body) -> bool:
    """Whether a repeated ``body`` can match one stretch of text in exponentially many ways."""
    required = [_chars(item) for item in _flat(body) if item[0] not in (C.MAX_REPEAT, C.MIN_REPEAT, C.BRANCH,
                                                                          C.AT, C.ASSERT, C.ASSERT_NOT)]
    for op, av in _inner(body):
        if op is C.BRANCH:
            # The parser factors common prefixes out: (a|a) becomes a(?:|), two empty branches.
            starts = [_chars(branch[0]) if len(branch) else _EMPTY for branch in av[1]]
            if any(a & b for i, a in enumerate(starts) for b in starts[i + 1:]):
                return True
        elif av[1] > 1 and all(_chars((op, av)) & sep for sep in required):  # no separator it cannot match
            return True
    return False


def _children(op, av) -> list:
    """The sequences under one pattern item."""
    if op in (C.MAX_REPEAT, C.MIN_REPEAT, C.POSSESSIVE_REPEAT):
        return [av[2]]
    if op is C.SUBPATTERN:
        return [av[-1]]
    if op is C.ATOMIC_GROUP:
        return [av]
    return av[1] if op is C.BRANCH else []


def _risky(items) -> bool:
    return any((op in (C.MAX_REPEAT, C.MIN_REPEAT) and av[1] > 1 and _ambiguous(av[2]))
               or any(_risky(child) for child in _children(op, av)) for op, av in items)


def backtracks_exponentially(pattern: str) -> bool:
    """Whether ``pattern`` (one ``re.compile`` accepts) repeats a group whose inside can match the same
    text in several ways."""
    return _risky(_parser.parse(pattern))
