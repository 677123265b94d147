"""Reading ahead: slices of checkpoint tensors read in a background thread while the caller merges
and writes the previous ones, so a streaming merge runs at the speed of its slowest stage, not
at the sum of all of them.

Reads go into a ring of reused buffers (no allocation, no page faults per slice); with
``depth=1`` that is double buffering: one set being read while the other is merged. File reads
and torch kernels release the GIL, so one thread is enough to overlap them.
"""

from __future__ import annotations

import contextlib
import signal
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ._files import Checkpoint

Read = tuple[str, Sequence[Checkpoint], int, int]  # key, the checkpoints to read it from, element range


def _no_signals() -> None:
    """Signals go to the main thread: Ctrl-C delivered to a sleeping reader could run its handler
    only after the main thread had finished (the kernel picks any thread that does not block it)."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())


class SliceReader:
    """Reads ``reads`` in order, ``depth`` ahead of the consumer; :meth:`take` hands them out per key.

    A taken slice stays valid until the consumer takes the next one (its buffer is then reused).
    """

    def __init__(self, reads: Iterable[Read], *, depth: int = 1):
        self._reads = iter(reads)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="layerwise-reader", initializer=_no_signals)
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
