"""The EMA's shadow tensors and its hot path: shadows laid out like their parameters (local shards
of DTensors), buckets of (shadow, live) tensors per device and dtype, flat views over parameters
that tile one buffer, and FSDP2 modules put back in their sharded state."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ._tensors import use_foreach

__all__ = ["Bucket", "acc_dtype", "flat_view", "local", "planned", "reshard", "shadow_like"]


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor a kernel may touch: the local shard of a DTensor, the tensor itself otherwise."""
    return t._local_tensor if hasattr(t, "_local_tensor") else t


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # half-precision averages round most updates away at decay 0.999: keep them in float32
    return torch.promote_types(dtype, torch.float32) if dtype.is_floating_point else dtype


def shadow_like(p: torch.Tensor, device: torch.device | None, float_shadow: bool = True) -> torch.Tensor:
    mine = local(p).detach()
    dtype = acc_dtype(mine.dtype) if float_shadow else mine.dtype
    shadow = mine.to(device=device or mine.device, dtype=dtype, copy=True)
    if not hasattr(p, "_local_tensor"):
        return shadow
    from torch.distributed.tensor import DTensor  # only reached for DTensor parameters

    return DTensor.from_local(shadow, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def reshard(model: nn.Module) -> bool:
    """Put FSDP2 modules back in their sharded state (no collective). After a forward without a
    backward (evaluation) the root keeps its gathered parameters registered: they would hide the
    shards from the EMA, and a later forward would reuse them instead of gathering the shards."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # never imported here: if absent, nothing is sharded
    modules = [m for m in model.modules() if fsdp is not None and isinstance(m, fsdp.FSDPModule)]
    for m in modules:
        m.reshard()
    return bool(modules)


def flat_view(live: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """One 1-D view over ``live`` when they tile a range of one storage in order, else None (also for
    negative and conjugate views: a view rebuilt over their storage would lose the bit)."""
    if not live or any(not t.is_contiguous() or t.is_neg() or t.is_conj() for t in live):
        return None
    storage = live[0].untyped_storage()
    start = offset = live[0].storage_offset()
    for t in live:
        if t.untyped_storage().data_ptr() != storage.data_ptr() or t.storage_offset() != offset:
            return None
        offset += t.numel()
    return torch.empty(0, dtype=live[0].dtype, device=live[0].device).set_(storage, start, (offset - start,))


class Bucket:
    """Shadows and live tensors of one (device, dtype) pair, with the fastest way to average them."""

    __slots__ = ("shadow", "live", "flat", "mixed", "fused", "elsewhere", "native")

    def __init__(self, shadow: list[torch.Tensor], live: list[torch.Tensor], foreach: bool | None):
        self.shadow, self.live = shadow, live
        self.elsewhere = shadow[0].device != live[0].device  # device=: each live tensor is copied over first
        self.mixed = shadow[0].dtype != live[0].dtype or self.elsewhere
        self.fused = use_foreach(shadow, shadow[0].device, foreach) and not self.elsewhere
        self.flat: tuple[torch.Tensor, torch.Tensor] | None = None
        self.native: Callable[[float], None] | None = None

    def compile(self, compile: bool | None) -> None:
        """Average with the native lerp (``_native.lerp_plan``: torch's ``lerp_`` bit for bit, in one pass)
        where ``_native.lerps(compile)`` and every (shadow, live) pair :func:`_native.fits` it (which rules
        out mixed dtypes and devices)."""
        from . import _native

        shadow, live = self.pairs()
        self.native = None
        if _native.lerps(compile) and all(_native.fits(a, b, _native.LERP_DTYPES) for a, b in zip(shadow, live)):
            self.native = _native.lerp_plan(shadow, live)

    def pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The (shadows, live tensors) one average writes and reads."""
        return ([self.flat[0]], [self.flat[1]]) if self.flat is not None else (self.shadow, self.live)

    def average(self, weight: float) -> None:
        if self.native is not None:
            self.native(weight)
        elif self.flat is not None:
            shadow, live = self.flat
            live = live.to(shadow.device) if self.elsewhere else live
            if self.mixed:  # lerp takes one dtype: a float32 average of a half model takes two passes
                shadow.mul_(1.0 - weight).add_(live, alpha=weight)
            else:
                shadow.lerp_(live, weight)
        elif self.fused and not self.mixed:
            torch._foreach_lerp_(self.shadow, self.live, weight)
        elif self.fused:
            torch._foreach_mul_(self.shadow, 1.0 - weight)
            torch._foreach_add_(self.shadow, self.live, alpha=weight)
        else:
            for s, t in zip(self.shadow, self.live):  # per tensor: no foreach kernels, or shadows elsewhere
                s.mul_(1.0 - weight).add_(t.to(s.device), alpha=weight) if self.mixed else s.lerp_(t, weight)


def planned(buckets: Sequence[Bucket]) -> list[torch.Tensor]:
    """The shadows that native plans write by address (their memory must not move under the plans)."""
    return [t for b in buckets if b.native is not None for t in b.pairs()[0]]
