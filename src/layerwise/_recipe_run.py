"""Running a mergekit recipe: validate it against every input's header, then stream the merge into a
model folder (weights, config, tokenizer, card) published in one step.

The per-tensor math and the option resolution are the merge engine's (``_merge_math``,
``_merge_options``), so a recipe gives what ``merge_files`` gives for the same method and options.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ._files import Checkpoint, Plan, open_checkpoints, parse_dtype, parse_size, write
from ._merge_math import compute_dtype_of, merge_tensor, promoted_dtype
from ._merge_methods import ALIASES, Method, check_complex, check_method, get_method
from ._merge_options import resolve_options
from ._model_folder import DEFAULT_SHARD, auto_chat_template, copy_source, folder_finisher, source_folder, vocabulary
from ._publish import output_path
from ._term import byte_progress
from ._vocab import permutation, remap_rows
from .errors import MergeError, OptionError
from .recipes import Recipe, _where, layer_plan, read_recipe


def _layered(*settings: Any) -> Any:
    """One setting that looks in ``settings`` in order, as mergekit does: filter rules that match nothing
    fall through to the next level; a scalar or a gradient always answers."""
    rules: list[Any] = []
    for s in settings:
        if s is None:
            continue
        if isinstance(s, list) and s and all(isinstance(r, Mapping) for r in s):
            rules += s
            continue
        rules.append({"value": s})
        break
    if not rules:
        return None
    return rules[0]["value"] if len(rules) == 1 and "filter" not in rules[0] else rules


def _merged(*levels: Mapping[str, Any]) -> dict[str, Any]:
    names = [n for level in levels for n in level]
    return {n: _layered(*(level.get(n) for level in levels)) for n in dict.fromkeys(names)}


# The tensors mergekit re-maps to the tokenizer's vocabulary (its architectures' is_embed weights).
_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|tok_embeddings|embed_in|lm_head|embed_out)\.weight$")


@dataclass
class _Job:
    key: str
    sources: list[tuple[Checkpoint, str]]
    base: tuple[Checkpoint, str] | None
    options: dict[str, Any]
    rows: int | None = None  # an embedding cut to the tokenizer's vocabulary
    index: list[torch.Tensor] | None = None  # per input (base last): its row of each token (vocabularies differ)


def _jobs(recipe: Recipe, opened: Mapping[Path, Checkpoint]) -> list[_Job]:
    method = get_method(recipe.method)
    plan = layer_plan(recipe, {p: list(c.specs) for p, c in opened.items()})
    per_model_names = {o.name for o in method.options if o.per_model}
    jobs: list[_Job] = []
    for i, s in enumerate(recipe.slices):
        for j, src in enumerate(s.sources):  # a misspelt per-model option would otherwise fall to its default
            _known(method, src.parameters, _where("slices", i, "sources", j) if recipe.stacked else _where("models", j))
        base = (s.base_model or recipe.base_model) if method.base != "none" else None
        positions = [j for j, src in enumerate(s.sources) if src.model != base]
        base_at = next((j for j, src in enumerate(s.sources) if src.model == base), None)
        if base is not None and base_at is None and recipe.stacked:
            raise MergeError(f"slices[{i}]: base_model {base} must be one of the slice's sources (as in mergekit)")
        if method.name == "slerp" and base is not None and len(positions) != 1:  # said where, before check_method
            raise MergeError(f"slerp interpolates the base_model {base} and one other model, as in mergekit; "
                             f"{'slices[' + str(i) + ']' if recipe.stacked else 'models'} gives {len(positions)} others")
        check_method(method, has_base=base is not None, models=len(positions))
        outs = [o for o in plan if o.slice == i]
        glob = _merged(s.parameters, recipe.parameters)
        per_model = [{n: v for n, v in _merged(s.sources[j].parameters, glob).items() if n in per_model_names}
                     for j in positions]
        per_key = resolve_options(method, [o.key for o in outs], len(positions),
                                  options={n: v for n, v in glob.items() if n not in per_model_names},
                                  model_options=per_model, positions={o.key: o.t for o in outs})
        for o in outs:
            sources = [(opened[s.sources[j].model], o.source_keys[j]) for j in positions]
            base_src = None
            if base is not None:
                base_src = (opened[base], o.source_keys[base_at] if base_at is not None else o.key)
            jobs.append(_Job(o.key, sources, base_src, per_key[o.key]))
    return jobs


def _known(method: Method, parameters: Mapping[str, Any], where: str) -> None:
    names = sorted(o.name for o in method.options)
    for name in parameters:
        if name not in names and ALIASES.get(name) not in names:
            near = difflib.get_close_matches(name, names, n=1)
            hint = f"did you mean '{near[0]}'?" if near else f"its options are {', '.join(names) or 'none'}"
            raise OptionError(f"{where}.parameters: {method.name} takes no option '{name}'; {hint}")


def _check(jobs: Sequence[_Job]) -> None:
    """Every tensor each job reads exists with one shape (but for the rows of re-mapped embeddings):
    all differences in one error."""
    problems = []
    for job in jobs:
        shapes = {}
        for ckpt, key in job.sources + ([job.base] if job.base else []):
            if key not in ckpt.specs:
                problems.append(f"{job.key}: {ckpt.label} lacks {key}")
            else:
                shapes[f"{ckpt.label}:{key}"] = ckpt.specs[key][0][1 if job.index is not None else 0:]
        if len(set(shapes.values())) > 1:
            problems.append(f"{job.key}: shapes differ: " + ", ".join(f"{w} {list(s)}" for w, s in shapes.items()))
    if problems:
        raise MergeError(f"the recipe's inputs do not fit ({len(problems)} problems): " + "; ".join(problems[:8])
                         + (" ..." if len(problems) > 8 else ""))


def _fit_vocabulary(recipe: Recipe, jobs: Sequence[_Job], opened: Mapping[Path, Checkpoint]) -> int | None:
    """mergekit's ``tokenizer_source``: the embeddings (and head) get one row per token of that
    tokenizer's vocabulary. When every model shares the vocabulary this keeps the first
    ``len(vocab)`` rows (padding rows go, as in mergekit); else each input's rows are re-mapped
    token by token (:mod:`layerwise._vocab`)."""
    if recipe.tokenizer_source is None:
        return None
    source = source_folder(recipe.tokenizer_source)
    vocab = vocabulary(source, str(recipe.tokenizer_source))
    vocab_of = {id(ckpt): vocab if source_folder(model) == source else vocabulary(source_folder(model), str(model))
                for model, ckpt in opened.items()}
    multiple = recipe.pad_to_multiple_of or 1
    size = -(-len(vocab) // multiple) * multiple  # padding rows: each model's mean token row, as mergekit
    for job in jobs:
        if not _EMBEDDING.search(job.key):
            continue
        inputs = job.sources + ([job.base] if job.base else [])
        if size > len(vocab) or any(vocab_of[id(c)] != vocab for c, _ in inputs) or \
                len({c.specs[k][0][0] for c, k in inputs}) > 1:  # one vocabulary, padded differently
            job.index = [permutation(vocab, vocab_of[id(c)], c.specs[k][0][0]) for c, k in inputs]
        else:
            rows = job.sources[0][0].specs[job.sources[0][1]][0][0]
            if rows < len(vocab):
                raise OptionError(f"tokenizer_source: {job.key} has {rows} rows for the {len(vocab)} tokens of "
                                  f"{recipe.tokenizer_source}")
        job.rows = size
    return size


def run_recipe(recipe: Recipe | str | Path, output: str | Path, *, overwrite: bool = False,
               max_shard_size: int | str | None = DEFAULT_SHARD, compute_dtype: str | torch.dtype | None = None,
               copy_from: str | Path | None = None, dtype: str | torch.dtype | None = None,
               progress: bool = False) -> Path:
    """Run a mergekit recipe into the model folder ``output``; see :mod:`layerwise.recipes`.

    Everything is checked before the first tensor byte is read: the recipe, every input's header
    (keys, shapes, layer ranges) and every option of every tensor. The folder holds
    ``model.safetensors`` (or shards and an index above ``max_shard_size``), the config and
    generation config of the base model (else the first model, or ``copy_from``) with its dtype
    and layer count updated, the tokenizer of ``tokenizer_source`` (default: the same model) with the
    recipe's ``chat_template`` if it has one, a ``README.md`` recording the recipe and, as mergekit,
    the recipe itself in ``mergekit_config.yml``. Output tensors are in ``dtype`` if given, else the recipe's
    ``out_dtype``, else its ``dtype``, else the inputs' (promoted) dtype; arithmetic is in
    ``compute_dtype`` (default float32; mergekit computes in the recipe's ``dtype``).
    """
    recipe = recipe if isinstance(recipe, Recipe) else read_recipe(recipe)
    output = output_path(output, file_ok=False)
    copied = copy_source(copy_from) if copy_from is not None else None
    out_dtype = parse_dtype(dtype or recipe.out_dtype or recipe.dtype)
    work_dtype = parse_dtype(compute_dtype, "compute_dtype")
    paths = recipe.models()
    method = get_method(recipe.method)
    with open_checkpoints(paths) as checkpoints:
        opened = dict(zip(paths, checkpoints))
        jobs = _jobs(recipe, opened)
        vocab_size = _fit_vocabulary(recipe, jobs, opened)
        _check(jobs)
        check_complex(method, [j.key for j in jobs if j.sources[0][0].specs[j.sources[0][1]][1].is_complex])
        entries, dtypes = [], {}
        for job in jobs:
            ckpt, key = job.sources[0]
            shape, dtype = ckpt.specs[key]
            ins = [c.specs[k][1] for c, k in job.sources + ([job.base] if job.base else [])]
            if dtype.is_floating_point:
                dtype = out_dtype or promoted_dtype(ins, job.key)
            dtypes[job.key] = (dtype, compute_dtype_of(ins, work_dtype))
            entries.append((job.key, dtype, shape if job.rows is None else (job.rows, *shape[1:])))
        by_key = {job.key: job for job in jobs}

        def pieces_of(key: str) -> Iterator[torch.Tensor]:
            job = by_key[key]
            rows = slice(job.rows)
            base = job.base[0].read(job.base[1])[rows] if job.base else None
            tensors: Iterable[torch.Tensor] = (c.read(k)[rows] for c, k in job.sources)
            if job.index is not None:  # vocabularies differ: every input re-mapped to the output's tokens
                inputs = [c.read(k) for c, k in job.sources + ([job.base] if job.base else [])]
                tensors = remap_rows(inputs, job.index, len(job.sources) if job.base else None, job.rows)
                base = tensors.pop() if job.base else None
            yield merge_tensor(method, tensors, base, job.options, dtypes[key][1], key=key, dtype=dtypes[key][0])

        first = recipe.slices[0].sources[0].model
        source = copied or source_folder(recipe.base_model or first)
        finish = folder_finisher(
            inputs=list(zip(paths, checkpoints)), source=source, method=recipe.method, options={}, recipe_text=recipe.text,
            tokenizer_source=copied or source_folder(recipe.tokenizer_source or recipe.base_model or first),
            dtype=str(out_dtype).removeprefix("torch.") if out_dtype else None,
            layer_map=[i for s in recipe.slices for i in range(*s.sources[0].layer_range)] if recipe.stacked else None,
            vocab_size=vocab_size, chat_template=auto_chat_template(list(map(source_folder, recipe.models())))
            if recipe.chat_template == "auto" else recipe.chat_template)
        plan = Plan(entries, {}, {"layerwise.merge": recipe.method}, parse_size(max_shard_size))
        with byte_progress(progress, plan.total_bytes, f"{recipe.method} → {output.name}") as bar:
            return write(plan, output, pieces_of, overwrite=overwrite, inputs=paths, model_folder=finish,
                         progress=lambda n: bar.advance(bar.task_ids[0], n))


