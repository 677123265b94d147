"""Checkpoint files: safe loading, atomic saving, and streaming merges and diffs in bounded memory.

Formats: safetensors files (first choice), ``.pt``/``.pth``/``.bin``/``.ckpt`` files read
with ``torch.load(weights_only=True, mmap=True)`` (never unpickling code), and Hugging Face
folders (``model.safetensors.index.json`` or ``pytorch_model.bin.index.json`` with shards).
Merges and diffs stream: each tensor is read, combined, written and released before the
next, so memory is bounded by a few tensors, not by the model (see ``_files.py``).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from rich.table import Table
from torch import nn

from ._files import (
    TORCH_SUFFIXES,
    Checkpoint,
    Fill,
    PathLike,
    Plan,
    check_output,
    open_checkpoint,
    open_checkpoints,
    parse_dtype,
    parse_size,
    staged,
    write,
)
from ._merge_math import compute_dtype_of, merge_tensor, promoted_dtype
from ._merge_methods import check_complex, check_method
from ._merge_options import merge_plan
from ._merge_sliced import _slices
from ._model_folder import DEFAULT_SHARD, copy_source, folder_finisher, source_folder
from ._model_state import file_state, load_into, on_rank0, unwrapped
from ._publish import as_path, input_paths, output_path
from ._reader import Scratch, SliceReader, one_compute_thread
from ._safetensors import METADATA
from ._tensors import aliases_of, human_bytes, require_flag, require_module
from ._term import byte_progress, console
from .average import check_compatible
from .errors import CheckpointError, OptionError, OptionTypeError
from .select import Selector, select_keys

__all__ = ["Diff", "diff_files", "load", "merge_files", "save"]

# Element-wise methods (the registry's ``elementwise``) are streamed in slices of this many elements
# (4 MB of float32), which gives the same result as whole tensors.
_RESERVED = "layerwise."  # metadata keys layerwise writes and reads back (the tied-tensor map)
_SLICE = 1 << 20


def _state_dict(obj: nn.Module | Mapping[str, torch.Tensor], path: Path) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    elif not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: save takes an nn.Module or a state dict, not {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: not a state dict: {', '.join(map(repr, bad[:5]))} are not tensors")
    bad = [k for k in obj if not isinstance(k, str)]
    if bad:
        raise CheckpointError(f"{path}: tensor names are strings; not {', '.join(map(repr, bad[:5]))}")
    state = {unwrapped(k): v for k, v in obj.items()}
    if len(state) < len(obj):
        raise CheckpointError(f"{path}: keys differ only by torch.compile's '_orig_mod.': save the model once")
    for k, t in state.items():
        if k == METADATA or k.encode("utf-8", "surrogatepass").decode("utf-8", "ignore") != k:  # lone surrogates
            raise CheckpointError(f"{path}: a tensor cannot be named {k!r}; rename it")
        if t.layout != torch.strided or t.is_meta or t.is_quantized:
            kind = "on the meta device (no values)" if t.is_meta else "quantized" if t.is_quantized else str(t.layout)
            raise CheckpointError(f"{path}: tensor {k!r} is {kind}; save dense tensors with values "
                                  "(t.to_dense(), or materialize the model first)")
    return state


def save(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], path: PathLike, *,
         max_shard_size: int | str | None = None, metadata: Mapping[str, str] | None = None,
         overwrite: bool = False) -> Path:
    """Save a model's state dict atomically: ``.safetensors``, ``.pt``/``.bin``, or a sharded folder.

    Tied (shared) tensors are stored once and restored as shared by :func:`load`: safetensors
    cannot hold shared tensors, so the aliases are recorded in the metadata. With
    ``max_shard_size`` (bytes or ``"5GB"``) ``path`` is a folder in Hugging Face's layout
    (``model-00001-of-0000N.safetensors`` and ``model.safetensors.index.json``). The file is
    written under a temporary name and renamed when complete; an existing ``path`` is
    replaced only with ``overwrite=True`` (a folder keeps the files it holds beside the weights,
    such as ``config.json``). A ``torch.compile``d model is saved under its inner names (no
    ``_orig_mod.``), a DistributedDataParallel wrapper under its module's names (no ``module.``).
    A sharded (FSDP2, DTensor) model or state dict is a collective: every rank calls ``save``,
    the full tensors are gathered to rank 0, which writes the file, and every rank returns the
    path or raises rank 0's error. ``metadata`` maps strings to strings; keys starting
    ``layerwise.`` are reserved.

    Example:
        >>> import layerwise as lw, torch, tempfile, os
        >>> lm = torch.nn.ModuleDict({"embed": torch.nn.Embedding(5, 3), "out": torch.nn.Linear(3, 5, bias=False)})
        >>> _ = lw.tie(lm, "out.weight", "embed.weight")
        >>> path = os.path.join(tempfile.mkdtemp(), "lm.safetensors")
        >>> _ = lw.save(lm, path)
        >>> sd = lw.load(path)
        >>> sd["out.weight"] is sd["embed.weight"]
        True
    """
    path = as_path(path, "save: path")
    model_or_state_dict, full = file_state(model_or_state_dict)
    if full is not model_or_state_dict:  # sharded (FSDP2): gathered on rank 0, which writes; all return or raise alike
        return on_rank0(lambda: save(full, path, max_shard_size=max_shard_size, metadata=metadata, overwrite=overwrite))
    state = _state_dict(model_or_state_dict, path)
    if metadata is not None and not isinstance(metadata, Mapping):
        raise OptionTypeError(f"save: metadata={metadata!r:.80} must map strings to strings, e.g. {{'step': '1000'}}")
    bad = [f"{k!r}: {type(v).__name__}" for k, v in (metadata or {}).items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise CheckpointError(f"{path}: safetensors metadata maps strings to strings; not {', '.join(bad)}")
    reserved = [k for k in metadata or {} if k.startswith(_RESERVED)]
    if reserved:
        raise CheckpointError(f"{path}: metadata keys starting with {_RESERVED!r} are layerwise's own "
                              f"({', '.join(map(repr, reserved))}); choose other names")
    if path.suffix in TORCH_SUFFIXES and max_shard_size is None:
        with staged(path, folder=False, overwrite=overwrite) as temp, open(temp, "wb") as f:
            torch.save(dict(state), f)  # torch.save keeps shared storage shared
            f.flush()
            os.fsync(f.fileno())
        return path
    aliases = aliases_of(state)
    entries = [(k, t.dtype, tuple(t.shape)) for k, t in state.items() if k not in aliases]
    plan = Plan(entries, aliases, dict(metadata or {}), parse_size(max_shard_size))
    return write(plan, path, lambda k: [state[k]], overwrite=overwrite)


def load(path: PathLike, *, key: str | None = None, into: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Load a checkpoint (file or Hugging Face folder) as a state dict, never unpickling code.

    ``.pt``/``.pth``/``.bin``/``.ckpt`` files are read with ``torch.load(weights_only=True,
    mmap=True)``; a file holding Python objects is refused with a note on converting it. A
    nested checkpoint (``{"state_dict": ...}``, Lightning files) is found when unambiguous,
    else ``key=`` chooses (the error lists the top-level keys). Tied tensors come back
    shared. ``into=model`` loads the result with ``strict=True`` (into a DDP wrapper's module; into an
    FSDP2 model each rank takes its shards of the full tensors, with no collective).

    Example:
        >>> import layerwise as lw, torch, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
        >>> torch.save({"state_dict": torch.nn.Linear(2, 2).state_dict(), "epoch": 3}, path)
        >>> sorted(lw.load(path))
        ['bias', 'weight']
    """
    if into is not None:
        require_module(into, "load(into=...)")  # before reading the file
    with open_checkpoint(path, key=key) as ckpt:
        stored = {k: ckpt.read(k) for k in ckpt.specs if k not in ckpt.aliases}
        state = {k: stored[ckpt.aliases.get(k, k)] for k in ckpt.specs}
    if into is not None:
        load_into(into, state, path)
    return state


