"""mergekit recipes: the YAML format of ``mergekit-yaml``, parsed, validated and planned.

A recipe names a merge method, its inputs (``models``, or ``slices`` of layer ranges
stacked into a deeper model: a "frankenmerge"), a ``base_model``, ``parameters`` (global,
per slice and per model; each a scalar, a "gradient" list interpolated over the layers, or
a list of ``{filter, value}`` rules) and dtypes. layerwise runs such a file unchanged with
``layerwise merge --config recipe.yml -o DIR``; what it does not support (``modules``,
a ``union`` tokenizer, per-token ``tokenizer.tokens``, hub ids, LoRA references, chat template
names other than ``chatml``) is refused by name before anything is read.

Values follow mergekit exactly: a per-model option is looked up in that model's own
``parameters``, then the slice's, then the recipe's; a gradient ``[a, b, c]`` at layer
``i`` of a slice of ``n`` layers is interpolated at ``t = i / (n - 1)`` (``1`` for a
one-layer slice); tensors outside the layer stack (embeddings, final norm, head) use
``t = 0`` and come from the first slice's sources (embeddings) or the last slice's (the rest).

This module reads no tensor and imports no torch: parsing and planning are plain data.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._model_folder import chat_template_option
from .errors import CheckpointNotFoundError, MissingExtraError, OptionError

__all__ = ["Recipe", "Slice", "Source", "OutputTensor", "parse_recipe", "read_recipe", "layer_plan", "stack_of"]

_TOP = {"models", "slices", "merge_method", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source",
        "chat_template", "tokenizer"}
_REFUSED = {
    "modules": "multi-module recipes are not supported; use 'models' or 'slices'",
}
_SLICE_KEYS = {"sources", "base_model", "parameters"}
_SOURCE_KEYS = {"model", "layer_range", "parameters"}
_MODEL_KEYS = {"model", "parameters"}
# Tensors before the layer stack come from the first slice; mergekit calls them pre-weights.
_PRE = re.compile(r"(^|\.)(embed_tokens|embed_in|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings|"
                  r"tok_embeddings|embeddings|embed)(\.|$)")
_STACK = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|layer|h|blocks|block))\.(?P<index>\d+)\.(?P<rest>.+)$")


@dataclass(frozen=True)
class Source:
    """One input of a slice: a model folder or file, a half-open layer range, its own parameters."""

    model: Path
    layer_range: tuple[int, int] | None = None  # None: the whole stack (the ``models`` form)
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Slice:
    """One output slice: its sources (merged layer by layer), an optional base, its own parameters."""

    sources: tuple[Source, ...]
    base_model: Path | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe. ``stacked`` is True for the ``slices`` form (layers renumbered into a new stack).

    Example:
        >>> from layerwise.recipes import parse_recipe
        >>> r = parse_recipe({"merge_method": "linear", "models": [
        ...     {"model": ".", "parameters": {"weight": 1}}, {"model": "..", "parameters": {"weight": 3}}]})
        >>> r.method, [str(s.model) for s in r.slices[0].sources], r.stacked
        ('linear', ['.', '..'], False)
    """

    method: str
    slices: tuple[Slice, ...]
    stacked: bool
    base_model: Path | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: Path | None = None  # given (``base`` is the base model): embeddings follow its vocabulary
    text: str = ""
    chat_template: str | None = None  # "auto" (the inputs' most common one) or the template's Jinja text
    pad_to_multiple_of: int | None = None  # tokenizer.pad_to_multiple_of: embedding rows rounded up

    def models(self) -> list[Path]:
        """Every model the recipe reads, base first, each once."""
        seen = [self.base_model] if self.base_model else []
        for s in self.slices:
            for p in [s.base_model, *(src.model for src in s.sources)]:
                if p is not None and p not in seen:
                    seen.append(p)
        return seen


def _where(*parts: Any) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(parts))


