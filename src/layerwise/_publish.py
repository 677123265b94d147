"""Publishing an output atomically: it appears complete at its path, or not at all.

The writer fills a hidden temporary file or folder beside the output (``.NAME.*.tmp``), then
publishes it with one rename:

- a new output: a rename that refuses to replace (``renameat2(RENAME_NOREPLACE)``; ``link`` for
  a file and a plain directory rename elsewhere), so of two concurrent writers exactly one wins
  and the other gets :class:`OutputExistsError`, with no check-then-rename window;
- a file over an old one: ``os.replace``, so the path always holds the old or the new file;
- a folder over an old one: the files of the old folder that the writer did not produce
  (``config.json``, a tokenizer, a README...) are linked into the new folder, which is then
  swapped in by one ``renameat2(RENAME_EXCHANGE)`` (two renames where the kernel lacks it; the
  old folder is renamed back if the second fails).

An error or Ctrl-C inside the block removes the temporary; a process killed meanwhile leaves only
the hidden temporary name, never a partial output. Disk full and I/O errors become a
:class:`CheckpointError` naming the output.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import CheckpointError, LayerwiseError, OptionError, OptionTypeError, OutputExistsError

INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")  # what a shard of an index can be
_NOREPLACE, _EXCHANGE = 1, 2  # linux/fs.h
_AT_FDCWD = -100


@functools.cache
def _renameat2():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):  # not glibc >= 2.28, not Linux
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def _rename2(src: Path, dst: Path, flag: int) -> bool:
    """``renameat2`` with ``flag``; False where the kernel or file system does not offer it."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flag) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _hidden(output: Path) -> str:
    """The prefix of a temporary beside ``output``: ``.NAME.``, the name cut so that the temporary's own name
    stays within the 255 bytes file systems allow whenever ``output``'s does."""
    return f".{os.fsencode(output.name)[:200].decode(errors='ignore')}."


def _exists_error(output: Path) -> OutputExistsError:
    return OutputExistsError(f"{output}: already exists; pass overwrite=True (--force) to replace it")


