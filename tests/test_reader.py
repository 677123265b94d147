"""Reading ahead: the background reader hands out exactly what direct reads give, in order."""

import ctypes
import errno
import re

import pytest
import torch

import layerwise as lw
import layerwise._reader as reader_module
from layerwise._files import open_checkpoint
from layerwise._reader import SliceReader

needs_madvise = pytest.mark.skipif(reader_module._madvise() is None, reason="slices are mapped on Linux only")


def rss_file_mb() -> float:
    """Pages of mapped files this process holds (they count in its RSS)."""
    return int(re.search(r"RssFile:\s+(\d+)", open("/proc/self/status").read())[1]) / 1024


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "read"])
def test_slices_read_ahead_equal_direct_reads_across_keys_and_reused_buffers(tmp_path, mapped):
    torch.manual_seed(0)
    state = {"a": torch.randn(10), "b": torch.randn(7).to(torch.bfloat16), "c": torch.randn(3, 4)}
    lw.save(state, tmp_path / "x.safetensors")
    lw.save({k: v * 2 for k, v in state.items()}, tmp_path / "y.safetensors")
    with open_checkpoint(tmp_path / "x.safetensors") as x, open_checkpoint(tmp_path / "y.safetensors") as y:
        plan = [(k, [x, y], start, min(v.numel(), start + 3)) for k, v in state.items()
                for start in range(0, v.numel(), 3)]
        with SliceReader(plan, depth=1, mapped=mapped) as reader:
            for key, v in state.items():
                got = [[t.clone() for t in read] for read in reader.take(key)]
                flat = v.reshape(-1)
                assert len(got) == -(-v.numel() // 3)
                assert torch.equal(torch.cat([g[0] for g in got]), flat)
                assert torch.equal(torch.cat([g[1] for g in got]), flat * 2)


def test_a_file_merge_reading_ahead_while_reading_whole_tensors_equals_the_in_memory_merge(tmp_path):
    torch.manual_seed(1)
    nets = [torch.nn.Sequential(*(torch.nn.Linear(64, 64) for _ in range(6))) for _ in range(3)]
    paths = [lw.save(n, tmp_path / f"{i}.safetensors") for i, n in enumerate(nets)]
    # ties reads whole tensors of the selected keys while the reader copies the others from the base
    out = lw.merge_files(paths[1:], tmp_path / "out.safetensors", "ties", base=paths[0], density=0.5,
                         select=["[0-2]"])
    expected = lw.merge(nets[0], nets[1:], "ties", density=0.5, select=["[0-2]"])
    got = lw.load(out)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.parametrize("order", ["st,pt", "pt,st", "st,pt,st", "st,st,pt"])
def test_a_merge_of_safetensors_and_torch_files_in_any_order_equals_the_in_memory_merge(tmp_path, order):
    # A mapped safetensors input takes no read buffer: a .pt input after it found no buffer at its position.
    states = [{"w": torch.randn(5, 3, generator=torch.Generator().manual_seed(i)), "n": torch.tensor(i)}
              for i, _ in enumerate(order.split(","))]
    paths = []
    for i, (kind, state) in enumerate(zip(order.split(","), states)):
        paths.append(tmp_path / f"{i}.{'safetensors' if kind == 'st' else 'pt'}")
        lw.save(state, paths[-1])
    got = lw.load(lw.merge_files(paths, tmp_path / "out.safetensors"))
    expected = lw.merge(None, states)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


@needs_madvise
def test_mapped_slices_release_their_pages_once_the_next_is_taken(tmp_path):
    lw.save({"w": torch.arange(2**24, dtype=torch.int32)}, tmp_path / "x.safetensors")  # 64 MB
    with open_checkpoint(tmp_path / "x.safetensors") as x:
        starts = range(0, 2**24, 2**18)  # 1 MB slices
        before, peak = rss_file_mb(), 0.0
        with SliceReader([("w", [x], start, start + 2**18) for start in starts], depth=1) as reader:
            for start, (got,) in zip(starts, reader.take("w")):
                assert torch.equal(got, torch.arange(start, start + 2**18, dtype=torch.int32))  # every page touched
                peak = max(peak, rss_file_mb() - before)
    assert peak < 8, f"{peak:.0f} MB of the 64 MB file stayed mapped"


@needs_madvise
def test_a_file_truncated_while_read_is_an_error_not_a_crash(tmp_path):
    lw.save({"a": torch.zeros(10), "b": torch.ones(2**20)}, tmp_path / "x.safetensors")
    with open_checkpoint(tmp_path / "x.safetensors") as x:
        plan = [("a", [x], 0, 10)] + [("b", [x], start, start + 2**16) for start in range(0, 2**20, 2**16)]
        with SliceReader(plan, depth=1) as reader:
            list(reader.take("a"))
            with open(tmp_path / "x.safetensors", "r+b") as f:
                f.truncate(4096)
            with pytest.raises(lw.CheckpointError, match="x.safetensors: truncated"):
                for _ in reader.take("b"):  # the slices are not touched: a page beyond the end would be SIGBUS
                    pass


def test_a_kernel_without_populate_reads_into_buffers(tmp_path, monkeypatch):
    def old_kernel(address, length, advice):
        ctypes.set_errno(errno.EINVAL)
        return -1
    monkeypatch.setattr(reader_module, "_madvise", lambda: old_kernel)
    lw.save({"w": torch.arange(100.0)}, tmp_path / "x.safetensors")
    with open_checkpoint(tmp_path / "x.safetensors") as x:
        with SliceReader([("w", [x], 0, 50), ("w", [x], 50, 100)], depth=1) as reader:
            got = [t.clone() for (t,) in reader.take("w")]
    assert torch.equal(torch.cat(got), torch.arange(100.0))
