"""Reading ahead: the background reader hands out exactly what direct reads give, in order."""

import torch

import layerwise as lw
from layerwise._files import open_checkpoint
from layerwise._reader import SliceReader


def test_slices_read_ahead_equal_direct_reads_across_keys_and_reused_buffers(tmp_path):
    torch.manual_seed(0)
    state = {"a": torch.randn(10), "b": torch.randn(7).to(torch.bfloat16), "c": torch.randn(3, 4)}
    lw.save(state, tmp_path / "x.safetensors")
    lw.save({k: v * 2 for k, v in state.items()}, tmp_path / "y.safetensors")
    with open_checkpoint(tmp_path / "x.safetensors") as x, open_checkpoint(tmp_path / "y.safetensors") as y:
        plan = [(k, [x, y], start, min(v.numel(), start + 3)) for k, v in state.items()
                for start in range(0, v.numel(), 3)]
        with SliceReader(plan, depth=1) as reader:
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