def _unknown(keys: Any, allowed: set[str], where: str) -> None:
    for key in keys:
        if key in _REFUSED and where == "recipe":
            raise OptionError(f"recipe: '{key}' is not supported: {_REFUSED[key]}")
        if key not in allowed:
            near = difflib.get_close_matches(str(key), sorted(allowed), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else f"; known keys: {', '.join(sorted(allowed))}"
            raise OptionError(f"{where}: unknown key '{key}'{hint}")


def _model_path(value: Any, where: str) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise OptionError(f"{where}: a model is a local path (a string), not {value!r}")
    if "+" in value and not Path(value).exists():
        raise OptionError(f"{where}: '{value}' applies a LoRA adapter ('model+lora'), which is not supported; "
                          "merge the adapter into the model first (peft's merge_and_unload) and give that folder")
    path = Path(value).expanduser()
    if not path.exists():
        hub = re.fullmatch(r"[\w.-]+/[\w.-]+(@[\w.-]+)?", value) and not value.startswith((".", "/"))
        if hub:
            raise OptionError(f"{where}: '{value}' is not a local path; hub model ids are not downloaded "
                              f"(no network access): download it first, e.g. `huggingface-cli download {value} "
                              f"--local-dir DIR`, and give DIR")
        raise OptionError(f"{where}: '{value}' does not exist (paths are relative to the current directory)")
    return path


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise OptionError(f"{where}: parameters must be a mapping of option names to values, not {value!r:.200}")
    for name in value:
        if not isinstance(name, str):
            raise OptionError(f"{where}: an option name is a string such as 'weight', not {name!r:.100}")
    return {name: _setting(setting, f"{where}.{name}") for name, setting in value.items()}


def _setting(setting: Any, where: str, rules: bool = True) -> Any:
    """mergekit's ``ParameterSetting``, checked and in the form the merge reads: a scalar or gradient,
    or ``{filter, value}`` rules whose values are scalars or gradients (never rules again: a YAML alias
    could make them recursive); one rule alone is a list of one, as mergekit reads it. A number YAML
    left as text (``1e-3``: PyYAML wants a dot) is a number, as mergekit's validation makes it."""
    if isinstance(setting, (int, float, str)):  # bool is an int
        return _number(setting)
    if isinstance(setting, list) and setting and all(isinstance(e, (int, float, str)) for e in setting):
        return [_number(e) for e in setting]
    if rules and isinstance(setting, Mapping) and "value" in setting and set(setting) <= {"filter", "value"}:
        setting = [setting]
    if rules and isinstance(setting, list) and setting:
        out = []
        for i, rule in enumerate(setting):
            if not isinstance(rule, Mapping) or "value" not in rule or set(rule) - {"filter", "value"}:
                raise OptionError(f"{where}[{i}]: a rule is {{filter: NAME_PART, value: V}}, not {rule!r:.200}")
            if rule.get("filter") is not None and not isinstance(rule["filter"], str):
                raise OptionError(f"{where}[{i}].filter must be a string, not {rule['filter']!r:.100}")
            out.append({**rule, "value": _setting(rule["value"], f"{where}[{i}].value", rules=False)})
        return out
    what = ("a value is a number, a list of numbers (a gradient over the layers) or a list of {filter, value} rules"
            if rules else "a rule's value is a number or a list of numbers (a gradient over the layers)")
    raise OptionError(f"{where}: {what}, not {setting!r:.200}")


def _number(value: Any) -> Any:
    """``'1e-3'`` and ``'0.5'`` as numbers (an int where it is one); other text and numbers as they are."""
    if not isinstance(value, str):
        return value
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _layer_range(value: Any, where: str) -> tuple[int, int]:
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value) or value[0] >= value[1]):
        raise OptionError(f"{where}: layer_range is [start, end) with 0 <= start < end, not {value!r}")
    return value[0], value[1]


