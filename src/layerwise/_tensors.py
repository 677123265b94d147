"""Small tensor helpers shared by the modules: alias grouping and device/dtype buckets."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

import torch
from torch import nn
from torch.utils._foreach_utils import _device_has_foreach_support, _has_foreach_support

from .errors import OptionError, OptionTypeError

T = TypeVar("T")


def alias_key(t: torch.Tensor) -> tuple | None:
    """What makes two tensors the same tensor: same memory, same view. None if unknowable."""
    if t.device.type == "meta" or t.numel() == 0:
        return None
    return (t.device, t.dtype, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())


def named_tensor_groups(source: nn.Module | Mapping[str, torch.Tensor]) -> list[tuple[tuple[str, ...], torch.Tensor]]:
    """Each distinct tensor once, in order of first appearance, with every name it has.

    For a module these are its parameters, reached by ``named_parameters(remove_duplicate=False)``
    so a shared (tied) parameter lists all of its names. For a state dict the keys are grouped
    by the memory they view, because ``state_dict()`` returns a new detached tensor per key.
    """
    if isinstance(source, nn.Module):
        by_id: dict[int, list[str]] = {}
        tensors: dict[int, torch.Tensor] = {}
        for name, p in source.named_parameters(remove_duplicate=False):
            by_id.setdefault(id(p), []).append(name)
            tensors[id(p)] = p
        return [(tuple(names), tensors[i]) for i, names in by_id.items()]
    groups: dict[object, list[str]] = {}
    first: dict[object, torch.Tensor] = {}
    for name, t in source.items():
        key = alias_key(t) if isinstance(t, torch.Tensor) else None
        key = key if key is not None else ("unique", name)
        groups.setdefault(key, []).append(name)
        first.setdefault(key, t)
    return [(tuple(names), first[k]) for k, names in groups.items()]


def aliases_of(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``{alias: first key}`` for the keys of a state dict that view the same memory as an earlier key."""
    return {alias: names[0] for names, _ in named_tensor_groups(state) for alias in names[1:]}


def buckets(tensors: Sequence[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), the unit a fused foreach kernel takes."""
    out: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        out[(t.device, t.dtype)].append(i)
    return out


def pick(items: Sequence[T], indices: Iterable[int]) -> list[T]:
    return [items[i] for i in indices]


def laid_out_alike(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` have the same shape, strides, dtype and device (one can stand for the other's memory)."""
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and a.stride() == b.stride()


def use_foreach(tensors: Sequence[torch.Tensor], device: torch.device, foreach: bool | None) -> bool:
    """torch's own rule (as in ``clip_grad_norm_``): fused by default where supported, always when asked."""
    if foreach is None:
        return _has_foreach_support(list(tensors), device)
    if foreach and not _device_has_foreach_support(device):
        raise OptionError(f"foreach=True was passed, but {device.type} tensors have no foreach kernels; "
                          "pass foreach=None (the default) or False")
    return foreach


def require_flag(value: object, name: str, caller: str | None = None, *, none: bool = False) -> None:
    """An error naming ``name`` (and ``caller``) unless ``value`` is a bool (or None where ``none``):
    ``foreach="no"`` or ``quiet="false"`` are truthy, and would do the opposite of what they say."""
    if not (isinstance(value, bool) or (none and value is None)):
        accepted = "None, True or False" if none else "True or False"
        raise OptionTypeError(f"{caller + ': ' if caller else ''}{name}={value!r}: pass {accepted}")


def require_int(value: object, name: str, caller: str, low: int, meaning: str) -> int:
    """``value`` if it is an int >= ``low`` (a bool is not), else an error naming ``caller`` and ``name``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise OptionTypeError(f"{caller} option {name}={value!r} must be an int >= {low} ({meaning})")
    if value < low:
        raise OptionError(f"{caller} option {name}={value} must be >= {low} ({meaning})")
    return value


def human_bytes(n: float) -> str:
    """Decimal units (kB = 1000 B), the one convention of the CLI, rich's progress bars and Hugging Face."""
    from rich.filesize import decimal

    return decimal(int(n))


def require_module(model: object, caller: str) -> None:
    """An error naming ``caller`` unless ``model`` is an ``nn.Module``: a state dict has names and
    values, but no modules, ``requires_grad``, gradients or hooks to act on."""
    if not isinstance(model, nn.Module):
        hint = (": a state dict holds values only; load it into the model (model.load_state_dict) and pass the model"
                if isinstance(model, Mapping) else "")
        raise OptionTypeError(f"{caller} takes an nn.Module, got {type(model).__name__}{hint}")
