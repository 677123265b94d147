"""The safetensors format: its dtype table and headers, parsed and checked as the format defines them.

A file is an 8-byte little-endian header size N, N bytes of a UTF-8 JSON object, then the data.
The object maps tensor names to ``{"dtype", "shape", "data_offsets"}`` and may hold a
``"__metadata__"`` object of strings. The checks are the reference library's (``safetensors``'
Rust ``Metadata::validate``): known dtype, shape of non-negative ints, offsets that tile the
data exactly (contiguous, in order of offset, no gap, no overlap, nothing past the end), a
header under 100 MB; duplicate names are caught while parsing, before a dict could drop one.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

MAX_HEADER = 100_000_000  # the safetensors library refuses larger headers
METADATA = "__metadata__"
ALIASES = "layerwise.aliases"  # layerwise's metadata key: {alias: stored key} for tied tensors
_DIM_LIMIT = 2**63  # torch sizes are int64: beside a 0 dimension a larger one passes the byte count
_PACKED = {"F4": 2}  # format elements per torch element: float4_e2m1fn_x2 packs two F4 values in a byte


@functools.cache
def codes() -> dict[str, torch.dtype]:
    """The format's dtype code of every torch dtype the ``safetensors`` package stores.

    Asked of the package itself (its Rust writer names each dtype), so a dtype it learns in a
    new release is known here without a second table to update.
    """
    import safetensors.torch as st

    table = {}
    for dtype in st._SIZE:
        if dtype is None:  # a dtype this torch lacks
            continue
        raw = st.save({"x": torch.empty(0, dtype=dtype)})
        n = int.from_bytes(raw[:8], "little")
        table[json.loads(raw[8:8 + n])["x"]["dtype"]] = dtype
    return table


@functools.cache
def _code_of() -> dict[torch.dtype, str]:
    return {dtype: code for code, dtype in codes().items()}


def code_of(dtype: torch.dtype, key: str) -> str:
    """The format's name of ``dtype``, or a :class:`CheckpointError` naming the tensor."""
    try:
        return _code_of()[dtype]
    except KeyError:
        raise CheckpointError(f"tensor {key!r} has dtype {dtype}, which safetensors cannot store; "
                              f"cast it to one of {', '.join(str(d) for d in _code_of())}") from None


def format_shape(dtype: torch.dtype, shape: Sequence[int]) -> list[int]:
    """The shape the header records: packed dtypes count format elements in the last dimension."""
    per = _PACKED.get(_code_of().get(dtype, ""), 1)
    return [*shape[:-1], shape[-1] * per] if shape and per > 1 else list(shape)


@dataclass(frozen=True)
class Entry:
    """One tensor of a header: torch dtype and shape, byte span ``[start, end)`` of the data."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class Header:
    tensors: dict[str, Entry]
    metadata: dict[str, str]
    data_start: int  # file offset of the data: 8 + N


def _no_duplicates(path: Path):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise CheckpointError(f"{path}: corrupt header: the name {k!r} appears twice")
            out[k] = v
        return out
    return hook


def _utf8(name: str, path: Path, what: str) -> str:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate written as a \\ud800 escape
        raise CheckpointError(f"{path}: corrupt {what}: the name {name!r} is not valid Unicode") from None
    return name


def parse_json(raw: bytes, path: Path, what: str) -> Any:
    """Strict UTF-8 JSON with duplicate names refused: a dict would silently keep the last one."""
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates(path))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: corrupt {what}: not UTF-8 (byte {e.start})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, or an integer of over 4300 digits
        raise CheckpointError(f"{path}: corrupt {what}: not JSON ({e})") from None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry(key: str, info: Any, path: Path) -> Entry:
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: corrupt header: tensor {key!r} {why}")

    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise bad(f"needs dtype, shape and data_offsets, not {info!r:.200}")
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(code, str) or code not in codes():
        raise bad(f"has dtype {code!r:.50}; known: {', '.join(codes())}")
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < _DIM_LIMIT for d in shape):
        raise bad(f"has shape {shape!r:.200}; a shape is a list of non-negative integers below 2**63")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise bad(f"has data_offsets {offsets!r:.200}; they are two integers, begin <= end")
    per = _PACKED.get(code, 1)
    if per > 1 and (not shape or shape[-1] % per):
        raise bad(f"has shape {shape} of {code}: its last dimension must be a multiple of {per}")
    dtype = codes()[code]
    torch_shape = tuple(shape[:-1]) + (shape[-1] // per,) if per > 1 else tuple(shape)
    expected = math.prod(torch_shape) * dtype.itemsize
    if offsets[1] - offsets[0] != expected:
        raise bad(f"has {offsets[1] - offsets[0]:,} bytes for shape {shape} of {code} ({expected:,} expected)")
    return Entry(dtype, torch_shape, offsets[0], offsets[1])


def read_header(path: Path) -> Header:
    """Parse and check the header of the safetensors file at ``path``; no tensor data is read."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            if size < 8:
                raise CheckpointError(f"{path}: {size} bytes is too short for a safetensors file")
            n = int.from_bytes(f.read(8), "little")
            if n > MAX_HEADER:
                raise CheckpointError(f"{path}: not a safetensors file (its header would be {n:,} bytes; "
                                      f"the format allows {MAX_HEADER:,})")
            if n > size - 8:
                raise CheckpointError(f"{path}: truncated or not a safetensors file (the header claims {n:,} "
                                      f"bytes, the file has {size:,})")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    header = parse_json(raw, path, "safetensors header")
    if not isinstance(header, dict) or not raw.startswith(b"{"):  # the format: the header starts with '{'
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop(METADATA, None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt header: {METADATA} must map strings to strings, "
                              f"not {metadata!r:.200}")
    for k in metadata:
        _utf8(k, path, "metadata")
    tensors = {_utf8(k, path, "header"): _entry(k, info, path) for k, info in header.items()}
    data = size - 8 - n
    offset, previous = 0, None
    for key, e in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if e.start != offset:
            what = "overlaps" if e.start < offset else "leaves a gap after"
            before = repr(previous) if previous is not None else "the start of the data"
            raise CheckpointError(f"{path}: corrupt header: tensor {key!r} {what} {before}")
        offset, previous = e.end, key
    if offset > data:
        raise CheckpointError(f"{path}: truncated: tensor {previous!r} ends at byte {offset:,} of the data, "
                              f"which has only {data:,} bytes")
    if offset < data:
        raise CheckpointError(f"{path}: corrupt: {data - offset:,} bytes follow the last tensor"
                              f"{f' {previous!r}' if previous is not None else ''} that no tensor claims")
    return Header(tensors, metadata, 8 + n)


def header_bytes(entries: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str]) -> bytes:
    """The size prefix and JSON header for tensors stored back to back in ``entries`` order."""
    header: dict[str, Any] = {METADATA: dict(metadata)} if metadata else {}
    offset = 0
    for key, dtype, shape in entries:
        if key == METADATA:
            raise CheckpointError(f"a tensor cannot be named {METADATA!r}: the format reserves it; rename it")
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            raise CheckpointError(f"the tensor name {key!r} is not valid Unicode (a lone surrogate); "
                                  "rename it") from None
        n = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": code_of(dtype, key), "shape": format_shape(dtype, shape),
                       "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the safetensors library writes it
    return len(raw).to_bytes(8, "little") + raw
