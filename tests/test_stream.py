"""Writing at disk speed: the file holds exactly the bytes appended, direct or not, whatever the sizes."""

import errno
import os
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import layerwise as lw
import layerwise._stream as stream
from layerwise._stream import DiskStream

DTYPES = [torch.uint8, torch.bool, torch.int16, torch.float16, torch.bfloat16, torch.float32, torch.float64,
          torch.complex64]


def as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def writer_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("layerwise-writer")]


@settings(max_examples=80, deadline=None)
@given(pieces=st.lists(st.tuples(st.integers(0, 5000), st.sampled_from(DTYPES), st.booleans()), max_size=10),
       direct=st.booleans(), seed=st.integers(0, 2**16))
def test_the_file_is_the_concatenation_of_what_was_written(pieces, direct, seed):
    torch.manual_seed(seed)
    tensors = [torch.randint(0, 2 if d == torch.bool else 256, (n * d.itemsize,), dtype=torch.uint8).view(d)
               for n, d, _ in pieces]
    tensors.append(torch.arange(12.0).view(3, 4).t())  # not contiguous: written in its logical order
    in_place = [p[2] for p in pieces] + [False]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.bin"
        with DiskStream(path, chunk=8192, direct=direct) as s:  # two blocks: most writes straddle buffers
            for t, fill in zip(tensors, in_place):
                # computed into the stream's own buffer where it has room (aligned, small enough), else copied
                room = s.room(t.numel(), t.dtype) if fill else None
                s.write(room.copy_(t) if room is not None else t)
            s.finish()
        assert s.size == path.stat().st_size
        assert path.read_bytes() == b"".join(map(as_bytes, tensors))


def test_a_file_system_without_direct_io_gets_plain_writes(tmp_path, monkeypatch):
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & stream._DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")  # as tmpfs before Linux 6.6 answers
        return real_open(path, flags, *args)
    monkeypatch.setattr(stream.os, "open", no_direct)
    data = torch.arange(10_000, dtype=torch.float32)
    with DiskStream(tmp_path / "x.bin", chunk=8192) as s:
        s.write(data)
        s.finish()
    assert (tmp_path / "x.bin").read_bytes() == as_bytes(data)


@pytest.mark.skipif(not stream._DIRECT, reason="no O_DIRECT on this system")
def test_direct_writes_refused_after_opening_fall_back_to_plain_writes(tmp_path, monkeypatch):
    real_write, refused = os.write, []

    def refuse_direct(fd, data):
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETFL) & stream._DIRECT:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")  # a file system that opens O_DIRECT but will not write it
        return real_write(fd, data)
    monkeypatch.setattr(stream.os, "write", refuse_direct)
    data = torch.arange(10_000, dtype=torch.int32)
    with DiskStream(tmp_path / "x.bin", chunk=8192) as s:
        s.write(data)
        s.finish()
    assert refused and (tmp_path / "x.bin").read_bytes() == as_bytes(data)


def test_an_error_while_filling_stops_the_writer_and_closes_the_file(tmp_path):
    with pytest.raises(KeyboardInterrupt), DiskStream(tmp_path / "x.bin", chunk=8192) as s:
        s.write(torch.zeros(100_000))  # several buffers handed to the writer thread
        raise KeyboardInterrupt
    assert s._fd == -1 and not writer_threads()


def test_disk_full_in_the_writer_thread_fails_the_save_and_leaves_nothing(tmp_path, monkeypatch):
    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(stream.os, "write", full)
    monkeypatch.setattr(stream, "CHUNK", 8192)
    with pytest.raises(lw.CheckpointError, match=r"x.safetensors: writing failed \(No space left on device\)"):
        lw.save({"w": torch.zeros(100_000)}, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == [] and not writer_threads()
