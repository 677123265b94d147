"""Reading ahead: slices of checkpoint tensors read in a background thread while the caller merges
and writes the previous ones, so a streaming merge runs at the speed of its slowest stage, not
at the sum of all of them.

Reads go into a ring of reused buffers (no allocation, no page faults per slice); with
``depth=1`` that is double buffering: one set being read while the other is merged. File reads
and torch kernels release the GIL, so one thread is enough to overlap them.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ._files import Checkpoint
from ._stream import no_signals

Read = tuple[str, Sequence[Checkpoint], int, int]  # key, the checkpoints to read it from, element range


class SliceReader:
    """Reads ``reads`` in order, ``depth`` ahead of the consumer; :meth:`take` hands them out per key.

    A taken slice stays valid until the consumer takes the next one (its buffer is then reused).
    """

    def __init__(self, reads: Iterable[Read], *, depth: int = 1):
        self._reads = iter(reads)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="layerwise-reader", initializer=no_signals)
        self._ring: list[list[torch.Tensor]] = [[] for _ in range(depth + 1)]
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
        buffers = self._ring[slot]
        out = []
        for i, ckpt in enumerate(sources):
            n = (stop - start) * ckpt.specs[key][1].itemsize
            if len(buffers) <= i:
                buffers.append(torch.empty(n, dtype=torch.uint8))
            elif buffers[i].numel() < n:
                buffers[i] = torch.empty(n, dtype=torch.uint8)
            out.append(ckpt.read_flat(key, start, stop, out=buffers[i][:n]))
        return out

    def take(self, key: str) -> Iterator[list[torch.Tensor]]:
        """The slices read for ``key``, in order: one tensor per checkpoint of its read."""
        while self._pending and self._pending[0][0] == key:
            _, future = self._pending.popleft()
            tensors = future.result()
            self._submit()
            yield tensors

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

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