def publish_new(temp: Path, output: Path) -> None:
    """Rename ``temp`` to ``output`` unless something is there; then :class:`OutputExistsError`."""
    try:
        if _rename2(temp, output, _NOREPLACE):
            return
        if temp.is_dir():
            if output.exists() or output.is_symlink():
                raise _exists_error(output)
            os.rename(temp, output)  # onto a directory made meanwhile: ENOTEMPTY, unless it is empty
        else:
            try:
                os.link(temp, output)  # fails if output exists, atomically
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                    raise
                # a file system without hard links: claim the name atomically, then fill it
                os.close(os.open(output, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                os.replace(temp, output)
                return
            os.unlink(temp)
    except (FileExistsError, IsADirectoryError) as e:
        raise _exists_error(output) from e
    except OSError as e:
        if e.errno == errno.ENOTEMPTY:
            raise _exists_error(output) from e
        raise


def _products(folder: Path) -> set[str]:
    """The entries of an old output folder a writer produced: its weights, index files and the shards they
    list (stale weights beside new ones would contradict them)."""
    names = {"model.safetensors", "pytorch_model.bin"}
    for index in INDEXES:
        with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
            weight_map = json.loads((folder / index).read_text())["weight_map"]
            names.add(index)
            # only weight files: an index is data, and one naming notes.txt must not get it deleted
            names.update(s for s in weight_map.values()
                         if isinstance(s, str) and "/" not in s and s.endswith(_WEIGHT_SUFFIXES))
    return names


def _carry_over(old: Path, new: Path) -> None:
    """Link (else copy) into ``new`` every entry of ``old`` that the writer neither produced nor rewrote."""
    keep = set(os.listdir(new)) | _products(old)
    for name in os.listdir(old):
        if name in keep:
            continue
        src, dst = old / name, new / name
        if src.is_dir() and not src.is_symlink():
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def publish_over(temp: Path, output: Path) -> None:
    """Replace ``output`` by ``temp`` (overwrite=True); a folder keeps the files the writer did not produce."""
    if not (output.is_dir() and not output.is_symlink()):
        if temp.is_dir() and (output.exists() or output.is_symlink()):
            # a file (or link) replaced by a folder: exchange them, then drop the file
            if not _rename2(temp, output, _EXCHANGE):
                os.unlink(output)
                os.rename(temp, output)
                return
            _remove(temp)
            return
        os.replace(temp, output)  # one atomic rename: the path never lacks an output
        return
    if not temp.is_dir():
        raise CheckpointError(f"{output}: is a folder; the new output is a file. Remove the folder or choose "
                              "another path")
    _carry_over(output, temp)
    _fsync_dir(temp)
    if _rename2(temp, output, _EXCHANGE):
        _remove(temp)  # now the old folder
        return
    aside = Path(tempfile.mkdtemp(dir=output.parent, prefix=_hidden(output), suffix=".old"))
    try:
        os.rename(output, aside / "old")
        try:
            os.rename(temp, output)
        except BaseException:
            os.rename(aside / "old", output)  # the old folder back
            raise
    except BaseException:
        with contextlib.suppress(OSError):
            os.rmdir(aside)  # empty once the old folder is back; kept (with it) if that failed
        raise
    _remove(aside)


def as_path(value: object, what: str) -> Path:
    """``value`` as a Path, or an error naming ``what``: ``Path("")`` would be the current folder,
    and a number or None would fail inside pathlib with a TypeError that names nothing."""
    if isinstance(value, bytes) or not isinstance(value, (str, os.PathLike)):
        raise OptionTypeError(f"{what} must be a path (a str or os.PathLike), not {type(value).__name__} {value!r:.80}")
    if os.fspath(value) == "":
        raise OptionError(f"{what} is an empty path; give a file or folder name ('.' for the current folder)")
    return Path(value)


def input_paths(inputs: object, what: str = "inputs") -> list[Path]:
    """A list of input paths; one path given alone (a string is a sequence of letters) is refused by name."""
    if isinstance(inputs, (str, os.PathLike)):
        raise OptionTypeError(f"{what} must be a list of paths, not the one path {os.fspath(inputs)!r}: put it in a list")
    if isinstance(inputs, bytes) or not isinstance(inputs, Sequence):
        raise OptionTypeError(f"{what} must be a list of paths, not {type(inputs).__name__} {inputs!r:.80}")
    return [as_path(p, f"{what}[{i}]") for i, p in enumerate(inputs)]


def output_path(output: object, *, file_ok: bool) -> Path:
    """Where a merge writes: a ``.safetensors`` file (where ``file_ok``) or a model folder, never a
    folder named like a weight file (``merged.pt``), which torch.load and safe_open cannot open."""
    path = as_path(output, "output")
    if path.suffix in _WEIGHT_SUFFIXES and not (file_ok and path.suffix == ".safetensors"):
        writes = "one .safetensors file or a model folder" if file_ok else "a model folder"
        instead = f"{path.with_suffix('.safetensors')} or " if file_ok else ""
        raise OptionError(f"output {path}: this merge writes {writes}, and {path.name!r} would be a folder named like "
                          f"a {path.suffix} file; write {instead}a folder name such as {path.with_suffix('')}")
    return path


def check_output(output: Path, inputs: Sequence[Path], overwrite: bool) -> None:
    """Refuse an output that is an input (or holds one), exists without ``overwrite``, or cannot be written."""
    if not isinstance(overwrite, bool):  # overwrite="no" would be truthy
        raise OptionTypeError(f"overwrite={overwrite!r}: pass True or False")
    try:
        os.lstat(output)
    except (FileNotFoundError, NotADirectoryError):
        pass
    except (OSError, ValueError) as e:  # a name over the file system's limit, a NUL byte, a loop of links
        raise CheckpointError(f"{str(output)!r}: not a path that can be written ({getattr(e, 'strerror', None) or e})") from None
    for p in inputs:
        same = output.resolve() == p.resolve() or (output.exists() and p.exists() and os.path.samefile(output, p))
        inside = output.exists() and output.is_dir() and p.resolve().is_relative_to(output.resolve())
        if same or inside:
            raise CheckpointError(f"{output}: the output would overwrite the input {p}; write to another path")
    if (output.exists() or output.is_symlink()) and not overwrite:
        raise _exists_error(output)
    folder = output.parent
    if not folder.is_dir():
        raise CheckpointError(f"{output}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise CheckpointError(f"{output}: the folder {folder} is not writable")


def default_permissions(path: Path) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; results get what open() would give them."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def staged(output: Path, *, folder: bool, overwrite: bool, inputs: Sequence[Path] = ()) -> Iterator[Path]:
    """A temporary file (or folder) beside ``output`` for the block to fill and fsync, published
    to ``output`` when the block ends cleanly (see the module's docstring), removed on any error."""
    output = Path(output)
    check_output(output, inputs, overwrite)
    try:
        if folder:
            temp = Path(tempfile.mkdtemp(dir=output.parent, prefix=_hidden(output), suffix=".tmp"))
        else:
            fd, name = tempfile.mkstemp(dir=output.parent, prefix=_hidden(output), suffix=".tmp")
            os.close(fd)
            temp = Path(name)
    except OSError as e:
        raise CheckpointError(f"{output}: cannot write in {output.parent} ({e.strerror})") from None
    try:
        default_permissions(temp)
        yield temp
        if folder:
            _fsync_dir(temp)
        (publish_over if overwrite else publish_new)(temp, output)
        _fsync_dir(output.parent)
    except BaseException as e:
        _remove(temp)
        if isinstance(e, OSError) and not isinstance(e, LayerwiseError):
            # disk full, I/O error, permissions: name the output; the temporary is gone
            raise CheckpointError(f"{output}: writing failed ({e.strerror or e}); nothing was published "
                                  "and the temporary files are removed") from e
        raise
