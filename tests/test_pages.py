"""The memory layerwise streams through itself: one buffer per dtype, in huge pages on Linux CPUs."""

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

import layerwise as lw
from layerwise import _pages

_MB = 1 << 20
huge_pages = pytest.mark.skipif(not _pages.huge_page_size(),
                                reason="transparent huge pages are a Linux feature the system may turn off")


def advised_huge(address: int) -> bool:
    """Whether the mapping holding ``address`` is advised MADV_HUGEPAGE (VmFlags ``hg``): what the
    call decides, whether or not the kernel then finds free huge pages."""
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            if start <= address < end:
                flags = next(entry for entry in lines[i + 1:] if entry.startswith("VmFlags:"))
                return "hg" in flags.split()[1:]
    raise AssertionError(f"{address:#x} is not mapped")


@huge_pages
def test_the_huge_pages_inside_a_large_buffer_are_advised_and_it_stays_torch_s_own_allocation():
    x = _pages.empty(5 * _MB // 4, torch.float32, "cpu")
    assert x.shape == (5 * _MB // 4,) and x.dtype == torch.float32 and x.is_contiguous()
    assert x.untyped_storage().nbytes() == 5 * _MB  # a saved tensor writes its own bytes only
    huge = _pages.huge_page_size()
    first = -(-x.data_ptr() // huge) * huge  # 5 MiB hold at least one whole huge page
    assert advised_huge(first) and advised_huge(first + huge - 1)
    x.fill_(3.0)  # all of it is ours to write
    assert x.sum().item() == 3.0 * x.numel()
    shared = x[:8].share_memory_()  # what DataLoader workers and Hogwild do
    assert shared.is_shared() and torch.equal(shared, torch.full((8,), 3.0))
    x.untyped_storage().resize_(0)  # as code that frees a tensor's memory does


def test_a_small_buffer_is_a_plain_allocation():
    x = _pages.empty(1000, torch.float64, "cpu")
    assert x.untyped_storage().nbytes() == 8000 and x.shape == (1000,)


def test_buffers_go_where_they_are_asked_whatever_the_default_device():
    model, source = torch.nn.Linear(1024, 1024), torch.ones(2, _MB // 2)  # 4 MiB of CPU weights; 4 MiB
    with torch.device("meta"):  # as under torch.set_default_device("cuda")
        assert _pages.empty(_MB, torch.float32, "cpu").device.type == "cpu"
        assert _pages.packed_like([source])[0].device.type == "cpu"
        ema = lw.EMA(model, decay=0.9)
        lw.flatten_parameters(model)
    assert all(s.device.type == "cpu" for s in ema.shadow)
    assert model.weight.device.type == "cpu"


def test_packed_tensors_are_disjoint_aligned_views_of_one_buffer_and_keep_their_layout():
    sources = [torch.randn(3, 5), torch.randn(7), torch.randn(4, 6).t(), torch.randn(0), torch.randn(2, 2, 2)]
    packed = _pages.packed_like(sources, torch.float64)
    assert [p.shape for p in packed] == [s.shape for s in sources]
    assert all(p.dtype == torch.float64 for p in packed)
    assert packed[2].stride() == sources[2].stride()  # not contiguous: its own allocation, strides kept
    dense = [p for i, p in enumerate(packed) if i != 2]
    assert len({p.untyped_storage().data_ptr() for p in dense}) == 1
    assert all(p.data_ptr() % 64 == 0 for p in dense if p.numel())
    for p in dense:
        p.fill_(1.0)
    for p, s in zip(dense, (s for i, s in enumerate(sources) if i != 2)):
        p.copy_(s)  # each write lands in its own slot only
    assert all(torch.equal(p, s.double()) for p, s in zip(packed, sources) if p is not packed[2])


@huge_pages
def test_ema_shadows_share_one_buffer_in_huge_pages_and_save_as_separate_tensors(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 512))
    ema = lw.EMA(model, decay=0.9)
    shadows = list(ema.state_dict()["shadow"].values())
    assert len({s.untyped_storage().data_ptr() for s in shadows}) == 1
    storage = shadows[0].untyped_storage()  # 4 MiB: at least one whole huge page inside
    assert storage.nbytes() <= 4 * sum(s.numel() + 15 for s in shadows)  # no more than each view's alignment
    assert advised_huge(-(-storage.data_ptr() // _pages.huge_page_size()) * _pages.huge_page_size())
    reference = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    for shadow, before, p in zip(shadows, reference, model.parameters()):
        assert torch.equal(shadow, before.lerp(p.detach(), 0.1))  # each view is its own parameter's average
    save_file(ema.state_dict()["shadow"], tmp_path / "ema.safetensors")
    loaded = load_file(tmp_path / "ema.safetensors")
    assert all(torch.equal(loaded[name], s) for name, s in ema.state_dict()["shadow"].items())
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    again = lw.EMA(copy.deepcopy(model), decay=0.9)
    again.load_state_dict(torch.load(tmp_path / "ema.pt"))
    assert all(torch.equal(a, b) for a, b in zip(again.shadow, ema.shadow))


def test_only_a_cpu_packs_tensors_into_one_buffer():
    meta = _pages.packed_like([torch.ones(3, 4), torch.ones(5)], device="meta")
    assert [t.shape for t in meta] == [(3, 4), (5,)] and all(t.device.type == "meta" for t in meta)
    assert meta[0].untyped_storage() is not meta[1].untyped_storage()
