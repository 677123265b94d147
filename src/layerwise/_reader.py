"""Reading ahead: slices of checkpoint tensors read in a background thread while the caller merges
and writes the previous ones, so a streaming merge runs at the speed of its slowest stage, not
at the sum of all of them.

On Linux a slice of a safetensors file is a view of the page cache, not a copy: the reader maps
the file, fills the page table entries of the next slice (``madvise(MADV_POPULATE_READ)``) while
the consumer merges the current one, and drops them once the consumer has taken the next
(``MADV_DONTNEED``), so resident memory stays at two slices per input. That took the reader's
CPU time for 2 GB from 0.46 s (copying) to nearly nothing, and a merge's from ~1.0 s to 0.65 s.
Elsewhere, and for ``.pt`` inputs, reads go into a ring of reused buffers (no allocation per
slice). With ``depth=1`` either is double buffering: one set being read while the other is
merged. File reads, madvise (called through ctypes) and torch kernels release the GIL, so one
thread is enough to overlap them.

Each slice is checked against the file's size before it is mapped, and a file that shrank since
raises :class:`CheckpointError`; only a file cut while its slice is being merged ends the process
(SIGBUS), as with any memory-mapped reader (safetensors, ``torch.load(mmap=True)``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from ._files import Checkpoint
from ._pages import madvise as _madvise
from ._stream import no_signals
from .errors import CheckpointError

_POPULATE_READ, _DONTNEED = 22, 4  # linux/mman.h (MADV_POPULATE_READ: Linux 5.14)


Read = tuple[str, Sequence[Checkpoint], int, int]  # key, the checkpoints to read it from, element range


class SliceReader:
    """Reads ``reads`` in order, ``depth`` ahead of the consumer; :meth:`take` hands them out per key.

    A taken slice stays valid until the consumer takes the next one (its buffer is then reused).
    """

    def __init__(self, reads: Iterable[Read], *, depth: int = 1, mapped: bool = True):
        self._reads = iter(reads)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="layerwise-reader", initializer=no_signals)
        self._ring: list[list[torch.Tensor]] = [[] for _ in range(depth + 1)]
        self._held: list[list[tuple[int, int]]] = [[] for _ in range(depth + 1)]  # page ranges mapped per slot
        self._maps: dict[Path, torch.Tensor] | None = {} if mapped and _madvise() is not None else None
        self._slot = 0
        self._pending: deque[tuple[str, Future]] = deque()
        for _ in range(depth):
            self._submit()

    def _submit(self) -> None:
        read = next(self._reads, None)
        if read is not None:
            self._pending.append((read[0], self._pool.submit(self._read, self._slot, *read)))
            self._slot = (self._slot + 1) % len(self._ring)

    def _read(self, slot: int, key: str, sources: Sequence[Checkpoint], start: int, stop: int) -> list[torch.Tensor]:
        for pages in self._held[slot]:  # the consumer is done with this slot: its pages leave our memory
            _madvise()(*pages, _DONTNEED)
        self._held[slot].clear()
        buffers = self._ring[slot]
        out = []
        for i, ckpt in enumerate(sources):
            view = self._mapped(slot, ckpt, key, start, stop)
            if view is not None:
                out.append(view)
                continue
            n = (stop - start) * ckpt.specs[key][1].itemsize
            while len(buffers) <= i:  # by input position: a mapped input before this one took no buffer
                buffers.append(torch.empty(0, dtype=torch.uint8))
            if buffers[i].numel() < n:
                buffers[i] = torch.empty(n, dtype=torch.uint8)
            out.append(ckpt.read_flat(key, start, stop, out=buffers[i][:n]))
        return out

    def _mapped(self, slot: int, ckpt: Checkpoint, key: str, start: int, stop: int) -> torch.Tensor | None:
        """The slice as a view of the page cache, its page table entries filled here (so the consumer
        takes no page faults), or None where it is read into a buffer instead."""
        where = ckpt.stored_at(key) if self._maps is not None else None
        dtype = ckpt.specs[key][1]
        if where is None or where[1] % dtype.itemsize:  # a .pt input, or data misaligned for a view
            return None
        path, offset = where[0], where[1] + start * dtype.itemsize
        n = (stop - start) * dtype.itemsize
        whole = self._maps.get(path)
        if whole is None:
            with open(path, "rb") as f:  # a private mapping: writable, so torch takes it without a warning
                whole = self._maps[path] = torch.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY),
                                                            dtype=torch.uint8)
        if offset + n > whole.numel():
            raise CheckpointError(f"{path}: truncated while reading tensor {key!r}")
        lo = (whole.data_ptr() + offset) // mmap.PAGESIZE * mmap.PAGESIZE
        pages = (lo, -(-(whole.data_ptr() + offset + n - lo) // mmap.PAGESIZE) * mmap.PAGESIZE)
        if _madvise()(*pages, _POPULATE_READ) != 0:
            if ctypes.get_errno() != errno.EINVAL:  # EFAULT, EIO: the file shrank since its header was read
                raise CheckpointError(f"{path}: truncated or unreadable while reading tensor {key!r}")
            self._maps = None  # a kernel before 5.14: no populating, read into buffers instead
            return None
        self._held[slot].append(pages)
        return whole[offset:offset + n].view(dtype)

    def take(self, key: str) -> Iterator[list[torch.Tensor]]:
        """The slices read for ``key``, in order: one tensor per checkpoint of its read."""
        while self._pending and self._pending[0][0] == key:
            _, future = self._pending.popleft()
            tensors = future.result()
            self._submit()
            yield tensors

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._maps = None  # each mapping goes with the last view of it

    def __enter__(self) -> SliceReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Scratch:
    """Buffers the consumer reuses from slice to slice, one per role and dtype, grown to the largest
    slice: a fresh process would page-fault (and zero) every new buffer, and glibc hands large
    ones back to the system when freed, so allocating per slice cost ~20% of a merge's time.

    Example:
        >>> s = Scratch()
        >>> a = s.like(torch.ones(3, dtype=torch.bfloat16), torch.float32, "x0")
        >>> a, a.data_ptr() == s.like(torch.ones(2, dtype=torch.half), torch.float32, "x0").data_ptr()
        (tensor([1., 1., 1.]), True)
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, role: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        """A flat buffer of ``numel`` elements, valid until the next ``get`` of this role and dtype."""
        t = self._buffers.get((role, dtype))
        if t is None or t.numel() < numel:
            t = self._buffers[role, dtype] = torch.empty(numel, dtype=dtype)
        return t[:numel]

    def like(self, x: torch.Tensor, dtype: torch.dtype, role: str) -> torch.Tensor:
        """``x`` itself when it has ``dtype``, else a flat copy of it converted, in this role's buffer."""
        return x if x.dtype == dtype else self.get(role, dtype, x.numel()).copy_(x.reshape(-1))


@contextlib.contextmanager
def one_compute_thread() -> Iterator[None]:
    """torch's intra-op threads off while slices stream: the slice arithmetic is bound by memory, and
    spinning OpenMP workers take the core the reader needs (measured: 2 threads were ~1.4x slower
    than 1 for an averaging merge on 2 cores). The setting is restored on exit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
