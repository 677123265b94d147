"""The checkpoint file formats: reading safetensors, torch and Hugging Face checkpoints, writing atomically.

Streaming works on safetensors headers: every key's shape and dtype is known before any
tensor is read, and each tensor is read with plain file reads into a buffer of its own. (The
``safetensors`` library memory-maps whole files, so every page it touches stays resident;
reading the simple format directly keeps resident memory to the tensors in use. Streamed slices
are mapped, but released as they are consumed: see ``_reader.py``.) Headers are
checked in ``_safetensors.py``; outputs are published atomically by ``_publish.py``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from ._publish import INDEXES, as_path
from ._publish import check_output as check_output  # re-exported: the writers' entry points
from ._publish import staged as staged
from ._safetensors import ALIASES, METADATA, parse_json, read_header
from ._tensors import aliases_of
from ._write import Fill as Fill
from ._write import Plan as Plan
from ._write import write as write
from .errors import CheckpointError, CheckpointNotFoundError, OptionError, OptionTypeError

PathLike = str | os.PathLike

_DTYPE_NAMES = {"fp64": torch.float64, "float64": torch.float64, "fp32": torch.float32, "float32": torch.float32,
                "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
                "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
_SINGLES = ("model.safetensors", "pytorch_model.bin")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def parse_dtype(dtype: str | torch.dtype | None, option: str = "dtype") -> torch.dtype | None:
    """``"bf16"``, ``"float16"``, ``torch.float32`` ... to a floating ``torch.dtype``; errors name ``option``."""
    if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:  # merged floats would be truncated
        raise OptionError(f"{option}={dtype} is not a floating dtype; use one of {', '.join(_DTYPE_NAMES)}")
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if not isinstance(dtype, str):
        raise OptionTypeError(f"{option} must be a string such as 'bf16' or a torch.dtype, not {type(dtype).__name__}")
    try:
        return _DTYPE_NAMES[dtype.lower()]
    except KeyError:
        raise OptionError(f"{option}={dtype!r} is not a dtype layerwise writes; use one of {', '.join(_DTYPE_NAMES)}") from None


def parse_size(size: int | str | None, option: str = "max_shard_size") -> int | None:
    """``5_000_000``, ``"500MB"``, ``"2GiB"`` ... to a positive number of bytes (decimal units as
    Hugging Face uses them; ``KiB``/``MiB``/``GiB`` binary)."""
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise OptionTypeError(f"{option}={size!r}: give whole bytes (an int) or a string such as '5GB'")
    if isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])(i?))?b?\s*", size.lower())
        if not m:
            raise OptionError(f"{option}={size!r}: write e.g. 500MB, 5GB or 2GiB")
        prefix, binary = m[2], m[3]
        scale = (1024 if binary else 1000) ** ("kmgt".index(prefix) + 1) if prefix else 1
        value = float(m[1]) * scale
        if value != int(value):
            raise OptionError(f"{option}={size!r} is not a whole number of bytes")
        size = int(value)
    if size < 1:
        raise OptionError(f"{option}={size!r}: a shard holds at least one byte")
    return size


# --------------------------------------------------------------------------- reading


@dataclass
class _Stored:
    """Where the bytes of one safetensors tensor are."""

    path: Path
    offset: int
    nbytes: int


def _nested(obj: Any, key: str | None, path: Path) -> Mapping[str, torch.Tensor]:
    """The state dict inside a loaded ``.pt`` object: itself, ``obj[key]``, or the one nested dict of tensors."""
    def is_state_dict(x: Any) -> bool:
        return isinstance(x, Mapping) and len(x) > 0 and all(isinstance(v, torch.Tensor) for v in x.values())

    def describe(v: Any) -> str:
        if is_state_dict(v):
            return f"dict of {len(v)} tensors"
        return type(v).__name__

    if key is not None:
        for part in key.split("/"):
            if not isinstance(obj, Mapping) or part not in obj:
                top = ", ".join(f"{k} ({describe(v)})" for k, v in obj.items()) if isinstance(obj, Mapping) else type(obj).__name__
                raise CheckpointError(f"{path}: no key {key!r}; top-level keys: {top}")
            obj = obj[part]
        if not is_state_dict(obj):
            bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)] if isinstance(obj, Mapping) else []
            raise CheckpointError(f"{path}: {key!r} is not a dict of tensors" + (f" (non-tensors: {', '.join(bad[:5])})" if bad else ""))
        return obj
    if is_state_dict(obj):
        return obj
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    candidates = [k for k, v in obj.items() if is_state_dict(v)]
    if len(candidates) == 1:
        return obj[candidates[0]]
    top = ", ".join(f"{k} ({describe(v)})" for k, v in obj.items())
    what = "several state dicts" if candidates else "no flat state dict"
    return_hint = f"pass key={candidates[0]!r}" if candidates else "pass key='a/b' for a deeper one"
    raise CheckpointError(f"{path}: holds {what}; top-level keys: {top}; {return_hint}")


def _torch_load(path: Path) -> Any:
    with warnings.catch_warnings():  # torch warns about the protocol of any non-torch pickle it is given
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return _torch_load_checked(path)


def _torch_load_checked(path: Path) -> Any:
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # the legacy format cannot be mapped
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines()]
        detail = next((line for line in lines if "GLOBAL" in line), None)
        if detail is None:  # torch reports any broken pickle stream this way too
            raise CheckpointError(f"{path}: not a PyTorch checkpoint (the file is corrupt, truncated or of another "
                                  f"kind: {next((x for x in lines if 'Unsupported' in x), 'unreadable pickle')})") from None
        raise CheckpointError(
            f"{path}: refused to unpickle: it holds Python objects beyond tensors ({detail}); layerwise "
            "loads with weights_only=True and never runs code from a checkpoint. If you trust the file, convert "
            f"it once: python -c \"import torch, layerwise as lw; lw.save(torch.load('{path}', weights_only=False)"
            f"['state_dict'], '{path.with_suffix('.safetensors')}')\" (adjust the key)") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    except Exception as e:  # torch's unpickler fails on random bytes with IndexError, KeyError, EOFError...
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (the file is corrupt, truncated or of another "
                              f"kind: {why[:200]})") from None


def _plain_tensors(state: Mapping[str, torch.Tensor], path: Path) -> None:
    for k, t in state.items():
        if not isinstance(k, str):  # every reader and writer of checkpoints names tensors by strings
            raise CheckpointError(f"{path}: tensor names are strings, not {k!r:.100} ({type(k).__name__}); "
                                  "save the state dict again with string keys")
        if t.layout != torch.strided or t.is_quantized:
            raise CheckpointError(f"{path}: tensor {k!r} is {str(t.layout).removeprefix('torch.')}"
                                  f"{' quantized' if t.is_quantized else ''}; layerwise reads dense tensors: "
                                  "convert it (t.to_dense()) and save again")
        if t.is_meta:
            raise CheckpointError(f"{path}: tensor {k!r} is on the meta device: it has a shape but no values "
                                  "(saved from a model that was never materialized)")


@dataclass
class Checkpoint:
    """An opened checkpoint: every key's shape and dtype known up front, tensors read one at a time."""

    path: Path
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # alias -> the key it is stored under
    _stored: dict[str, _Stored] = field(default_factory=dict)
    _tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)
    _files: dict[Path, IO[bytes]] = field(default_factory=dict)
    _scratch: torch.Tensor | None = None
    _flat: tuple[str, torch.Tensor] | None = None

    @property
    def label(self) -> str:
        return str(self.path)

    def nbytes(self, key: str) -> int:
        shape, dtype = self.specs[key]
        return math.prod(shape) * dtype.itemsize

    def stored_at(self, key: str) -> tuple[Path, int] | None:
        """The safetensors file holding ``key`` and the byte offset of its data; None for a ``.pt`` input."""
        where = self._stored.get(self.aliases.get(key, key))
        return (where.path, where.offset) if where is not None else None

    def read(self, key: str) -> torch.Tensor:
        """The tensor under ``key``, in a buffer of its own (safetensors) or mapped (``.pt``)."""
        key = self.aliases.get(key, key)
        if key in self._tensors:
            return self._tensors[key]
        shape, dtype = self.specs[key]
        buffer = torch.empty(self.nbytes(key), dtype=torch.uint8)
        self._read_into(key, 0, buffer)
        return buffer.view(dtype).reshape(shape)

    def read_flat(self, key: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements ``[start, stop)`` of the flattened tensor under ``key``, read into ``out`` (a uint8
        buffer of their size) or else into a buffer this checkpoint reuses: valid until the next
        ``read_flat`` on it. Reads are positional, so threads may read one checkpoint at once."""
        key = self.aliases.get(key, key)
        if key in self._tensors:
            if self._flat is None or self._flat[0] != key:  # a non-contiguous tensor is copied once, not per slice
                self._flat = (key, self._tensors[key].reshape(-1))
            return self._flat[1][start:stop]
        dtype = self.specs[key][1]
        n = (stop - start) * dtype.itemsize
        if out is None:
            if self._scratch is None or self._scratch.numel() < n:
                self._scratch = torch.empty(n, dtype=torch.uint8)
            out = self._scratch[:n]
        self._read_into(key, start * dtype.itemsize, out)
        return out.view(dtype)

    def _read_into(self, key: str, skip: int, buffer: torch.Tensor) -> None:
        where = self._stored[key]
        f = self._files.get(where.path) or self._files.setdefault(where.path, open(where.path, "rb"))
        view, done = memoryview(buffer.numpy()), 0
        while done < len(view):  # pread: no shared file position, so concurrent reads cannot interleave
            n = os.preadv(f.fileno(), [view[done:]], where.offset + skip + done)
            if n == 0:
                raise CheckpointError(f"{where.path}: truncated while reading tensor {key!r}")
            done += n

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _add_safetensors(ckpt: Checkpoint, path: Path, keys: Sequence[str] | None = None) -> dict[str, str]:
    header = read_header(path)
    for key, e in header.tensors.items():
        if keys is not None and key not in keys:
            continue
        ckpt.specs[key] = (e.shape, e.dtype)
        ckpt._stored[key] = _Stored(path, header.data_start + e.start, e.end - e.start)
    return header.metadata


def _record_aliases(ckpt: Checkpoint, aliases: Any, where: Path) -> None:
    """Tied tensors from metadata, which is data: each alias is checked, a bad one ignored with a warning."""
    if isinstance(aliases, str):
        try:
            aliases = json.loads(aliases)
        except (ValueError, RecursionError):  # RecursionError: brackets nested deeper than the parser goes
            aliases = None
    if not isinstance(aliases, dict):
        warnings.warn(f"{where}: ignored the tied-tensor map {ALIASES!r}: it is not a JSON object of names",
                      stacklevel=3)
        return
    stored = dict(ckpt.specs)
    for alias, target in aliases.items():
        if not isinstance(target, str) or target not in stored or target in aliases:
            why = f"points to {target!r:.100}, which the checkpoint does not store"
        elif alias in stored:
            why = f"would hide the stored tensor {alias!r}"
        elif alias == METADATA or alias.encode("utf-8", "surrogatepass").decode("utf-8", "ignore") != alias:
            why = "is not a name a tensor can have"
        else:
            ckpt.aliases[alias] = target
            ckpt.specs[alias] = stored[target]
            continue
        warnings.warn(f"{where}: ignored the tied-tensor alias {alias!r:.100}: it {why}", stacklevel=3)


def open_checkpoint(path: PathLike, *, key: str | None = None) -> Checkpoint:
    """Open a checkpoint file or folder and check its header(s); no tensor is read yet."""
    if key is not None and not isinstance(key, str):
        raise OptionTypeError(f"key={key!r}: a string such as 'state_dict' or 'model/ema'")
    path = as_path(path, "the checkpoint")
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointNotFoundError(f"{path}: no such file or folder") from None
    except (OSError, ValueError) as e:  # a name over the file system's limit, a NUL byte, a loop of links
        raise CheckpointError(f"{str(path)!r}: cannot be opened ({getattr(e, 'strerror', None) or e})") from None
    if not (path.is_file() or path.is_dir()):  # a FIFO or a device would block or never end
        raise CheckpointError(f"{path}: not a regular file or a folder")
    if path.is_dir() or path.name.endswith(".index.json"):
        folder = path if path.is_dir() else path.parent
        index = path if path.is_file() else next((folder / n for n in INDEXES if (folder / n).is_file()), None)
        if index is None:
            single = next((folder / n for n in _SINGLES if (folder / n).is_file()), None)
            if single is None:
                raise CheckpointError(f"{folder}: no {' or '.join(INDEXES + _SINGLES)} in this folder" + (
                    ": it is a torch.distributed.checkpoint folder (.metadata): convert it with torch.distributed."
                    "checkpoint.format_utils.dcp_to_torch_save(folder, 'model.pt') first" if (folder / ".metadata").is_file() else ""))
            return open_checkpoint(single, key=key)
        return _open_sharded(index, key)
    if key is not None and path.suffix == ".safetensors":
        raise CheckpointError(f"{path}: key= selects inside a .pt checkpoint; a safetensors file is flat")
    ckpt = Checkpoint(path)
    if path.suffix == ".safetensors":
        metadata = _add_safetensors(ckpt, path)
        if ALIASES in metadata:
            _record_aliases(ckpt, metadata[ALIASES], path)
        return ckpt
    if path.suffix not in TORCH_SUFFIXES:
        raise CheckpointError(f"{path}: unknown checkpoint type; use .safetensors, {', '.join(TORCH_SUFFIXES)} or a folder")
    state = _nested(_torch_load(path), key, path)
    _plain_tensors(state, path)
    ckpt.aliases = aliases_of(state)
    ckpt.specs = {k: (tuple(t.shape), t.dtype) for k, t in state.items()}
    ckpt._tensors = {k: t for k, t in state.items() if k not in ckpt.aliases}
    return ckpt


@contextlib.contextmanager
def open_checkpoints(paths: Sequence[PathLike], *, key: str | None = None) -> Iterator[list[Checkpoint]]:
    """Every checkpoint of ``paths`` opened (headers only), all closed on exit, also when one fails to open."""
    opened: list[Checkpoint] = []
    try:
        for p in paths:
            opened.append(open_checkpoint(p, key=key))
        yield opened
    finally:
        for c in opened:
            c.close()


def _shard_path(index: Path, shard: Any, key: str) -> Path:
    """The shard a weight map names, which must be a file inside the index's folder."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{index}: corrupt index: tensor {key!r} is placed in {shard!r:.200}, {why}")

    if not isinstance(shard, str):
        raise bad("not a file name")
    try:
        shard.encode("utf-8")
    except UnicodeEncodeError:
        raise bad("which is not valid Unicode") from None
    parts = Path(shard).parts
    # lexical, not resolve(): a Hugging Face cache links shards to blobs elsewhere, legitimately
    if not shard or "\0" in shard or Path(shard).is_absolute() or ".." in parts or shard.strip("/. ") == "":
        raise bad("a path outside the folder; shards are files inside it")
    target = index.parent / shard
    if target.name.endswith(".index.json") or target.suffix not in (".safetensors", *TORCH_SUFFIXES):
        raise bad("which is not a .safetensors or .bin shard")
    if not target.is_file():
        raise bad("which is missing" if not target.exists() else "which is not a file")
    return target


def _open_sharded(index: Path, key: str | None) -> Checkpoint:
    try:
        raw = index.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{index}: cannot read ({e.strerror})") from None
    spec = parse_json(raw, index, "index file")
    weight_map = spec.get("weight_map") if isinstance(spec, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: corrupt index file: it needs a \"weight_map\" object of tensor → shard")
    metadata = spec.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{index}: corrupt index file: \"metadata\" is not an object")
    ckpt = Checkpoint(index.parent)
    shards: dict[Path, list[str]] = {}
    for k, shard in weight_map.items():
        try:
            k.encode("utf-8")
        except UnicodeEncodeError:
            raise CheckpointError(f"{index}: corrupt index: the tensor name {k!r} is not valid Unicode") from None
        shards.setdefault(_shard_path(index, shard, k), []).append(k)
    for shard_path, keys in shards.items():
        if shard_path.suffix == ".safetensors":
            _add_safetensors(ckpt, shard_path, set(keys))
        else:
            part = open_checkpoint(shard_path, key=key)
            for k in keys:
                if k in part.specs:
                    ckpt.specs[k] = part.specs[k]
            ckpt._tensors = {**ckpt._tensors, **{k: part.read(k) for k in keys if k in part.specs}}
        missing = [k for k in keys if k not in ckpt.specs]
        if missing:
            raise CheckpointError(f"{shard_path}: lacks {', '.join(map(repr, missing[:5]))} that {index.name} "
                                  "places there")
    if ALIASES in metadata:
        _record_aliases(ckpt, metadata[ALIASES], index)
    return ckpt
