"""Memory layerwise streams through itself (EMA shadows, the monitor's kept snapshot, flat parameter
storage): one buffer per device and dtype, in transparent huge pages on Linux CPUs.

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

__all__ = ["empty", "huge_page_size", "madvise", "packed_like"]

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
def huge_page_size() -> int:
    """The size of a transparent huge page, or 0 where the system has none to give (off Linux, or
    with them turned off): 2 MiB on x86-64 and on arm64 with 4 KiB pages."""
    if madvise() is None:
        return 0
    folder = Path("/sys/kernel/mm/transparent_hugepage")
    try:  # "always [madvise] never": the bracketed mode is the system's
        if "[never]" in (folder / "enabled").read_text():
            return 0
        return int((folder / "hpage_pmd_size").read_text())
    except (OSError, ValueError):
        return 0


def empty(numel: int, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """``torch.empty(numel, dtype=dtype, device=device)``; on a Linux CPU, the huge pages that fit
    inside it (from its first huge-page boundary to its last) are advised ``MADV_HUGEPAGE`` before
    anything touches them: the kernel backs them with huge pages where it has them, else with
    4 KiB pages as usual. Up to a huge page at each end stays in 4 KiB pages: the allocation is
    torch's own, resizable, and exactly as large as asked (a saved tensor writes no slack)."""
    out = torch.empty(numel, dtype=dtype, device=device)
    huge = huge_page_size() if out.device.type == "cpu" else 0
    if huge:
        address = out.data_ptr()
        start, end = -(-address // huge) * huge, (address + numel * dtype.itemsize) // huge * huge
        if end > start:
            madvise()(start, end - start, _MADV_HUGEPAGE)  # best effort: where it fails, 4 KiB pages
    return out


def packed_like(tensors: Sequence[Tensor], dtype: torch.dtype | None = None,
                device: torch.device | str | None = None) -> list[Tensor]:
    """Uninitialized tensors shaped like ``tensors`` (in ``dtype``, on ``device`` where given): on a
    CPU the contiguous ones as views into one :func:`empty` buffer per dtype, each from a 64-byte
    boundary (a view saved alone writes its whole buffer, as any view); the others, and any
    elsewhere, ``torch.empty_like``, strides kept."""
    out: list[Tensor | None] = [None] * len(tensors)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        target = (torch.device(device) if device is not None else t.device, dtype or t.dtype)
        if t.is_contiguous() and target[0].type == "cpu":  # where the huge pages pay
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
