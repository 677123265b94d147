"""Writing checkpoints: a plan of tensors streamed into safetensors files, published atomically.

Tensors are written one piece at a time (``pieces_of`` yields each tensor whole or as consecutive
slices of its flattened elements), so a streaming merge never holds a model in memory; the bytes go
to disk through ``_stream.DiskStream``, written in the background while the next pieces are made.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ._publish import INDEXES, staged
from ._safetensors import ALIASES, header_bytes
from ._stream import DiskStream
from .errors import CheckpointError


@dataclass
class Fill:
    """A piece of ``numel`` elements that ``fill(room)`` computes into ``room``, the output's own buffer
    (of the planned dtype; None where it has none), so that writing it copies nothing; it returns the
    piece, ``room`` or another tensor."""

    numel: int
    fill: Callable[[torch.Tensor | None], torch.Tensor]


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


def write(plan: Plan, output: Path, pieces_of: Callable[[str], Iterable[torch.Tensor | Fill]], *, overwrite: bool,
          inputs: Sequence[Path] = (), progress: Callable[[int], None] | None = None,
          model_folder: Callable[[Path], None] | None = None) -> Path:
    """Write ``plan`` to ``output`` atomically (see :func:`staged`); ``pieces_of(key)`` gives each
    stored tensor, whole or as consecutive pieces of its flattened elements (tensors or
    :class:`Fill`), in order.

    A single file (``.safetensors``) or, with ``max_shard_size``, a Hugging Face folder of shards
    and an index. With ``model_folder``, ``output`` is a model folder: ``model.safetensors`` (shards
    and an index only above ``max_shard_size``), and ``model_folder(folder)`` adds the other files
    (config, tokenizer, card) before the folder is published with them, in one step.
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
                target = temp / "model.safetensors" if folder else temp
            metadata = {"format": "pt", **plan.metadata}
            if plan.aliases and not sharded:
                metadata[ALIASES] = json.dumps(plan.aliases)
            with DiskStream(target) as f:
                f.write(torch.frombuffer(bytearray(header_bytes(entries, metadata)), dtype=torch.uint8))
                for key, dtype, shape in entries:
                    written = 0
                    for piece in pieces_of(key):
                        if isinstance(piece, Fill):
                            piece = piece.fill(f.room(piece.numel, dtype))
                        if piece.dtype != dtype:
                            raise CheckpointError(f"{output}: tensor {key!r} came out as {piece.dtype}, planned {dtype}")
                        f.write(piece)
                        written += piece.numel()
                        if progress is not None:
                            progress(piece.numel() * dtype.itemsize)
                        del piece
                    if written != math.prod(shape):
                        raise CheckpointError(f"{output}: tensor {key!r} came out with {written} elements, "
                                              f"planned {math.prod(shape)} {shape}")
                f.finish()
        if sharded:
            index = {"metadata": {"total_size": plan.total_bytes, **({ALIASES: plan.aliases} if plan.aliases else {})},
                     "weight_map": weight_map}
            (temp / INDEXES[0]).write_text(json.dumps(index, indent=2))
        if model_folder is not None:
            model_folder(temp)
    return output