def merge_files(inputs: Sequence[PathLike], output: PathLike, method: str = "linear",
                weights: Sequence[float] | None = None, base: PathLike | None = None,
                dtype: str | torch.dtype | None = None, select: Selector | Sequence[Selector] | None = None, *,
                key: str | None = None, max_shard_size: int | str | None = None, overwrite: bool = False,
                progress: bool = False, compute_dtype: str | torch.dtype | None = None,
                model_options: Sequence[Mapping[str, Any]] | None = None, copy_from: PathLike | None = None,
                **options: Any) -> Path:
    """Merge checkpoint files tensor by tensor into ``output``, in memory bounded by a few tensors.

    The methods and options are those of :func:`layerwise.merge` and use the same per-tensor
    function, so the file equals the in-memory result. Everything is checked before the first
    byte is written: every key, shape and dtype difference between the inputs (all listed in
    one error), the options, and the output path (never an input; an existing output only
    with ``overwrite=True``). ``dtype`` casts floating tensors of the output (``"bf16"``...);
    without it, inputs of mixed float dtypes give their promoted dtype. ``compute_dtype``
    (default float32) is the precision of the arithmetic.
    The output is a ``.safetensors`` file, or a folder (any other name but ``.pt``, ``.bin``...): a Hugging Face model
    folder that ``from_pretrained`` loads, with ``model.safetensors`` (shards and an index above
    ``max_shard_size``, default ``"5GB"``), the config and generation config of the base (else the
    first input, or ``copy_from``) with its dtype updated, its tokenizer files, and a ``README.md``
    card recording method, inputs and options. It appears only when complete (a process killed mid-merge leaves only a hidden
    ``.NAME.*.tmp`` beside it, safe to delete). ``progress=True`` shows bytes and throughput
    on stderr. Element-wise methods (linear, task arithmetic, nearswap, passthrough) stream each
    tensor in slices of 1M elements, so their working memory is a few slices; the other methods
    hold one tensor of each input.

    Example:
        >>> import layerwise as lw, torch, tempfile, os
        >>> folder = tempfile.mkdtemp()
        >>> a, b = (os.path.join(folder, n) for n in ("a.safetensors", "b.safetensors"))
        >>> _ = lw.save({"w": torch.tensor([1.0, 2.0])}, a); _ = lw.save({"w": torch.tensor([3.0, 6.0])}, b)
        >>> out = lw.merge_files([a, b], os.path.join(folder, "avg.safetensors"))
        >>> lw.load(out)["w"]
        tensor([2., 4.])
    """
    paths = input_paths(inputs) + ([as_path(base, "base")] if base is not None else [])
    m = check_method(method, has_base=base is not None, models=len(inputs))
    require_flag(progress, "progress", "merge_files")
    output, out_dtype = output_path(output, file_ok=True), parse_dtype(dtype)
    work_dtype = parse_dtype(compute_dtype, "compute_dtype")
    folder = output.suffix != ".safetensors"
    if copy_from is not None and not folder:
        raise OptionError(f"copy_from: {output} is a single .safetensors file; config and tokenizer are copied "
                          "only into a folder output")
    source = copy_source(copy_from) if copy_from is not None else None
    with open_checkpoints(paths, key=key) as opened:
        models, base_ckpt = (opened[:-1], opened[-1]) if base is not None else (opened, None)
        labelled = ([base_ckpt] if base_ckpt is not None else []) + models
        check_compatible([(c.label, c.specs) for c in labelled], mixed_floats=True)
        keys = list(models[0].specs)
        per_key, chosen = merge_plan(m, keys, len(models), weights=weights, options=options,
                                     model_options=model_options, select=select)
        first = labelled[0]
        check_complex(m, [k for k in keys if k in chosen and first.specs[k][1].is_complex])
        aliases = {a: s for a, s in first.aliases.items() if all(c.aliases.get(a) == s for c in labelled)}
        entries = []
        for k in keys:
            if k not in aliases:
                shape, in_dtype = first.specs[k]
                if in_dtype.is_floating_point:  # mixed float inputs: the promoted dtype
                    in_dtype = out_dtype or promoted_dtype([c.specs[k][1] for c in labelled], k)
                entries.append((k, in_dtype, shape))
        plan = Plan(entries, aliases, {"layerwise.merge": method},
                    parse_size(max_shard_size if max_shard_size is not None or not folder else DEFAULT_SHARD))
        finish = folder_finisher(
            inputs=list(zip(paths, opened)), source=source or source_folder(base if base is not None else inputs[0]),
            dtype=str(out_dtype).removeprefix("torch.") if out_dtype else None, method=method,
            options={**options, **({"weights": list(weights)} if weights is not None else {})}) if folder else None

        def sources(k: str) -> list[Checkpoint]:
            """What a streamed key reads: the base or first model for a key left out, else every model
            and the base where the method uses one (last)."""
            if k not in chosen:
                return [base_ckpt if base_ckpt is not None else models[0]]
            return models + ([base_ckpt] if base_ckpt is not None and m.base != "none" else [])

        # Keys copied or merged element-wise stream in slices, read ahead in a background thread;
        # whole-tensor methods read one tensor of each input when they need it, nothing ahead.
        streamed = {k for k, _, _ in entries
                    if k not in chosen or (m.elementwise and first.specs[k][1].is_floating_point)}
        reads = ((k, sources(k), s.start, s.stop) for k, _, _ in entries if k in streamed
                 for s in _slices(math.prod(first.specs[k][0]), _SLICE))

        def pieces_of(k: str) -> Iterator[torch.Tensor]:
            if k not in streamed:
                base_t = base_ckpt.read(k) if base_ckpt is not None else None
                yield merge_tensor(m, (x.read(k) for x in models), base_t, per_key[k], work[k], key=k,
                                   dtype=planned[k])
                return
            for read in reader.take(k):  # every step into reused buffers: no allocation per slice
                if k in chosen:
                    xs = [scratch.like(x, work[k], f"in{i}") for i, x in enumerate(read)]
                    yield Fill(xs[0].numel(), functools.partial(merged, k, xs))
                else:
                    yield Fill(read[0].numel(), functools.partial(in_output_dtype, k, read[0]))

        def merged(k: str, xs: list[torch.Tensor], room: torch.Tensor | None) -> torch.Tensor:
            """A slice merged straight into the output's buffer (``room``) when it has the compute dtype."""
            n, numel = len(models), xs[0].numel()
            out = room if room is not None and room.dtype == work[k] else scratch.get("merged", work[k], numel)
            result = merge_tensor(m, xs[:n], xs[n] if len(xs) > n else None, per_key[k], work[k], key=k,
                                  dtype=work[k], out=out)
            return in_output_dtype(k, result, room)

        def in_output_dtype(k: str, t: torch.Tensor, room: torch.Tensor | None) -> torch.Tensor:
            if room is None or t.data_ptr() == room.data_ptr():
                return scratch.like(t, planned[k], "out")
            return room.copy_(t)  # converted on the way into the output's buffer

        planned = {k: d for k, d, _ in entries}
        scratch = Scratch()
        work = {k: compute_dtype_of([c.specs[k][1] for c in labelled], work_dtype) for k in keys}
        check_output(output, paths, overwrite)  # before the progress bar starts
        with SliceReader(reads) as reader, one_compute_thread(), \
                byte_progress(progress, plan.total_bytes, f"{method} → {output.name}") as bar:
            return write(plan, output, pieces_of, overwrite=overwrite, inputs=paths, model_folder=finish,
                         progress=lambda n: bar.advance(bar.task_ids[0], n))


