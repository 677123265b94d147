"""Writing a new file at disk speed: bytes are copied into two aligned buffers that a background
thread writes in turn, with ``O_DIRECT`` where the file system takes it, so writing overlaps the
work that produces the bytes and bypasses the page cache.

Why past the page cache: a buffered write makes the kernel find a fresh page for every 4 KiB of
output. Where free memory is handed back to a hypervisor (virtio-balloon free page reporting, as
on the machine the benchmarks ran on), each such page is a fault on the host: a 509 MB output
took 1.0–1.4 s to write buffered and 0.25 s direct, fsync included. A direct write also leaves
the page cache to what is read (the inputs of a merge), and leaves nothing to flush at the fsync.
Elsewhere (no ``O_DIRECT``, or a file system that refuses it) the same buffers are written with
plain writes.
"""

from __future__ import annotations

import errno
import os
import signal
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

_DIRECT = getattr(os, "O_DIRECT", 0)
_BLOCK = 4096  # O_DIRECT aligns addresses, sizes and offsets to the logical block: 512 B or 4 KiB
CHUNK = 8 << 20  # bytes per write (1 to 8 MiB wrote alike, 2 GB/s), room for a 4 MB slice in place


def no_signals() -> None:
    """Signals go to the main thread: Ctrl-C delivered to a sleeping helper thread could run its
    handler only after the main thread had finished (the kernel picks any thread that does not
    block it)."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())


def _aligned(n: int) -> torch.Tensor:
    raw = torch.empty(n + _BLOCK, dtype=torch.uint8)
    start = -raw.data_ptr() % _BLOCK
    return raw[start:start + n]


class DiskStream:
    """Appends tensors' bytes to the new file ``path``; :meth:`finish` writes the rest and fsyncs.

    A stream that is not finished (an error in the block that fills it) is closed without its
    last bytes: the caller removes the file. Example:

        >>> import tempfile, os, torch
        >>> path = os.path.join(tempfile.mkdtemp(), "x.bin")
        >>> with DiskStream(path) as s:
        ...     s.write(torch.tensor([1, 2], dtype=torch.int16)); s.finish()
        >>> open(path, "rb").read()
        b'\\x01\\x00\\x02\\x00'
    """

    def __init__(self, path: str | os.PathLike, *, chunk: int | None = None, direct: bool = True):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0)
        self._direct = bool(direct and _DIRECT)
        self._fd = -1
        if self._direct:
            try:
                self._fd = os.open(Path(path), flags | _DIRECT, 0o666)
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: this file system has no direct I/O (tmpfs before Linux 6.6)
                    raise
                self._direct = False
        if self._fd < 0:
            self._fd = os.open(Path(path), flags, 0o666)
        self._chunk = chunk = chunk or CHUNK  # a multiple of _BLOCK
        self._buffers = [_aligned(chunk) for _ in range(2)]  # the one being filled, the one being written
        self._filling = 0
        self._used = 0  # bytes in the buffer being filled
        self.size = 0  # bytes appended so far
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    def room(self, numel: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Where the next ``numel`` elements of ``dtype`` go in the buffer being filled, for the caller
        to compute them in place: writing that tensor next copies nothing. None where the bytes so
        far leave the position misaligned for ``dtype``, or the piece is larger than a buffer."""
        n = numel * dtype.itemsize
        if self.size % dtype.itemsize or n > self._chunk - _BLOCK:
            return None
        if self._used + n > self._chunk:
            self._hand_over(self._used // _BLOCK * _BLOCK)  # whole blocks go, the rest moves to the other buffer
        return self._buffers[self._filling][self._used:self._used + n].view(dtype)

    def write(self, t: torch.Tensor) -> None:
        """Append the bytes of ``t`` (any dtype, little-endian as in memory)."""
        # resolve_*: a lazily conjugated or negated view (x.conj()) has other bytes than its values
        data = t.detach().cpu().resolve_conj().resolve_neg().reshape(-1)
        if data.numel() and data.stride(0) != 1:  # one element at a stride (z.imag): contiguous() keeps it
            data = data.clone(memory_format=torch.contiguous_format)
        data = data.view(torch.uint8)
        done, total = 0, data.numel()
        if total and data.data_ptr() == self._buffers[self._filling].data_ptr() + self._used \
                and self._used + total <= self._chunk:  # computed in place (see room)
            done = total
            self._used += total
            if self._used == self._chunk:
                self._hand_over(self._chunk)
        while done < total:
            n = min(total - done, self._chunk - self._used)
            self._buffers[self._filling][self._used:self._used + n].copy_(data[done:done + n])
            self._used += n
            done += n
            if self._used == self._chunk:
                self._hand_over(self._chunk)
        self.size += total

    def _hand_over(self, n: int) -> None:
        """Write the first ``n`` bytes of the buffer being filled in the background and fill the other
        meanwhile, starting with the bytes beyond ``n``."""
        self._wait()  # the other buffer's write: it is the next to fill
        current, other = self._buffers[self._filling], self._buffers[self._filling ^ 1]
        rest = max(self._used - n, 0)
        other[:rest].copy_(current[n:n + rest])
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="layerwise-writer", initializer=no_signals)
        self._pending = self._pool.submit(self._write_all, memoryview(current[:n].numpy()))
        self._filling ^= 1
        self._used = rest

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _write_all(self, view: memoryview) -> None:
        while len(view):
            try:
                view = view[os.write(self._fd, view):]
            except OSError as e:
                if e.errno != errno.EINVAL or not self._direct:
                    raise
                import fcntl  # here O_DIRECT exists: a POSIX system

                # a file system that opens O_DIRECT but refuses these writes: plain writes from here on
                fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~_DIRECT)
                self._direct = False

    def finish(self) -> None:
        """Write what is buffered, then fsync: the file is complete and durable."""
        if self._used:
            tail = self._used
            if self._direct:  # a direct write is whole blocks: pad it, then cut the file back
                padded = -(-tail // _BLOCK) * _BLOCK
                self._buffers[self._filling][tail:padded].zero_()
                tail = padded
            self._hand_over(tail)
        self._wait()
        if os.fstat(self._fd).st_size != self.size:
            os.ftruncate(self._fd, self.size)
        os.fsync(self._fd)

    def close(self) -> None:
        """Stop the writer thread and close the file (after :meth:`finish`, or abandoning it)."""
        if self._fd < 0:
            return
        try:
            if self._pending is not None:
                self._pending.exception()  # an error is the caller's already, or moot: the file is dropped
            if self._pool is not None:
                self._pool.shutdown(wait=True)
        finally:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> DiskStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
