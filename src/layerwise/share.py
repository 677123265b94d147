"""Weight sharing: tie parameters together and find the ones that are tied."""

from __future__ import annotations

from torch import nn

from ._ddp import fsdp_params
from ._selector import unwrap_compiled
from ._tensors import named_tensor_groups, require_module
from .errors import OptionTypeError, StateError
from .select import SelectionError, closest

__all__ = ["shared", "tie"]


def _pairs(model: nn.Module, target: str, source: str) -> list[tuple[str, str]]:
    """(target parameter, source parameter) name pairs for two parameter names or two module paths."""
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules(remove_duplicate=False))
    if target in params and source in params:
        return [(target, source)]
    if target in modules and source in modules and target and source:
        t_rel = [n for n, _ in modules[target].named_parameters(remove_duplicate=False)]
        s_rel = [n for n, _ in modules[source].named_parameters(remove_duplicate=False)]
        if sorted(t_rel) != sorted(s_rel):
            only_t = sorted(set(t_rel) - set(s_rel))
            only_s = sorted(set(s_rel) - set(t_rel))
            raise SelectionError(
                f"cannot tie module {target!r} to {source!r}: their parameters differ "
                f"(only in {target!r}: {only_t or 'none'}; only in {source!r}: {only_s or 'none'}). "
                "Tie matching parameters one by one instead.")
        return [(f"{target}.{n}", f"{source}.{n}") for n in s_rel]
    unknown = [n for n in (target, source) if n not in params and n not in modules]
    if unknown:
        hints = "; ".join(f"{n!r}: closest {', '.join(closest(n, list(params) + list(modules))) or 'none'}" for n in unknown)
        raise SelectionError(f"cannot tie {target!r} to {source!r}: no parameter or module named {hints}.")
    raise SelectionError(
        f"cannot tie {target!r} to {source!r}: one is a parameter and the other a module; "
        "tie two parameters or two modules with the same parameters.")


def tie(model: nn.Module, target: str, source: str) -> list[str]:
    """Make ``target`` the very same ``nn.Parameter`` as ``source`` (weight tying).

    Both are parameter names, or both module paths with the same parameters (each is then
    tied to its counterpart). Shapes, dtypes and devices must match exactly; on any mismatch
    nothing is changed and the error lists every offending pair. Returns the tied target names.
    Sharing is then visible everywhere: :func:`select`, :func:`show`, ``param_groups``,
    ``average`` and ``save`` treat the tied parameter once.

    Example:
        >>> import layerwise as lw, torch
        >>> lm = torch.nn.ModuleDict({"embed": torch.nn.Embedding(10, 4), "decoder": torch.nn.Linear(4, 10, bias=False)})
        >>> lw.tie(lm, "decoder.weight", "embed.weight")
        ['decoder.weight']
        >>> lm.decoder.weight is lm.embed.weight
        True
        >>> lw.shared(lm)
        [['embed.weight', 'decoder.weight']]
    """
    require_module(model, "tie")
    for what, name in (("target", target), ("source", source)):
        if not isinstance(name, str):
            raise OptionTypeError(f"tie: {what} is a parameter name or module path (a string), not {name!r:.100}")
    pairs = _pairs(model, target, source)
    params = dict(model.named_parameters(remove_duplicate=False))
    managed = fsdp_params(unwrap_compiled(model))
    if late := [n for pair in pairs for n in pair if id(params[n]) in managed]:
        raise StateError(f"cannot tie {target!r} to {source!r}: {', '.join(dict.fromkeys(late))} already sharded by "
                         "FSDP2 (fully_shard), which puts its own tensor for each parameter back into the modules at "
                         "every forward and would silently undo the tie. Tie before fully_shard. Nothing was changed.")
    problems = []
    for t, s in pairs:
        pt, ps = params[t], params[s]
        for what in ("shape", "dtype", "device"):
            a, b = getattr(pt, what), getattr(ps, what)
            if a != b:
                a, b = (tuple(a), tuple(b)) if what == "shape" else (a, b)
                problems.append(f"{t} has {what} {a} but {s} has {b}")
    if problems:
        raise SelectionError(f"cannot tie {target!r} to {source!r}: " + "; ".join(problems) + ". Nothing was changed.")
    modules = dict(model.named_modules(remove_duplicate=False))
    for t, s in pairs:
        owner, _, leaf = t.rpartition(".")
        setattr(modules[owner], leaf, params[s])
    return [t for t, _ in pairs]


def shared(model: nn.Module) -> list[list[str]]:
    """Groups of parameter names that are one tensor, in model order.

    Covers both ways of sharing: a parameter tied into two places, and a module registered
    under two names (``self.right = self.left``). A module *called* twice in ``forward`` is
    registered once and has one name per parameter; ``lw.show(model, inputs=...)`` counts
    its calls.

    Example:
        >>> import layerwise as lw, torch
        >>> net = torch.nn.Module()
        >>> net.left = torch.nn.Linear(2, 2); net.right = net.left
        >>> lw.shared(net)
        [['left.weight', 'right.weight'], ['left.bias', 'right.bias']]
    """
    return [list(names) for names, _ in named_tensor_groups(model) if len(names) > 1]
