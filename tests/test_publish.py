"""Publishing an output: atomic, race-free, never deleting what the writer did not produce.

Faults are injected at every step of publishing (each rename, link or exchange): a SIGKILL
just before or just after it (in a forked child, so the cleanup code never runs), and an I/O
error raised by it. After each, the output path holds the complete old output or the complete
new one, the files the writer did not produce are intact, and only hidden temporaries remain.
"""

import errno
import hashlib
import os
import signal
import threading
from pathlib import Path

import pytest
import torch

import layerwise as lw
import layerwise._publish as publish

OLD = {"w": torch.arange(6.0), "b": torch.zeros(2)}
NEW = {"w": torch.arange(6.0) + 10, "b": torch.ones(2), "c": torch.full((4,), 3.0)}
FOREIGN = {"config.json": b'{"model_type": "llama"}', "tokenizer.json": b"{}", "extra/notes.txt": b"mine"}
STEPS = ("_rename2", "replace", "rename", "link")


def _digest(path: Path) -> dict[str, str]:
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _prepare(tmp_path: Path, folder: bool, existing: bool) -> tuple[Path, dict]:
    out = tmp_path / ("out" if folder else "out.safetensors")
    if existing:
        lw.save(OLD, out, max_shard_size=20 if folder else None)  # two shards when a folder
        if folder:
            for name, data in FOREIGN.items():
                (out / name).parent.mkdir(exist_ok=True)
                (out / name).write_bytes(data)
    return out, {"max_shard_size": 20 if folder else None, "overwrite": existing}


def _instrument(monkeypatch, on_step) -> None:
    """Call ``on_step(name, when)`` before and after each publishing primitive."""
    for name in STEPS:
        owner = publish if name == "_rename2" else os
        real = getattr(owner, name)

        def wrapped(*args, _real=real, _name=name, **kwargs):
            on_step(_name, "before")
            result = _real(*args, **kwargs)
            on_step(_name, "after")
            return result
        monkeypatch.setattr(owner, name, wrapped)


def _check(tmp_path: Path, out: Path, folder: bool, existing: bool, *, may_be_new: bool = True) -> None:
    leftovers = [p.name for p in tmp_path.iterdir() if p != out]
    assert all(n.startswith(f".{out.name}.") for n in leftovers), leftovers
    if not out.exists():
        assert not existing, "an existing output vanished"
        return
    state = lw.load(out)
    assert _same(state, OLD) or (may_be_new and _same(state, NEW)), sorted(state)
    if folder and existing:
        for name, data in FOREIGN.items():
            assert (out / name).read_bytes() == data, f"{name} was lost"


