"""Memory layerwise streams through itself (EMA shadows, the monitor's kept snapshot, flat parameter
storage): one buffer per device and dtype, in transparent huge pages on Linux CPUs.

A CPU kernel streaming tens of MB through 4 KiB pages misses the TLB every 4 KiB, and under a
hypervisor each miss walks two page tables. On the benchmark VM an EMA update whose shadows sit in
huge pages took 0.70x the time of the same lerp over 4 KiB pages, and separate allocations ran
0.9x-1.3x that time by where they landed (``benchmarks/README.md``). torch can do this for all of
its allocations (``THP_MEM_ALLOC_ENABLE=1``, read once at start-up); this does it for ours alone.
"""

from __future__ import annotations

import functools
import mmap
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["empty", "huge_page_size", "packed_like"]

_ALIGN = 64  # each packed tensor starts on a cache line, as torch's own allocations do


@functools.cache
def huge_page_size() -> int:
    """The size of a transparent huge page, or 0 where the system has none to give (off Linux, or
    with them turned off): 2 MiB on x86-64 and on arm64 with 4 KiB pages."""
    folder = Path("/sys/kernel/mm/transparent_hugepage")
    if sys.platform != "linux" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return 0
    try:  # "always [madvise] never": the bracketed mode is the system's
        if "[never]" in (folder / "enabled").read_text():
            return 0
        return int((folder / "hpage_pmd_size").read_text())
    except (OSError, ValueError):
        return 0


def empty(numel: int, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """An uninitialized 1-D tensor. On a Linux CPU, from one huge page up, its memory is a private
    anonymous mapping that starts on a huge page, whose whole huge pages are advised
    ``MADV_HUGEPAGE`` before anything touches them: the kernel backs them with huge pages where it
    has them, else with 4 KiB pages as usual. Its storage is exactly ``numel`` elements (a saved
    tensor writes no more); the mapping's unused head is never touched, so it takes no memory."""
    huge = huge_page_size() if torch.device(device).type == "cpu" else 0
    size = numel * dtype.itemsize
    if size < huge or not huge:
        return torch.empty(numel, dtype=dtype, device=device)
    try:
        mapping = mmap.mmap(-1, size + huge, flags=mmap.MAP_PRIVATE)  # anonymous: zero pages, mapped on first touch
    except OSError:  # no address space or map left: torch's allocator says why, or manages
        return torch.empty(numel, dtype=dtype, device=device)
    start = -torch.frombuffer(mapping, dtype=torch.uint8, count=1).data_ptr() % huge
    mapping.madvise(mmap.MADV_HUGEPAGE, start, size // huge * huge)
    # The tensor holds the mapping (a buffer export) and unmaps it when its storage is freed.
    return torch.frombuffer(mapping, dtype=dtype, count=numel, offset=start)


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
