"""Memory layerwise streams through itself (EMA shadows, the monitor's weight snapshot): one buffer
per device and dtype, in transparent huge pages on Linux CPUs.

A CPU kernel streaming tens of MB through 4 KiB pages misses the TLB every 4 KiB, and under a
hypervisor each miss walks two page tables. On the benchmark VM an EMA update whose shadows sit in
huge pages took 0.70x the time of the same lerp over 4 KiB pages, and separate allocations ran
0.9x-1.3x that time by where they landed (``benchmarks/README.md``). torch can do this for all of
its allocations (``THP_MEM_ALLOC_ENABLE=1``, read once at start-up); this does it for ours alone.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["empty", "madvise", "packed_like"]

_HUGE = 1 << 21  # a huge page on x86-64, and on arm64 with 4 KiB pages
_MADV_HUGEPAGE = 14  # linux/mman.h
_ALIGN = 64  # each packed tensor starts on a cache line, as torch's own allocations do


@functools.cache
def madvise() -> Any:
    """libc's madvise, called through ctypes so the GIL is released meanwhile; None off Linux."""
    if sys.platform != "linux":
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


@functools.cache
def _huge_pages_allowed() -> bool:
    try:  # "always [madvise] never": the bracketed mode is the system's
        return "[never]" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


def empty(numel: int, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """An uninitialized 1-D tensor. On a Linux CPU, from 2 MiB up and where the system allows
    transparent huge pages, its memory from the first 2 MiB boundary on is advised ``MADV_HUGEPAGE``
    before anything touches it: the kernel backs it with huge pages where it has them, else with
    4 KiB pages as usual. Up to 2 MiB more is allocated (its storage) to find that boundary."""
    device = torch.device(device)
    width = dtype.itemsize
    if device.type != "cpu" or numel * width < _HUGE or madvise() is None or not _huge_pages_allowed():
        return torch.empty(numel, dtype=dtype, device=device)
    raw = torch.empty(numel + _HUGE // width, dtype=dtype)
    address = raw.data_ptr()
    start = -(-address // _HUGE) * _HUGE
    madvise()(start, (address + raw.numel() * width - start) // _HUGE * _HUGE, _MADV_HUGEPAGE)  # best effort
    offset = (start - address) // width  # torch aligns to 64 bytes: a whole number of elements
    return raw[offset:offset + numel]


def packed_like(tensors: Sequence[Tensor], dtype: torch.dtype | None = None,
                device: torch.device | str | None = None) -> list[Tensor]:
    """Uninitialized tensors shaped like ``tensors`` (in ``dtype``, on ``device`` where given): the
    contiguous ones as views into one :func:`empty` buffer per device and dtype, each from a 64-byte
    boundary; the others ``torch.empty_like``, strides kept."""
    out: list[Tensor | None] = [None] * len(tensors)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        target = (torch.device(device) if device is not None else t.device, dtype or t.dtype)
        if t.is_contiguous():
            groups.setdefault(target, []).append(i)
        else:
            out[i] = torch.empty_like(t, dtype=target[1], device=target[0])
    for (where, kind), members in groups.items():
        step = max(1, _ALIGN // kind.itemsize)
        sizes = [-(-tensors[i].numel() // step) * step for i in members]
        flat, at = empty(sum(sizes), kind, where), 0
        for i, size in zip(members, sizes):
            out[i] = flat[at:at + tensors[i].numel()].view(tensors[i].shape)
            at += size
    return out  # type: ignore[return-value]
