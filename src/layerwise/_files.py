"""The checkpoint file formats: reading safetensors, torch and Hugging Face checkpoints, writing atomically.

Streaming works on safetensors headers: every key's shape and dtype is known before any
tensor is read, and each tensor is read with plain file reads into a buffer of its own. (The
``safetensors`` library memory-maps whole files, so every page it touches stays resident;
reading the simple format directly keeps resident memory to the tensors in use.) Output goes
to a temporary name in the destination folder and is renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from ._tensors import aliases_of
from .errors import CheckpointError

PathLike = str | os.PathLike

_CODES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
_DTYPE_CODES = {v: k for k, v in _CODES.items()}
_DTYPE_NAMES = {"fp64": torch.float64, "float64": torch.float64, "fp32": torch.float32, "float32": torch.float32,
                "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
                "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
ALIASES = "layerwise.aliases"  # metadata key: {alias: stored key} for tied tensors
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLES = ("model.safetensors", "pytorch_model.bin")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"``, ``"float16"``, ``torch.float32`` ... to a floating ``torch.dtype``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPE_NAMES[dtype.lower()]
    except KeyError:
        raise CheckpointError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPE_NAMES)}") from None


def parse_size(size: int | str | None) -> int | None:
    """``5_000_000``, ``"500MB"``, ``"2GiB"`` ... to bytes (decimal units as Hugging Face uses)."""
    if size is None or isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])(i?))?b?\s*", size.lower())
    if not m:
        raise CheckpointError(f"bad size {size!r}; write e.g. 500MB, 5GB or 2GiB")
    prefix, binary = m[2], m[3]
    scale = (1024 if binary else 1000) ** ("kmgt".index(prefix) + 1) if prefix else 1
    return int(float(m[1]) * scale)


# --------------------------------------------------------------------------- reading


@dataclass
class _Stored:
    """Where the bytes of one safetensors tensor are."""

    path: Path
    offset: int
    nbytes: int


def _read_header(path: Path) -> tuple[dict[str, Any], dict[str, str], int]:
    """Parse and check a safetensors header: (tensors, metadata, offset of the data)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < 8:
            raise CheckpointError(f"{path}: {size} bytes is too short for a safetensors file")
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated or not a safetensors file (the header claims {n:,} bytes, "
                                  f"the file has {size:,})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data = size - 8 - n
    spans = []
    for key, info in header.items():
        try:
            dtype, shape, (start, end) = _CODES[info["dtype"]], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt entry for tensor {key!r}: {info!r}") from None
        expected = math.prod(shape) * dtype.itemsize
        if end - start != expected or start < 0:
            raise CheckpointError(f"{path}: tensor {key!r} has {end - start} bytes for shape {list(shape)} "
                                  f"of {info['dtype']} ({expected} expected): the file is corrupt")
        if end > data:
            raise CheckpointError(f"{path}: truncated: tensor {key!r} ends at byte {end:,} of the data, "
                                  f"which has only {data:,} bytes")
        spans.append((start, end, key))
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise CheckpointError(f"{path}: corrupt: tensors {a!r} and {b!r} overlap")
    return header, metadata, 8 + n


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
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # the legacy format cannot be mapped
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()
        detail = next((line for line in reason if "GLOBAL" in line or "Unsupported" in line), reason[0] if reason else "")
        raise CheckpointError(
            f"{path}: refused to unpickle: it holds Python objects beyond tensors ({detail.strip()}); layerwise "
            "loads with weights_only=True and never runs code from a checkpoint. If you trust the file, convert "
            f"it once: python -c \"import torch, layerwise as lw; lw.save(torch.load('{path}', weights_only=False)"
            f"['state_dict'], '{path.with_suffix('.safetensors')}')\" (adjust the key)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


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

    def read(self, key: str) -> torch.Tensor:
        """The tensor under ``key``, in a buffer of its own (safetensors) or mapped (``.pt``)."""
        key = self.aliases.get(key, key)
        if key in self._tensors:
            return self._tensors[key]
        shape, dtype = self.specs[key]
        buffer = torch.empty(self.nbytes(key), dtype=torch.uint8)
        self._read_into(key, 0, buffer)
        return buffer.view(dtype).reshape(shape)

    def read_flat(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Elements ``[start, stop)`` of the flattened tensor under ``key``. The result lives in a
        buffer this checkpoint reuses: it is valid until the next ``read_flat`` on it."""
        key = self.aliases.get(key, key)
        if key in self._tensors:
            if self._flat is None or self._flat[0] != key:  # a non-contiguous tensor is copied once, not per slice
                self._flat = (key, self._tensors[key].reshape(-1))
            return self._flat[1][start:stop]
        dtype = self.specs[key][1]
        n = (stop - start) * dtype.itemsize
        if self._scratch is None or self._scratch.numel() < n:
            self._scratch = torch.empty(n, dtype=torch.uint8)
        buffer = self._scratch[:n]
        self._read_into(key, start * dtype.itemsize, buffer)
        return buffer.view(dtype)

    def _read_into(self, key: str, skip: int, buffer: torch.Tensor) -> None:
        where = self._stored[key]
        f = self._files.get(where.path) or self._files.setdefault(where.path, open(where.path, "rb"))
        f.seek(where.offset + skip)
        if buffer.numel() and f.readinto(memoryview(buffer.numpy())) != buffer.numel():
            raise CheckpointError(f"{where.path}: truncated while reading tensor {key!r}")

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _add_safetensors(ckpt: Checkpoint, path: Path, keys: Sequence[str] | None = None) -> dict[str, str]:
    header, metadata, data = _read_header(path)
    for key, info in header.items():
        if keys is not None and key not in keys:
            continue
        shape, dtype = tuple(info["shape"]), _CODES[info["dtype"]]
        start, end = info["data_offsets"]
        ckpt.specs[key] = (shape, dtype)
        ckpt._stored[key] = _Stored(path, data + start, end - start)
    return metadata


def _record_aliases(ckpt: Checkpoint, aliases: Mapping[str, str], where: Path) -> None:
    for alias, stored in aliases.items():
        if stored not in ckpt.specs:
            raise CheckpointError(f"{where}: alias {alias!r} points to {stored!r}, which the checkpoint lacks")
        ckpt.aliases[alias] = stored
        ckpt.specs[alias] = ckpt.specs[stored]


def open_checkpoint(path: PathLike, *, key: str | None = None) -> Checkpoint:
    """Open a checkpoint file or folder and check its header(s); no tensor is read yet."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir() or path.name.endswith(".index.json"):
        folder = path if path.is_dir() else path.parent
        index = path if path.is_file() else next((folder / n for n in _INDEXES if (folder / n).exists()), None)
        if index is None:
            single = next((folder / n for n in _SINGLES if (folder / n).exists()), None)
            if single is None:
                raise CheckpointError(f"{folder}: no {' or '.join(_INDEXES + _SINGLES)} in this folder")
            return open_checkpoint(single, key=key)
        return _open_sharded(index, key)
    if key is not None and path.suffix == ".safetensors":
        raise CheckpointError(f"{path}: key= selects inside a .pt checkpoint; a safetensors file is flat")
    ckpt = Checkpoint(path)
    if path.suffix == ".safetensors":
        metadata = _add_safetensors(ckpt, path)
        _record_aliases(ckpt, json.loads(metadata.get(ALIASES, "{}")), path)
        return ckpt
    if path.suffix not in TORCH_SUFFIXES:
        raise CheckpointError(f"{path}: unknown checkpoint type; use .safetensors, {', '.join(TORCH_SUFFIXES)} or a folder")
    state = _nested(_torch_load(path), key, path)
    ckpt.aliases = aliases_of(state)
    ckpt.specs = {k: (tuple(t.shape), t.dtype) for k, t in state.items()}
    ckpt._tensors = {k: t for k, t in state.items() if k not in ckpt.aliases}
    return ckpt


def _open_sharded(index: Path, key: str | None) -> Checkpoint:
    try:
        spec = json.loads(index.read_text())
        weight_map: dict[str, str] = spec["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: corrupt index file ({e})") from None
    ckpt = Checkpoint(index.parent)
    shards: dict[str, list[str]] = {}
    for k, shard in weight_map.items():
        shards.setdefault(shard, []).append(k)
    for shard, keys in shards.items():
        shard_path = index.parent / shard
        if not shard_path.exists():
            raise CheckpointError(f"{index}: shard {shard} (holding {keys[0]} ...) is missing")
        if shard_path.suffix == ".safetensors":
            _add_safetensors(ckpt, shard_path, keys)
        else:
            part = open_checkpoint(shard_path, key=key)
            for k in keys:
                ckpt.specs[k] = part.specs[k]
            ckpt._tensors = {**ckpt._tensors, **{k: part.read(k) for k in keys}}
        missing = [k for k in keys if k not in ckpt.specs]
        if missing:
            raise CheckpointError(f"{shard_path}: lacks {', '.join(missing[:5])} that {index.name} places there")
    _record_aliases(ckpt, spec.get("metadata", {}).get(ALIASES, {}), index)
    return ckpt


# --------------------------------------------------------------------------- writing


def _bytes_of(t: torch.Tensor) -> Any:
    """A zero-copy buffer of a tensor's bytes (little-endian, as safetensors stores them)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _header_bytes(entries: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, dtype, shape in entries:
        if dtype not in _DTYPE_CODES:
            raise CheckpointError(f"tensor {key!r} has dtype {dtype}, which safetensors cannot store")
        n = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": _DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the safetensors library writes it
    return len(raw).to_bytes(8, "little") + raw


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


@dataclass
class Plan:
    """What will be written: stored tensors in order, the aliases, shards, metadata."""

    entries: list[tuple[str, torch.dtype, tuple[int, ...]]]
    aliases: dict[str, str]
    metadata: dict[str, str]
    max_shard_size: int | None = None

    def shards(self) -> list[list[tuple[str, torch.dtype, tuple[int, ...]]]]:
        if self.max_shard_size is None:
            return [self.entries]
        shards: list[list] = [[]]
        size = 0
        for entry in self.entries:
            n = math.prod(entry[2]) * entry[1].itemsize
            if shards[-1] and size + n > self.max_shard_size:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += n
        return shards

    @property
    def total_bytes(self) -> int:
        return sum(math.prod(s) * d.itemsize for _, d, s in self.entries)


def check_output(output: Path, inputs: Sequence[Path], overwrite: bool) -> None:
    for p in inputs:
        same = output.resolve() == p.resolve() or (output.exists() and p.exists() and os.path.samefile(output, p))
        inside = output.exists() and output.is_dir() and p.resolve().is_relative_to(output.resolve())
        if same or inside:
            raise CheckpointError(f"{output}: the output would overwrite the input {p}; write to another path")
    if output.exists() and not overwrite:
        raise CheckpointError(f"{output}: already exists; pass overwrite=True (--force) to replace it")
    folder = output.parent
    if not folder.is_dir():
        raise CheckpointError(f"{output}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise CheckpointError(f"{output}: the folder {folder} is not writable")


@contextlib.contextmanager
def staged(output: Path, *, folder: bool, overwrite: bool, inputs: Sequence[Path] = ()) -> Iterator[Path]:
    """A temporary file (or folder) beside ``output`` for the block to fill and fsync; renamed to
    ``output`` when the block ends cleanly, removed on any error or interruption. A process
    killed meanwhile leaves only the hidden temporary name, never a partial ``output``."""
    check_output(output, inputs, overwrite)
    try:
        if folder:
            temp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp"))
        else:
            fd, name = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
            os.close(fd)
            temp = Path(name)
    except OSError as e:
        raise CheckpointError(f"{output}: cannot write in {output.parent} ({e.strerror})") from None
    try:
        default_permissions(temp)
        yield temp
        if folder:
            _fsync_dir(temp)
        if output.exists():  # overwrite=True, checked above: swap the old result out, the new one in
            old = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.", suffix=".old"))
            os.replace(output, old / "old")
            os.replace(temp, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temp, output)
        _fsync_dir(output.parent)
    except BaseException:
        if temp.is_dir():
            shutil.rmtree(temp, ignore_errors=True)
        else:
            temp.unlink(missing_ok=True)
        raise


def write(plan: Plan, output: Path, pieces_of: Callable[[str], Iterable[torch.Tensor]], *, overwrite: bool,
          inputs: Sequence[Path] = (), progress: Callable[[int], None] | None = None,
          model_folder: Callable[[Path], None] | None = None) -> Path:
    """Write ``plan`` to ``output`` atomically (see :func:`staged`); ``pieces_of(key)`` gives each
    stored tensor, whole or as consecutive pieces of its flattened elements, in order.

    A single file (``.safetensors``) or, with ``max_shard_size``, a Hugging Face folder of shards
    and an index. With ``model_folder``, ``output`` is a model folder: ``model.safetensors`` (or
    shards and an index above ``max_shard_size``), and ``model_folder(folder)`` adds its other files
    (config, tokenizer, card) before the folder is published, all at once.
    """
    sharded = plan.max_shard_size is not None and (model_folder is None or len(plan.shards()) > 1)
    folder = sharded or model_folder is not None
    if not folder and output.suffix != ".safetensors":
        raise CheckpointError(f"{output}: write a .safetensors file, or a folder with max_shard_size set")
    with staged(output, folder=folder, overwrite=overwrite, inputs=inputs) as temp:
        shards = plan.shards() if sharded else [plan.entries]
        weight_map = {}
        for i, entries in enumerate(shards):
            if sharded:
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                target = temp / name
                weight_map.update({key: name for key, _, _ in entries})
            else:
                target = temp / _SINGLES[0] if folder else temp
            metadata = {"format": "pt", **plan.metadata}
            if plan.aliases and not sharded:
                metadata[ALIASES] = json.dumps(plan.aliases)
            with open(target, "wb") as f:
                f.write(_header_bytes(entries, metadata))
                for key, dtype, shape in entries:
                    written = 0
                    for piece in pieces_of(key):
                        if piece.dtype != dtype:
                            raise CheckpointError(f"{output}: tensor {key!r} came out as {piece.dtype}, planned {dtype}")
                        f.write(_bytes_of(piece))
                        written += piece.numel()
                        if progress is not None:
                            progress(piece.numel() * dtype.itemsize)
                        del piece
                    if written != math.prod(shape):
                        raise CheckpointError(f"{output}: tensor {key!r} came out with {written} elements, "
                                              f"planned {math.prod(shape)} {shape}")
                f.flush()
                os.fsync(f.fileno())
        if sharded:
            index = {"metadata": {"total_size": plan.total_bytes, **({ALIASES: plan.aliases} if plan.aliases else {})},
                     "weight_map": weight_map}
            (temp / _INDEXES[0]).write_text(json.dumps(index, indent=2))
        if model_folder is not None:
            model_folder(temp)
    return output
