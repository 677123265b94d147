"""The merge-method registry: one declaration per method, everything else derives from it.

Each :class:`Method` says what the method needs (a base, how many models), which options it
takes (:class:`Option`: default, check, per model or global), whether it is element-wise (so
``merge_files`` may stream it in slices), and names its per-tensor function in
``_merge_math``. ``merge``, ``merge_files``, the command line (``--method`` choices and
``merge --help``) and the recipes read this table; adding a method is one entry here, one
function in ``_merge_math`` and its tests. The module imports no torch, so ``--help`` stays fast.
Option names follow mergekit (``weight``, ``density``, ``lambda``...), so recipes run unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import MergeError

REQUIRED = object()  # an option default meaning "no default: the caller must give it"


def _number(lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = False,
            integer: bool = False, why: str = "") -> Callable[[Any], str | None]:
    """A check: a finite real number (an int if ``integer``) in the interval; returns the complaint or None."""
    interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    def check(v: Any) -> str | None:
        kind = int if integer else (int, float)
        if isinstance(v, bool) or not isinstance(v, kind):
            return f"must be {'an integer' if integer else 'a number'}, not {type(v).__name__}"
        if not math.isfinite(v):
            return "must be finite"
        if v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
            return f"must be in {interval}{why}"
        return None
    return check


def _boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else f"must be true or false, not {v!r}"


def _one_of(*choices: Any) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if any(v == c and type(v) is type(c) for c in choices) else \
            f"must be one of {', '.join(map(repr, choices))}"
    return check


@dataclass(frozen=True)
class Option:
    """One option of a method: its default, its check, and whether each model has its own value."""

    name: str
    default: Any
    check: Callable[[Any], str | None]
    help: str
    per_model: bool = False


@dataclass(frozen=True)
class Method:
    """One merge method: what it needs, its options, and the name of its per-tensor function."""

    name: str
    summary: str
    function: str  # in _merge_math: f(tensors, base, options, key) -> tensor
    options: tuple[Option, ...] = ()
    base: str = "none"  # "required", "optional" or "none" (a base given anyway is only the fallback)
    models: tuple[int, float] = (1, math.inf)  # how many models besides the base
    elementwise: bool = False  # an output element depends on the same element of the inputs alone
    complex_ok: bool = False  # defined for complex tensors (no magnitudes, signs or angles)
    reference: str = ""

    def option(self, name: str) -> Option:
        return next(o for o in self.options if o.name == name)


def _weight(default: Any = 1.0, help: str = "this model's weight") -> Option:
    return Option("weight", default, _number(), help, per_model=True)


_DENSITY = Option("density", 1.0, _number(0, 1, lo_open=True), "fraction of each task vector kept", per_model=True)
_LAMBDA = Option("lambda", 1.0, _number(), "scale of the merged task vector (alias: scale)")
_SEED = Option("seed", 0, _number(0, 2**63 - 1, integer=True), "seed of the random drop (per tensor and model)")
_RESCALE_CHOICES = (False, True, "l1", "l2", "linf", "density")
_INT8_MASK = Option("int8_mask", False, _boolean, "accepted for mergekit recipes; masks are boolean here anyway")
_CONVENTION = Option("convention", "mergekit", _one_of("mergekit", "layerwise"),
                     "mergekit: as mergekit 0.1.5; layerwise: layerwise 0.1 (see the docs of merge)")
_T = Option("t", 0.5, _number(0, 1), "interpolation position: 0 is the first model (or the base), 1 the second")


def _gta(name: str, summary: str, *, sparsify: str | None, consensus: bool, normalize: bool, rescale: Any,
         reference: str, density: float = 1.0, convention: bool = False) -> Method:
    """A generalized task-arithmetic method (mergekit's GeneralizedTaskArithmeticMerge)."""
    options = [_weight(), Option("normalize", normalize, _boolean, "divide by the sum of the (agreeing) weights"),
               _LAMBDA, _INT8_MASK]
    if sparsify:
        options += [Option("density", density, _DENSITY.check, _DENSITY.help, per_model=True),
                    Option("rescale", rescale, _one_of(*_RESCALE_CHOICES),
                           "after sparsifying, restore the task vector's norm: true/'l1', 'l2', 'linf', or "
                           "'density' (divide by density, DARE's paper and layerwise 0.1)")]
    if sparsify == "magnitude_outliers":
        options.append(Option("gamma", 0.01, _number(0, 1), "fraction of the largest entries dropped as outliers",
                              per_model=True))
    if sparsify == "della_magprune":
        options.append(Option("epsilon", 0.15, _number(0, 1, hi_open=True),  # 0: mergekit allows it
                              "half-width of the keep probabilities around density", per_model=True))
    if sparsify in ("random", "della_magprune"):
        options.append(_SEED)
    if convention:
        options.append(_CONVENTION)
    return Method(name, summary, f"gta:{sparsify or 'none'}:{'sum' if consensus else 'none'}", tuple(options),
                  base="required", elementwise=sparsify is None, complex_ok=sparsify is None and not consensus,
                  reference=reference)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("linear", "weighted mean Σ wᵢ·xᵢ / Σ wᵢ", "linear",
           (_weight(), Option("normalize", True, _boolean, "divide by the sum of the weights")),
           elementwise=True, complex_ok=True, reference="https://arxiv.org/abs/2203.05482"),
    _gta("task_arithmetic", "base + λ·Σ wᵢ·(xᵢ − base)", sparsify=None, consensus=False, normalize=False,
         rescale=False, reference="https://arxiv.org/abs/2212.04089"),
    _gta("ties", "top-density task vectors, sign election, disjoint mean", sparsify="magnitude", consensus=True,
         normalize=True, rescale=False, convention=True, reference="https://arxiv.org/abs/2306.01708"),
    _gta("dare_ties", "random drop-and-rescale task vectors, sign election", sparsify="random", consensus=True,
         normalize=False, rescale=True, reference="https://arxiv.org/abs/2311.03099"),
    _gta("dare_linear", "random drop-and-rescale task vectors, summed", sparsify="random", consensus=False,
         normalize=False, rescale=True, reference="https://arxiv.org/abs/2311.03099"),
    _gta("dare", "layerwise 0.1's DARE: dare_linear with rescale='density', density 0.1", sparsify="random",
         consensus=False, normalize=False, rescale="density", density=0.1,
         reference="https://arxiv.org/abs/2311.03099"),
    _gta("breadcrumbs", "task vectors without their largest (gamma) and smallest entries, summed",
         sparsify="magnitude_outliers", consensus=False, normalize=False, rescale=False,
         reference="https://arxiv.org/abs/2312.06795"),
    _gta("breadcrumbs_ties", "breadcrumbs with sign election", sparsify="magnitude_outliers", consensus=True,
         normalize=False, rescale=False, reference="https://arxiv.org/abs/2312.06795"),
    _gta("della", "magnitude-ranked random drop (MagPrune), sign election", sparsify="della_magprune",
         consensus=True, normalize=True, rescale=True, reference="https://arxiv.org/abs/2406.11617"),
    _gta("della_linear", "magnitude-ranked random drop (MagPrune), summed", sparsify="della_magprune",
         consensus=False, normalize=False, rescale=True, reference="https://arxiv.org/abs/2406.11617"),
    Method("slerp", "spherical interpolation of two models (or base → one model) at t", "slerp",
           (_T, _CONVENTION), base="optional", models=(1, 2), reference="https://en.wikipedia.org/wiki/Slerp"),
    Method("nuslerp", "slerp at t = w₂/(w₁+w₂), row-wise or flattened, of models or of task vectors", "nuslerp",
           (_weight(), Option("nuslerp_row_wise", False, _boolean, "interpolate each row (else each column)"),
            Option("nuslerp_flatten", True, _boolean, "interpolate the whole tensor as one vector")),
           base="optional", models=(2, 2)),
    Method("multislerp", "barycentric interpolation of several models on the hypersphere", "multislerp",
           (_weight(), Option("normalize_weights", True, _boolean, "divide the weights by their sum"),
            Option("eps", 1e-8, _number(0, 1, lo_open=True), "numerical floor of norms")),
           base="optional", reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"),
    Method("karcher", "Riemannian (Karcher) mean of the models' directions, times their mean norm", "karcher",
           (_weight(), Option("max_iter", 10, _number(1, 10_000, integer=True), "iterations at most"),
            Option("tol", 1e-5, _number(0, 1, lo_open=True), "convergence tolerance")),
           reference="https://en.wikipedia.org/wiki/Karcher_mean"),
    Method("model_stock", "interpolate base → model mean by the models' agreement (Model Stock)", "model_stock",
           (Option("filter_wise", False, _boolean, "one ratio per row instead of per tensor"),),
           base="required", models=(2, math.inf), reference="https://arxiv.org/abs/2403.19522"),
    Method("sce", "select high-variance entries, weight by energy, sign election (SCE)", "sce",
           (Option("select_topk", 1.0, _number(0, 1), "fraction of entries (by variance across models) kept"),
            _INT8_MASK),
           base="required", reference="https://arxiv.org/abs/2408.07990"),
    Method("nearswap", "take the model's value where it is within t of the base, blend further out", "nearswap",
           (Option("t", REQUIRED, _number(0, lo_open=True), "distance below which the model's value is taken"),),
           base="required", models=(1, 1), elementwise=True,
           reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"),
    Method("passthrough", "one model's tensor, optionally scaled (layer slices, frankenmerges)", "passthrough",
           (Option("scale", 1.0, _number(), "factor applied to the tensor", per_model=True),),
           models=(1, 1), elementwise=True, complex_ok=True),
)}

ALIASES = {"scale": "lambda", "lambda_": "lambda"}  # layerwise 0.1's name, and Python's spelling of a keyword


def get_method(name: str) -> Method:
    """The registry entry of ``name``, or a :class:`MergeError` listing every method."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise MergeError(f"unknown merge method {name!r}; choose one of {', '.join(METHODS)}") from None


def check_method(method: str | Method, *, has_base: bool, models: int) -> Method:
    """The method exists and has what it needs: a base where it adds task vectors, its count of models."""
    m = method if isinstance(method, Method) else get_method(method)  # not a name: get_method names it
    if not models:
        raise MergeError("no models to merge")
    if m.base == "required" and not has_base:
        raise MergeError(f"{m.name} combines task vectors (model − base): pass base=<the common ancestor> "
                         "(--base on the command line)")
    lo, hi = m.models
    if m.name == "slerp":  # two models, or a base and one model (t=0 is the base): never a base and two
        lo, hi = (1, 1) if has_base else (2, 2)
    if not lo <= models <= hi:
        wanted = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi == math.inf else f"{lo} to {hi:g}"
        extra = " besides the base" if m.base == "required" or (m.name == "slerp" and has_base) else \
            " (or a base and one model)" if m.name == "slerp" else ""
        raise MergeError(f"{m.name} merges {wanted} model{'s' * (lo != 1)}{extra}; got {models}")
    return m


def check_complex(method: Method, keys: list[str]) -> None:
    """Complex tensors (``keys``) only for the methods defined on them: checked before anything is written."""
    if keys and not method.complex_ok:
        raise MergeError(f"{', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}: {method.name} needs magnitudes, "
                         "signs or angles, which complex tensors lack; merge complex tensors with linear, "
                         "task_arithmetic or passthrough, or leave them out with select=")


def describe_methods() -> str:
    """Every method with its options and defaults, for ``layerwise merge --help`` and the docs."""
    lines = []
    for m in METHODS.values():
        needs = {"required": ", needs --base", "optional": ", --base optional"}.get(m.base, "")
        lines.append(f"  {m.name}: {m.summary}{needs}")
        for o in m.options:
            default = "required" if o.default is REQUIRED else f"default {o.default!r}"
            lines.append(f"      {o.name}{' (per model)' if o.per_model else ''}: {o.help}; {default}")
    return "\n".join(lines)


def methods_markdown() -> str:
    """The README's table of methods (a test keeps the README equal to it)."""
    rows = ["| method | result per floating tensor | base | options (defaults; ᵢ: per model) |", "|---|---|---|---|"]
    for m in METHODS.values():
        options = ", ".join(f"`{o.name}{'ᵢ' if o.per_model else ''}={'required' if o.default is REQUIRED else o.default}`"
                            for o in m.options)
        rows.append(f"| `{m.name}` | {m.summary} | {m.base} | {options} |")
    return "\n".join(rows)