def parse_recipe(data: Any, *, text: str = "") -> Recipe:
    """Check a recipe (the mapping a YAML file holds) and return it as a :class:`Recipe`.

    Example:
        >>> from layerwise.recipes import parse_recipe
        >>> parse_recipe({"merge_method": "linear", "models": [{"model": "."}], "modules": {}})
        Traceback (most recent call last):
        ...
        layerwise.errors.OptionError: recipe: 'modules' is not supported: multi-module recipes are not supported...
    """
    if not isinstance(data, Mapping):
        raise OptionError(f"recipe: expected a mapping of keys (merge_method, models...), not {type(data).__name__}")
    _unknown(data, _TOP, "recipe")
    method = data.get("merge_method")
    if not isinstance(method, str):
        raise OptionError("recipe: 'merge_method' is missing (e.g. merge_method: ties)")
    if ("models" in data) == ("slices" in data):
        raise OptionError("recipe: give exactly one of 'models' or 'slices'")
    base = _model_path(data["base_model"], "base_model") if data.get("base_model") is not None else None
    slices: list[Slice] = []
    if "models" in data:
        models = data["models"]
        if not isinstance(models, list) or not models:
            raise OptionError("models: a non-empty list of {model: PATH, parameters: {...}}")
        sources = []
        for i, entry in enumerate(models):
            entry = {"model": entry} if isinstance(entry, str) else entry
            if not isinstance(entry, Mapping):
                raise OptionError(f"models[{i}]: expected {{model: PATH, parameters: {{...}}}}, not {entry!r}")
            _unknown(entry, _MODEL_KEYS, _where("models", i))
            sources.append(Source(_model_path(entry.get("model"), _where("models", i, "model")),
                                  None, _parameters(entry.get("parameters"), _where("models", i, "parameters"))))
        slices.append(Slice(tuple(sources)))
    else:
        if not isinstance(data["slices"], list) or not data["slices"]:
            raise OptionError("slices: a non-empty list of {sources: [{model, layer_range}]}")
        for i, s in enumerate(data["slices"]):
            if not isinstance(s, Mapping) or not isinstance(s.get("sources"), list) or not s["sources"]:
                raise OptionError(f"slices[{i}]: expected {{sources: [{{model: PATH, layer_range: [a, b]}}]}}")
            _unknown(s, _SLICE_KEYS, _where("slices", i))
            sources = []
            for j, src in enumerate(s["sources"]):
                where = _where("slices", i, "sources", j)
                if not isinstance(src, Mapping):
                    raise OptionError(f"{where}: expected {{model: PATH, layer_range: [a, b]}}, not {src!r}")
                _unknown(src, _SOURCE_KEYS, where)
                if "layer_range" not in src:
                    raise OptionError(f"{where}: layer_range is missing (e.g. layer_range: [0, 16])")
                sources.append(Source(_model_path(src.get("model"), where + ".model"),
                                      _layer_range(src["layer_range"], where + ".layer_range"),
                                      _parameters(src.get("parameters"), where + ".parameters")))
            lengths = {src.layer_range[1] - src.layer_range[0] for src in sources}
            if len(lengths) > 1:
                raise OptionError(f"slices[{i}]: every source of a slice needs the same number of layers, "
                                  f"got {sorted(lengths)}")
            slice_base = s.get("base_model")
            slices.append(Slice(tuple(sources), _model_path(slice_base, _where("slices", i, "base_model"))
                                if slice_base is not None else None, _parameters(s.get("parameters"),
                                                                                 _where("slices", i, "parameters"))))
    tokenizer, pad, where = data.get("tokenizer_source"), None, "tokenizer_source"
    if "tokenizer" in data:  # mergekit's newer form: {source: union (default), base or a model, pad_to_multiple_of}
        if tokenizer is not None or not isinstance(data["tokenizer"], Mapping):
            raise OptionError("tokenizer: {source: base or a model path, pad_to_multiple_of: n}, and without "
                              "tokenizer_source (mergekit takes one of the two)")
        if "tokens" in data["tokenizer"]:
            raise OptionError("tokenizer.tokens (per-token embedding sources) is not supported; give source "
                              "(and pad_to_multiple_of) only")
        _unknown(data["tokenizer"], {"source", "pad_to_multiple_of"}, "tokenizer")
        tokenizer, pad, where = data["tokenizer"].get("source", "union"), data["tokenizer"].get("pad_to_multiple_of"), \
            "tokenizer.source"
        if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
            raise OptionError(f"tokenizer.pad_to_multiple_of: a whole number >= 1, not {pad!r}")
    if tokenizer == "union":
        raise OptionError(f"{where}: 'union' (building a merged vocabulary) is not supported; use 'base' or a model path")
    if tokenizer == "base" and base is None:
        raise OptionError(f"{where}: 'base' needs a base_model")
    for name in ("dtype", "out_dtype"):
        if data.get(name) is not None and not isinstance(data[name], str):
            raise OptionError(f"{name}: a dtype name (bfloat16, float16, float32), not {data[name]!r}")
    return Recipe(method, tuple(slices), "slices" in data, base, _parameters(data.get("parameters"), "parameters"),
                  data.get("dtype"), data.get("out_dtype"),
                  None if tokenizer is None else base if tokenizer == "base" else _model_path(tokenizer, where),
                  text, chat_template_option(data.get("chat_template")), pad)