@dataclass
class Diff:
    """What :func:`diff_files` found: per-tensor distances and the keys, shapes and dtypes that differ.

    ``rows`` hold ``{"key", "max_abs", "rel_l2", "cosine"}`` per compared tensor; ``only_a``,
    ``only_b`` and ``mismatched`` list what could not be compared. Prints as a rich table.

    Example:
        >>> import layerwise as lw, torch, tempfile, os
        >>> folder = tempfile.mkdtemp()
        >>> a, b = os.path.join(folder, "a.safetensors"), os.path.join(folder, "b.safetensors")
        >>> _ = lw.save({"w": torch.ones(2), "x": torch.ones(1)}, a); _ = lw.save({"w": torch.ones(2)}, b)
        >>> d = lw.diff_files(a, b)
        >>> d.identical, d.only_a, d.rows[0]["cosine"]
        (False, ['x'], 1.0)
    """

    a: str
    b: str
    rows: list[dict[str, Any]]
    only_a: list[str]
    only_b: list[str]
    mismatched: list[str]

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {r["key"]: {k: v for k, v in r.items() if k != "key"} for r in self.rows}

    @property
    def identical(self) -> bool:
        return not (self.only_a or self.only_b or self.mismatched) and all(r["max_abs"] == 0 for r in self.rows)

    def __rich__(self) -> Table:
        table = Table(title=f"{self.a} vs {self.b}", title_justify="left",
                      caption="; ".join(filter(None, [
                          f"only in {self.a}: {', '.join(self.only_a)}" if self.only_a else "",
                          f"only in {self.b}: {', '.join(self.only_b)}" if self.only_b else "",
                          f"differ in shape/dtype: {'; '.join(self.mismatched)}" if self.mismatched else ""])) or None)
        for header in ("tensor", "max |a−b|", "relative L2", "cosine"):
            table.add_column(header, justify="left" if header == "tensor" else "right")
        for r in self.rows:
            table.add_row(r["key"], f"{r['max_abs']:.3g}", f"{r['rel_l2']:.3g}", f"{r['cosine']:.6f}")
        return table

    def print(self, file: IO[str] | None = None) -> None:
        console(file).print(self)


