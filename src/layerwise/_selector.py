"""Parsing selector strings into plain compiled patterns (private; :mod:`layerwise.select` uses them).

Every string selector becomes one anchored regular expression over dotted paths that answers
"does this path, or a module path above it, match?" — the same question for a parameter name,
a module path and a state-dict key. ``**`` compiles to atomic groups, so matching is linear in
the length of the name: each chunk between two ``**`` commits to its leftmost occurrence,
which is always the best one because a chunk spans a fixed number of segments.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import gc
import inspect
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from re import _constants as C  # noqa: N812 - the parser's own names, as in _backtracking
from re import _parser

import torch
from torch import nn

from ._backtracking import backtracks_exponentially
from .errors import OptionTypeError, SelectionError

__all__ = ["FAMILIES", "Pattern", "Selector", "as_selectors", "closest", "describe", "gc_paused", "missing", "mro_names", "parse", "path_prefix", "unwrap_compiled"]

Selector = str | type[nn.Module] | Callable[[str, torch.Tensor], bool]


def _is_norm(m: nn.Module) -> bool:
    norms = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm)
    # Libraries define their own norms (LlamaRMSNorm, FrozenBatchNorm2d, LayerNorm2d).
    return isinstance(m, norms) or _norm_name(type(m).__name__)


@functools.cache
def _norm_name(name: str) -> bool:
    return re.search(r"Norm(\d[dD])?$", name) is not None


#: The ``type:`` families: a name and the test a module passes to belong to it.
FAMILIES: dict[str, Callable[[nn.Module], bool]] = {
    "norm": _is_norm,
    "embedding": lambda m: isinstance(m, (nn.Embedding, nn.EmbeddingBag))
    or type(m).__name__.endswith(("Embedding", "Embeddings")),
    "linear": lambda m: isinstance(m, (nn.Linear, nn.Bilinear)),
    "conv": lambda m: isinstance(m, nn.modules.conv._ConvNd),
    "rnn": lambda m: isinstance(m, (nn.RNNBase, nn.RNNCellBase)),
}

_END = r"(?![^.])"  # a segment ends here: a dot or the end of the name follows
_ANY_SEGMENTS = r"(?:[^.]*\.)*?"  # `**`: whole segments, as few as will do
_DOT = r"\."
_RANGE_HINT = "A numeric segment is a range [a-b] with integers a <= b, or a list [i,j,k]: e.g. 'layers.[0-5]'."
_DIGITS = re.compile(r"[0-9]+")  # ASCII only: str.isdigit() also accepts '²' and int() rejects it


@dataclass(frozen=True)
class Pattern:
    """A string selector, parsed once: what kind it is and the compiled regex that matches paths.

    ``literal`` is the fixed text every matching path starts with ("" if none): a sorted index
    of names finds the candidates for it by bisection, so 200 selectors cost 200 look-ups, not
    200 scans.
    """

    text: str
    negate: bool
    kind: str  # "path", "re" or "type"
    regex: re.Pattern | None = None  # path and re: `.match(path)` says the path or a prefix matches
    literal: str = ""
    type_name: str = ""
    ends: bool = False  # an re: with $ or \Z: `regex.match` cannot stop it at the end of a module path

    @property
    def body(self) -> str:
        return self.text[1:] if self.negate else self.text

    def matches(self, path: str) -> bool:
        if not self.ends:  # one match tries every segment end: the regex ends with (?![^.])
            return self.regex.match(path) is not None
        # The name cut at each segment end (endpos: where $ matches), so 're:encoder$' selects the subtree.
        ends = [i for i, c in enumerate(path) if c == "."] + [len(path)]
        return any(self.regex.match(path, 0, end) for end in ends)


def _fail(text: str, start: int, end: int, problem: str, hint: str) -> SelectionError:
    caret = " " * start + "^" * max(1, end - start)
    return SelectionError(f"{problem} in selector {text!r}\n    {text}\n    {caret}\n{hint}")


def _int_range(lo: str, hi: str) -> str:
    """A regex for the integers lo..hi written with the same number of digits."""
    if lo == hi:
        return lo
    n = len(lo) - 1
    if lo == "0" * len(lo) and hi == "9" * len(hi):
        return f"[0-9]{{{len(lo)}}}"
    if lo[0] == hi[0]:
        return lo[0] + _int_range(lo[1:], hi[1:])
    if n == 0:
        return f"[{lo}-{hi}]"
    parts = [lo[0] + _int_range(lo[1:], "9" * n)]
    if int(hi[0]) - int(lo[0]) > 1:
        parts.append(f"[{int(lo[0]) + 1}-{int(hi[0]) - 1}][0-9]{{{n}}}")
    parts.append(hi[0] + _int_range("0" * n, hi[1:]))
    return "(?:" + "|".join(parts) + ")"


def _number_regex(lo: int, hi: int) -> str:
    """A regex for the integers lo..hi (leading zeros allowed, as ``int("07") == 7``)."""
    parts = []
    while lo <= hi:
        top = min(hi, 10 ** len(str(lo)) - 1)  # the largest number with as many digits as lo
        parts.append(_int_range(str(lo), str(top)))
        lo = top + 1
    return "0*(?:" + "|".join(parts) + ")"


def _numbers(text: str, start: int, inner: str) -> str:
    end = start + len(inner) + 2
    if m := re.fullmatch(r"\s*([0-9]+)\s*-\s*([0-9]+)\s*", inner):
        lo, hi = int(m[1]), int(m[2])
        if lo > hi:
            raise _fail(text, start, end, f"empty range {lo} > {hi}", _RANGE_HINT)
        return _number_regex(lo, hi)
    items = [i.strip() for i in inner.split(",")]
    if all(_DIGITS.fullmatch(i) for i in items):
        return "0*(?:" + "|".join(sorted({str(int(i)) for i in items}, key=len, reverse=True)) + ")"
    raise _fail(text, start, end, f"bad numeric segment [{inner}]", _RANGE_HINT)


def _segment(text: str, pos: int, piece: str) -> str:
    end = pos + len(piece)
    if piece == "":
        raise _fail(text, pos, pos + 1, "empty name segment", "Segments are separated by single dots: 'encoder.layers.0'.")
    if "**" in piece:
        raise _fail(text, pos, end, "'**' inside a segment",
                    "'**' stands alone between dots ('**.bias'); use '*' within a segment ('weight_*').")
    if "[" in piece or "]" in piece:
        if not (piece.startswith("[") and piece.endswith("]")) or piece.count("[") != 1 or piece.count("]") != 1:
            raise _fail(text, pos, end, "a numeric range must be a whole segment", _RANGE_HINT)
        return _numbers(text, pos, piece[1:-1])
    if piece.strip("*") == "":
        return "[^.]+"  # a whole segment: never the empty path of the model itself
    return "[^.]*".join(re.escape(part) for part in piece.split("*"))


def _path(text: str, offset: int) -> tuple[str, str]:
    """(regex, literal prefix) of a path selector starting at ``text[offset]``."""
    for i, char in enumerate(text[offset:], start=offset):
        if char in ", \t\n" and not re.search(r"\[[^\]]*$", text[offset:i]):
            raise _fail(text, i, i + 1, f"unexpected {char!r}",
                        "Pass several selectors as separate arguments: select(model, 'lstm', 'head').")
    chunks: list[list[str]] = [[]]  # runs of segments between `**`
    pos = offset
    for piece in text[offset:].split("."):
        if piece == "**":
            if chunks[-1] or len(chunks) == 1:  # `**.**` is `**`
                chunks.append([])
        else:
            chunks[-1].append(_segment(text, pos, piece))
        pos += len(piece) + 1
    # The first chunk is anchored at the start; each later one follows any segments (`**`).
    # Atomic groups commit to a chunk's leftmost occurrence: no backtracking across `**`.
    first, *rest = chunks
    regex = _DOT.join(first) + _END if first else ""
    for k, chunk in enumerate(rest):
        if chunk:
            lead = _ANY_SEGMENTS if (k == 0 and not first) else r"(?:\.[^.]*)*?\."
            regex += f"(?>{lead}{_DOT.join(chunk)}{_END})"
    # Cut before the first wildcard, and before the dot of a trailing `**` ('encoder.**' matches 'encoder').
    literal = "" if not first else re.split(r"[*\[]", text[offset:], maxsplit=1)[0].rstrip(".")
    return regex, literal


def _regex(text: str, offset: int) -> re.Pattern:
    pattern = text[offset + 3:]
    if not pattern:
        raise _fail(text, offset, offset + 3, "empty regular expression", "Write re:PATTERN, e.g. 're:.*\\.bias'.")
    try:
        user = re.compile(pattern)
        # Full match of the path or of a module path above it, like every other selector. Global
        # flags must stay in front, and a verbose pattern may end in a comment.
        flags = re.match(r"(?:\(\?[aiLmsux]+\))*", pattern)[0]
        end = "\n" if user.flags & re.VERBOSE else ""
        compiled = re.compile(f"{flags}(?:{pattern[len(flags):]}{end}){_END}")
    except (re.error, OverflowError, RecursionError, ValueError) as e:
        at = offset + 3 + (getattr(e, "pos", None) or 0)
        msg = getattr(e, "msg", None) or str(e)
        raise _fail(text, at, at + 1, f"invalid regular expression ({msg})",
                    "The pattern after 're:' is a Python regex, matched against the whole name.") from None
    if backtracks_exponentially(pattern):  # Python's re has no timeout: it could hang on one long name
        raise _fail(text, offset + 3, len(text), "regular expression that can take exponential time (a repeated "
                    "group whose inside can match the same text in several ways)",
                    "Separate the repeated parts by a character they cannot match, or commit with an atomic group "
                    "(?>...) or a possessive quantifier (++, *+): e.g. 're:(?:[^.]*\\.)*bias', or the path '**.bias'.")
    return compiled


def _ends(items) -> bool:
    """Whether a parsed regex asserts the end of the text ($, \\Z) anywhere."""
    for op, av in items:
        if op is C.AT and av in (C.AT_END, C.AT_END_STRING):
            return True
        for x in av if isinstance(av, (tuple, list)) else [av]:
            parts = x if isinstance(x, list) else [x]  # a branch holds a list of alternatives
            if any(isinstance(y, _parser.SubPattern) and _ends(y) for y in parts):
                return True
    return False


@functools.lru_cache(maxsize=8192)
def _parse(text: str) -> Pattern:
    if text.strip() == "":
        raise SelectionError(f"empty selector {text!r}: use '**' for every parameter, or a module path like 'encoder'")
    negate = text.startswith("!")
    offset = int(negate)
    if negate and text[1:2] in ("", "!"):
        raise _fail(text, 0, 2, "'!' must be followed by one selector", "Write '!head' to remove what 'head' matches.")
    if text.startswith("re:", offset):
        regex = _regex(text, offset)
        return Pattern(text, negate, "re", regex=regex, ends=_ends(_parser.parse(text[offset + 3:])))
    if text.startswith("type:", offset):
        name = text[offset + 5:]
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name, flags=re.ASCII):
            raise _fail(text, offset + 5, len(text), "expected a module class or family name",
                        f"Write type:NAME with NAME a class (type:LSTM) or a family: {', '.join(FAMILIES)}.")
        return Pattern(text, negate, "type", type_name=name)
    regex, literal = _path(text, offset)
    return Pattern(text, negate, "path", regex=re.compile(regex), literal=literal)


def parse(text: str) -> Pattern:
    """Parse a string selector once (cached); raise :class:`SelectionError` quoting it with a caret under the fault."""
    if not isinstance(text, str):
        raise SelectionError(f"a selector string was expected, got {type(text).__name__}: {text!r}")
    return _parse(text)


def unknown_type(pattern: Pattern, present: list[str], where: str) -> SelectionError:
    """The error for ``type:NAME`` naming no family and no class of the model, with the nearest one."""
    name = pattern.type_name
    close = difflib.get_close_matches(name, present + list(FAMILIES), n=1, cutoff=0.6)
    hint = f"did you mean type:{close[0]}? " if close else ""
    start = len(pattern.text) - len(name)
    return _fail(pattern.text, start, len(pattern.text), f"unknown module type {name!r}",
                 f"{hint}Families: {', '.join(FAMILIES)}. Classes in {where}: {', '.join(present)}.")


def missing(selector: Selector, what: str, names: list[str], paths: list[str], modules: list[nn.Module]) -> str:
    """Why ``selector`` matched nothing in ``what``, with the closest names (or module types)."""
    msg = f"selector {describe(selector)} matched no parameter of {what}."
    if isinstance(selector, str):
        pattern = parse(selector)
        if pattern.kind == "type":
            present = sorted({n for m in modules for n in mro_names(type(m))})
            if pattern.type_name not in FAMILIES and pattern.type_name not in present:
                return str(unknown_type(pattern, present, what))
            return msg + f" Modules present: {', '.join(sorted({type(m).__name__ for m in modules}))}."
        near = closest(pattern.body.removeprefix("re:"), names + [p for p in paths if p])
        if near:
            msg += f" Closest names: {', '.join(near)}."
    return msg


def as_selectors(value: Selector | Iterable[Selector] | None) -> tuple[Selector, ...]:
    """One selector or several (a list or tuple; None for none) as a tuple of selectors."""
    if value is None:
        return ()
    if isinstance(value, (str, type)) or callable(value):
        return (value,)
    if not isinstance(value, Iterable) or isinstance(value, (bytes, Mapping)):  # a TypeError, as before, by name
        raise OptionTypeError(f"select={value!r:.80}: give a selector (a string, a module class or a callable "
                              "(name, param) -> bool) or a list of them")
    return tuple(value)


def describe(selector: Selector) -> str:
    """A selector as error messages name it: ``'lstm'``, ``type LSTM``, ``callable 'f'``."""
    if isinstance(selector, str):
        return repr(selector)
    if isinstance(selector, type):
        return f"type {selector.__name__}"
    return f"callable {getattr(selector, '__qualname__', selector)!r}"


def predicate(selector: Callable[..., object], what: str) -> Callable[[str, torch.Tensor], bool]:
    """A callable selector as a test of (name, param) whose misuse is a SelectionError naming it: one
    that cannot take (name, param), or answers with something that is not a truth value (a tensor)."""
    if what == "the keys":
        raise SelectionError(f"cannot select {what} with {describe(selector)}: a callable (name, param) "
                             "needs tensors; use a string selector")
    try:
        inspect.signature(selector).bind("name", None)
    except TypeError:
        raise SelectionError(f"the selector {describe(selector)} must take two arguments, (name, param), "
                             "and answer True or False, e.g. lambda name, p: p.ndim == 1") from None
    except ValueError:  # a builtin without a signature: called as it is
        pass

    def test(name: str, param: torch.Tensor) -> bool:
        answer = selector(name, param)
        try:
            return bool(answer)
        except RuntimeError:  # a tensor of several values
            what = f"a tensor of shape {tuple(answer.shape)}" if isinstance(answer, torch.Tensor) else type(answer).__name__
            raise SelectionError(f"the selector {describe(selector)} answered {what} for {name!r}; answer True or False "
                                 "(e.g. bool(p.sum() > 0))") from None
    return test


def closest(text: str, candidates: Sequence[str], n: int = 5) -> list[str]:
    """Up to ``n`` candidates nearest to ``text``: names extending it first, then by similarity."""
    extending = [c for c in candidates if c.startswith(text) and c != text]
    similar = difflib.get_close_matches(text, candidates, n=n, cutoff=0.5)
    out: list[str] = []
    for c in extending + similar:
        if c not in out:
            out.append(c)
    return out[:n]


@functools.cache
def mro_names(cls: type) -> frozenset[str]:
    """The class names ``type:NAME`` accepts for modules of ``cls``: its own and its bases'."""
    return frozenset(c.__name__ for c in cls.__mro__ if c not in (nn.Module, object))


def path_prefix(selector: str, name: str) -> str | None:
    """The module path at which a path selector matches ``name`` (``None`` if it does not).

    Example:
        >>> from layerwise.select import path_prefix
        >>> path_prefix("layers.*", "layers.3.attn.weight")
        'layers.3'
    """
    pattern = parse(selector)
    if pattern.kind != "path":
        raise SelectionError(f"selector {selector!r} must be a module path pattern like 'encoder.layers.*'")
    m = pattern.regex.match(name)
    return None if m is None else name[:m.end()]


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Walking a big model allocates tens of thousands of small objects, which would trigger
    several full collections over every object of the model (up to 10x the walk's own cost);
    the walk creates no reference cycles, so collecting is deferred to its end."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile``d wrapper (``OptimizedModule``) runs, so that names are the inner ones.

    Example:
        >>> import layerwise as lw, torch
        >>> net = torch.nn.Linear(2, 2)
        >>> lw.select(torch.compile(net), "weight").params() == [net.weight]
        True
    """
    # Never import torch._dynamo: if it is not loaded, nothing can be compiled.
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    while eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
        model = model._orig_mod
    return model