def _steps(tmp_path, monkeypatch, folder, existing) -> list[tuple[str, str]]:
    """The publishing steps of a clean run (in a scratch folder)."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out, kwargs = _prepare(scratch, folder, existing)
    seen: list[tuple[str, str]] = []
    with monkeypatch.context() as m:
        _instrument(m, lambda name, when: seen.append((name, when)))
        lw.save(NEW, out, **kwargs)
    return seen


@pytest.mark.parametrize("folder", [False, True], ids=["file", "folder"])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_a_kill_at_any_publishing_step_leaves_the_old_or_the_new_output_whole(tmp_path, monkeypatch, folder, existing):
    steps = _steps(tmp_path, monkeypatch, folder, existing)
    assert steps, "publishing made no rename"
    for i in range(len(steps)):
        run = tmp_path / f"run{i}"
        run.mkdir()
        out, kwargs = _prepare(run, folder, existing)
        pid = os.fork()
        if pid == 0:  # the child: publish, and die at step i without any cleanup
            def die(name, when, count=iter(range(len(steps))), i=i):
                if next(count) == i:
                    os.kill(os.getpid(), signal.SIGKILL)
            try:
                _instrument(monkeypatch, die)
                lw.save(NEW, out, **kwargs)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, steps[i]
        _check(run, out, folder, existing)
        monkeypatch.undo()


@pytest.mark.parametrize("folder", [False, True], ids=["file", "folder"])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
@pytest.mark.parametrize("kernel", [True, False], ids=["renameat2", "plain-rename"])
def test_an_io_error_at_any_publishing_step_keeps_the_old_output_and_removes_temporaries(
        tmp_path, monkeypatch, folder, existing, kernel):
    if not kernel:
        monkeypatch.setattr(publish, "_renameat2", lambda: None)
    steps = [s for s in _steps(tmp_path, monkeypatch, folder, existing) if s[1] == "before"]
    for i in range(len(steps)):
        run = tmp_path / f"run{i}"
        run.mkdir()
        out, kwargs = _prepare(run, folder, existing)
        before = _digest(out) if existing else None
        def fail(name, when, i=i, count=iter(range(len(steps) * 2))):
            if when == "before" and next(count) == i:
                raise OSError(errno.EIO, "Input/output error")
        with monkeypatch.context() as m:
            _instrument(m, fail)
            try:
                lw.save(NEW, out, **kwargs)
                failed = False
            except lw.CheckpointError as e:  # a step with no fallback: named, and nothing changed
                assert f"{out.name}: writing failed (Input/output error)" in str(e)
                failed = True
        assert failed or steps[i][0] == "link", f"{steps[i]} failed silently"  # linking kept files may copy instead
        assert [p.name for p in run.iterdir() if p != out] == [], "temporaries left behind"
        if failed:
            assert (_digest(out) if existing else out.exists()) == (before if existing else False)
        else:
            _check(run, out, folder, existing)
            assert _same(lw.load(out), NEW)


def test_overwriting_a_file_is_one_atomic_rename(tmp_path, monkeypatch):
    out, kwargs = _prepare(tmp_path, folder=False, existing=True)
    steps = _steps(tmp_path, monkeypatch, False, True)
    assert [name for name, when in steps if when == "before"] == ["replace"]


def test_overwriting_a_folder_keeps_files_the_writer_did_not_produce_and_drops_its_old_shards(tmp_path):
    out, kwargs = _prepare(tmp_path, folder=True, existing=True)
    old_shards = {p.name for p in out.glob("model-*.safetensors")}
    lw.save(NEW, out, **kwargs)
    assert _same(lw.load(out), NEW)
    for name, data in FOREIGN.items():
        assert (out / name).read_bytes() == data
    new_shards = {p.name for p in out.glob("model-*.safetensors")}
    assert old_shards - new_shards, "the test needs shards that only the old output had"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        {"config.json", "tokenizer.json", "extra", "model.safetensors.index.json"} | new_shards)


def test_an_old_index_naming_files_that_are_not_weights_does_not_get_them_deleted(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "README.md").write_text("my card")
    (out / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "notes.txt", "b": "README.md", "c": "old.safetensors"}}')
    (out / "old.safetensors").write_bytes(b"stale shard")
    lw.save(NEW, out, max_shard_size=16, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "README.md").read_text() == "my card"
    assert not (out / "old.safetensors").exists() and _same(lw.load(out), NEW)


@pytest.mark.parametrize("folder", [False, True], ids=["file", "folder"])
@pytest.mark.parametrize("kernel", [True, False], ids=["renameat2", "link-or-rename"])
def test_without_overwrite_concurrent_writers_exactly_one_wins(tmp_path, monkeypatch, folder, kernel):
    if not kernel:
        monkeypatch.setattr(publish, "_renameat2", lambda: None)
    out = tmp_path / ("race" if folder else "race.safetensors")
    writers = 6
    barrier = threading.Barrier(writers)
    real = publish.publish_new

    def synchronised(temp, output):
        barrier.wait(timeout=30)  # every writer has passed its checks and holds a finished temporary
        real(temp, output)
    monkeypatch.setattr(publish, "publish_new", synchronised)
    results: list = [None] * writers

    def write(i):
        try:
            lw.save({"w": torch.full((3,), float(i))}, out, max_shard_size=100 if folder else None)
            results[i] = "won"
        except Exception as e:
            results[i] = e

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, r in enumerate(results) if r == "won"]
    assert len(winners) == 1, results
    assert all(isinstance(r, lw.OutputExistsError) for r in results if r != "won"), results
    assert lw.load(out)["w"].tolist() == [float(winners[0])] * 3
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_disk_full_names_the_output_and_leaves_nothing(tmp_path, monkeypatch):
    import layerwise._write as writer

    out, _ = _prepare(tmp_path, folder=False, existing=True)
    before = _digest(out)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(writer, "header_bytes", full)
    with pytest.raises(lw.CheckpointError, match=r"out.safetensors: writing failed \(No space left on device\)"):
        lw.save(NEW, out, overwrite=True)
    assert _digest(out) == before and [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


@pytest.mark.parametrize("folder", [False, True], ids=["file", "folder"])
def test_ctrl_c_removes_temporaries_and_keeps_the_old_output(tmp_path, monkeypatch, folder):
    import layerwise._write as writer

    out, kwargs = _prepare(tmp_path, folder=folder, existing=True)
    before = _digest(out)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(writer, "header_bytes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lw.save(NEW, out, **kwargs)
    assert _digest(out) == before and [p.name for p in tmp_path.iterdir()] == [out.name]


def test_a_file_and_a_folder_replace_each_other_only_with_overwrite(tmp_path):
    folder, file = tmp_path / "m", tmp_path / "f.safetensors"
    lw.save(OLD, folder, max_shard_size=100)
    file.write_bytes(b"not a checkpoint")
    with pytest.raises(lw.OutputExistsError):
        lw.save(NEW, file, max_shard_size=100)
    lw.save(NEW, file, max_shard_size=100, overwrite=True)
    assert file.is_dir() and _same(lw.load(file), NEW)
    odd = tmp_path / "d.safetensors"
    lw.save(OLD, odd, max_shard_size=100)
    before = _digest(odd)
    with pytest.raises(lw.CheckpointError, match="is a folder; the new output is a file"):
        lw.save(NEW, odd, overwrite=True)
    assert _digest(odd) == before and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("old_weights", ["model.safetensors", "pytorch_model.bin"])
def test_new_weights_supersede_the_old_single_file_of_a_model_folder(tmp_path, old_weights):
    out = tmp_path / "model"
    out.mkdir()
    lw.save(OLD, out / old_weights)
    (out / "config.json").write_bytes(FOREIGN["config.json"])
    lw.save(NEW, out, max_shard_size=20, overwrite=True)
    assert not (out / old_weights).exists(), "stale weights would shadow the new index"
    assert (out / "config.json").read_bytes() == FOREIGN["config.json"] and _same(lw.load(out), NEW)


@pytest.mark.parametrize("shard", [None, 4])
def test_an_output_name_at_the_file_system_limit_is_written(tmp_path, shard):
    name = "w" * (255 - len(".safetensors")) + ".safetensors"  # its temporary's name would be longer
    for overwrite in (False, True):
        out = lw.save({"w": torch.ones(2)}, tmp_path / name, max_shard_size=shard, overwrite=overwrite)
        assert lw.load(out)["w"].tolist() == [1.0, 1.0]
    assert os.listdir(tmp_path) == [name]


@pytest.mark.parametrize("name, why", [("w" * 300 + ".safetensors", "File name too long"),
                                       ("nul\0.safetensors", "embedded null byte")])
def test_an_unusable_path_is_named_for_reading_and_writing(tmp_path, name, why):
    with pytest.raises(lw.CheckpointError, match=f"not a path that can be written \\({why}\\)"):
        lw.save({"w": torch.ones(2)}, tmp_path / name)
    with pytest.raises(lw.CheckpointError, match=f"cannot be opened \\({why}\\)"):
        lw.load(tmp_path / name)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(lw.CheckpointError, match="cannot be opened .Too many levels of symbolic links"):
        lw.load(tmp_path / "loop")
    assert os.listdir(tmp_path) == ["loop"]