def _distance(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    if torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)):  # bit for bit, NaNs alike
        return {"max_abs": 0.0, "rel_l2": 0.0, "cosine": 1.0}
    wide = torch.complex128 if a.is_complex() else torch.float64  # a report: exact beats fast; complex stays complex
    x, y = a.to(wide).flatten(), b.to(wide).flatten()
    xx, yy, xy, dd = (torch.vdot(u, v).real.item() for u, v in ((x, x), (y, y), (x, y), (x - y, x - y)))
    if math.isnan(xx + yy + dd):  # nan (or inf - inf) where the files differ: no distance to report
        return {"max_abs": math.nan, "rel_l2": math.nan, "cosine": math.nan}
    return {
        "max_abs": (x - y).abs().max().item() if x.numel() else 0.0,
        "rel_l2": 0.0 if dd == 0 else math.sqrt(dd / xx) if xx > 0 else math.inf,
        "cosine": 1.0 if xx == 0 and yy == 0 else xy / math.sqrt(xx * yy) if xx > 0 and yy > 0 else 0.0,
    }


def diff_files(a: PathLike, b: PathLike, *selectors: Selector, key: str | None = None) -> Diff:
    """Compare two checkpoints tensor by tensor, streaming: max |a−b|, relative L2 ‖a−b‖/‖a‖, cosine.

    Keys only in one file and tensors whose shape or dtype differ are listed, not compared.
    Selectors restrict the keys compared (names only: no ``type:``).

    Example:
        >>> import layerwise as lw, torch, tempfile, os
        >>> folder = tempfile.mkdtemp()
        >>> _ = lw.save({"w": torch.tensor([3.0, 4.0])}, os.path.join(folder, "a.safetensors"))
        >>> _ = lw.save({"w": torch.tensor([3.0, 4.5])}, os.path.join(folder, "b.safetensors"))
        >>> d = lw.diff_files(os.path.join(folder, "a.safetensors"), os.path.join(folder, "b.safetensors"))
        >>> d.to_dict()["w"]["max_abs"], d.to_dict()["w"]["rel_l2"]
        (0.5, 0.1)
    """
    with open_checkpoints([a, b], key=key) as (ca, cb):
        keys = [k for k in ca.specs if k in cb.specs]
        if selectors:
            keys = select_keys(ca.specs, *selectors)
            keys = [k for k in keys if k in cb.specs]
        rows, mismatched = [], []
        for k in keys:
            (sa, da), (sb, db) = ca.specs[k], cb.specs[k]
            if sa != sb or da != db:
                mismatched.append(f"{k}: {da} {list(sa)} vs {db} {list(sb)}")
                continue
            rows.append({"key": k, **_distance(ca.read(k), cb.read(k))})
        return Diff(ca.label, cb.label, rows, [k for k in ca.specs if k not in cb.specs],
                    [k for k in cb.specs if k not in ca.specs], mismatched)


def describe_file(path: PathLike, *selectors: Selector, key: str | None = None) -> Table:
    """A table of a checkpoint's tensors from its header(s): name, dtype, shape, numel, bytes, totals."""
    with open_checkpoint(path, key=key) as ckpt:
        keys = select_keys(ckpt.specs, *selectors) if selectors else list(ckpt.specs)
        stored = [k for k in ckpt.specs if k not in ckpt.aliases]
        total = sum(ckpt.nbytes(k) for k in stored)
        numel = sum(math.prod(ckpt.specs[k][0]) for k in stored)
        table = Table(title=f"{ckpt.label}: {len(stored)} tensors, {numel:,} elements, {human_bytes(total)}",
                      title_justify="left")
        for header in ("name", "dtype", "shape", "numel", "bytes", "alias of"):
            table.add_column(header, justify="right" if header in ("numel", "bytes") else "left")
        for k in keys:
            shape, dtype = ckpt.specs[k]
            table.add_row(k, str(dtype).removeprefix("torch."), "×".join(map(str, shape)) or "scalar",
                          f"{math.prod(shape):,}", human_bytes(ckpt.nbytes(k)), ckpt.aliases.get(k, ""))
        return table