def read_recipe(path: str | Path) -> Recipe:
    """Read and check a recipe file (YAML, as ``mergekit-yaml`` takes it; needs ``pyyaml``).

    Example:
        >>> import tempfile, os
        >>> from layerwise.recipes import read_recipe
        >>> path = os.path.join(tempfile.mkdtemp(), "r.yml")
        >>> _ = open(path, "w").write("merge_method: linear\\nmodels:\\n  - model: " + os.path.dirname(path) + "\\n")
        >>> read_recipe(path).method
        'linear'
    """
    try:
        import yaml
    except ImportError:
        raise MissingExtraError("recipes need pyyaml: pip install 'layerwise[recipes]'") from None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path}: no such recipe file") from None
    except OSError as e:  # a folder, no permission
        raise OptionError(f"{path}: cannot read the recipe ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise OptionError(f"{path}: not a YAML recipe (not UTF-8 text: byte {e.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise OptionError(f"{path}: not a YAML recipe ({' '.join(str(e).split())})") from None
    return parse_recipe(data, text=text)


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the output: its key, the slice it belongs to, the input key read from each
    source of that slice, and its layer position ``t`` (0 outside the layer stack)."""

    key: str
    slice: int
    source_keys: tuple[str, ...]
    t: float


def stack_of(keys: Sequence[str]) -> tuple[str, int] | None:
    """The layer stack of a checkpoint: its key prefix (``model.layers``) and number of layers, or None.

    Example:
        >>> from layerwise.recipes import stack_of
        >>> stack_of(["model.embed_tokens.weight", "model.layers.0.mlp.weight", "model.layers.1.mlp.weight"])
        ('model.layers', 2)
    """
    found: dict[str, set[int]] = {}
    for key in keys:
        m = _STACK.match(key)
        if m:
            found.setdefault(m["prefix"], set()).add(int(m["index"]))
    if not found:
        return None
    prefix = max(found, key=lambda p: (len(found[p]), -len(p)))
    return prefix, max(found[prefix]) + 1


def layer_plan(recipe: Recipe, keys_of: Mapping[Path, Sequence[str]]) -> list[OutputTensor]:
    """Every output tensor of ``recipe``, given the keys each model holds; checks layer ranges.

    The ``models`` form keeps every key; the ``slices`` form renumbers the layers of each slice
    after the previous slices' and takes the other tensors from the first slice (embeddings)
    or the last (final norm, head).

    Example:
        >>> from pathlib import Path
        >>> from layerwise.recipes import parse_recipe, layer_plan
        >>> r = parse_recipe({"merge_method": "passthrough", "slices": [
        ...     {"sources": [{"model": ".", "layer_range": [0, 2]}]},
        ...     {"sources": [{"model": ".", "layer_range": [1, 2]}]}]})
        >>> keys = ["embed.weight", "layers.0.w", "layers.1.w", "norm.weight"]
        >>> [(o.key, o.source_keys[0], o.t) for o in layer_plan(r, {Path("."): keys})]
        [('embed.weight', 'embed.weight', 0.0), ('layers.0.w', 'layers.0.w', 0.0), ('layers.1.w', 'layers.1.w', 1.0), ('layers.2.w', 'layers.1.w', 1.0), ('norm.weight', 'norm.weight', 0.0)]
    """
    first = recipe.slices[0].sources[0].model
    stack = stack_of(keys_of[first])
    if not recipe.stacked:
        # Every source holds the same keys (checked by the caller against the headers); t follows the layer index.
        out = []
        for key in keys_of[first]:
            m = _STACK.match(key)
            t = 0.0
            if stack and m and m["prefix"] == stack[0]:
                t = int(m["index"]) / (stack[1] - 1) if stack[1] > 1 else 1.0
            out.append(OutputTensor(key, 0, (key,) * len(recipe.slices[0].sources), t))
        return out
    if stack is None:
        raise OptionError(f"slices: {first} has no layer stack (no keys like 'model.layers.0.…') to slice")
    prefix = stack[0]
    per_layer: dict[Path, dict[int, list[str]]] = {}
    outside: dict[Path, list[str]] = {}
    for model, keys in keys_of.items():
        layers: dict[int, list[str]] = {}
        for key in keys:
            m = _STACK.match(key)
            if m and m["prefix"] == prefix:
                layers.setdefault(int(m["index"]), []).append(m["rest"])
            else:
                outside.setdefault(model, []).append(key)
        per_layer[model] = layers
    pre = [k for k in outside.get(first, []) if _PRE.search(k)]
    post = [k for k in outside.get(first, []) if not _PRE.search(k)]
    out = [OutputTensor(k, 0, (k,) * len(recipe.slices[0].sources), 0.0) for k in pre]
    index = 0
    for i, s in enumerate(recipe.slices):
        length = s.sources[0].layer_range[1] - s.sources[0].layer_range[0]
        for j, src in enumerate(s.sources):
            have = per_layer.get(src.model, {})
            start, end = src.layer_range
            if end > len(have) or any(n not in have for n in range(start, end)):
                raise OptionError(f"slices[{i}].sources[{j}]: layer_range [{start}, {end}) but {src.model} has "
                                  f"{len(have)} layers under '{prefix}'")
        for offset in range(length):
            t = offset / (length - 1) if length > 1 else 1.0
            rests = per_layer[s.sources[0].model][s.sources[0].layer_range[0] + offset]
            for rest in rests:
                out.append(OutputTensor(f"{prefix}.{index}.{rest}", i, tuple(
                    f"{prefix}.{src.layer_range[0] + offset}.{rest}" for src in s.sources), t))
            index += 1
    last = len(recipe.slices) - 1
    out += [OutputTensor(k, last, (k,) * len(recipe.slices[-1].sources), 0.0) for k in post]
    return out
