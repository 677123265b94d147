"""What makes a folder of merged weights a model: config, generation config, tokenizer, a card.

``transformers.AutoModel*.from_pretrained(folder)`` needs ``config.json``; without it a folder
of weights is not a model (transformers would build a default configuration instead).
These files are copied from a source model folder, with the config updated to the output
(its dtype; its layer count and per-layer lists when layers were stacked), and a
``README.md`` records how the folder was made.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._files import Checkpoint

from .errors import CheckpointError, CheckpointNotFoundError, MissingExtraError, OptionError, OptionTypeError

# Files a model folder needs besides its weights; everything else there (weights, optimizer
# states, trainer logs, the source's own card) is not copied.
_COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
           "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "processor_config.json")
_COPIED_SUFFIXES = (".model", ".tiktoken")
DEFAULT_SHARD = "5GB"  # transformers' default max_shard_size
_LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def source_folder(path: str | Path) -> Path | None:
    """The model folder behind an input: the folder itself, or the folder of a weights file; None
    when it holds no ``config.json`` (a bare checkpoint file)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    return folder if (folder / "config.json").is_file() else None


def copy_source(copy_from: str | Path) -> Path:
    """``copy_from`` checked: a model folder (one with ``config.json``) to take config and tokenizer from."""
    if not isinstance(copy_from, (str, Path)) or not str(copy_from):
        raise OptionTypeError(f"copy_from must be a path to a model folder, not {copy_from!r}")
    path = Path(copy_from)
    if not path.exists():
        raise CheckpointNotFoundError(f"copy_from: {path}: no such folder")
    if not (path.is_dir() and (path / "config.json").is_file()):
        raise OptionError(f"copy_from: {path} is not a model folder (no config.json in it); give the folder "
                          "of a model saved with save_pretrained")
    return path


def _copied(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and (p.name in _COPIED or p.suffix in _COPIED_SUFFIXES))


def _config(folder: Path, dtype: str | None, layer_map: Sequence[int] | None, vocab_size: int | None) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, or nested past the parser's depth
        raise CheckpointError(f"{path}: not a JSON config ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    if dtype is not None:
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
        for k in keys:
            config[k] = dtype
    if vocab_size is not None:
        config["vocab_size"] = vocab_size
    if layer_map is not None:
        counts = [k for k in _LAYER_COUNTS if isinstance(config.get(k), int)]
        old = config[counts[0]] if counts else None
        for k in counts:
            config[k] = len(layer_map)
        # Per-layer settings (Gemma's layer_types, sliding windows...) follow their layer.
        for k, v in list(config.items()):
            if isinstance(v, list) and old is not None and len(v) == old and old != len(layer_map):
                config[k] = [v[i] for i in layer_map]
    return config


# mergekit's named templates that layerwise ships: ChatML as the transformers documentation gives it.
CHAT_TEMPLATES = {"chatml": "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] "
                            "+ '<|im_end|>' + '\\n'}}{% endfor %}\n{% if add_generation_prompt %}{{ '<|im_start|>assistant"
                            "\\n' }}{% endif %}\n"}


def chat_template_option(value: Any) -> str | None:
    """mergekit's ``chat_template``: ``auto``, a template name, or the template's Jinja text."""
    if value is None or value == "auto":
        return value
    if not isinstance(value, str):
        raise OptionError(f"chat_template: 'auto', 'chatml' or a Jinja template (text), not {value!r}")
    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    if "{" in value and len(value) >= 20:  # mergekit's test for template text
        return value
    raise OptionError(f"chat_template: {value[:60]!r} is neither 'auto', 'chatml' nor a Jinja template; layerwise does "
                      "not ship mergekit's other named templates (llama3, mistral, alpaca, exaone): give the template "
                      "text, or 'auto' for the one most input models have")


def chat_template_of(folder: Path | None) -> str | None:
    """The chat template a model folder's tokenizer loads: ``chat_template.jinja``, else the
    ``chat_template`` of ``tokenizer_config.json`` (its ``default`` entry when it holds several)."""
    if folder is None:
        return None
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    try:
        template = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def auto_chat_template(folders: Sequence[Path | None]) -> str | None:
    """mergekit's ``chat_template: auto``: the template (stripped) most of ``folders`` have; None if none has one."""
    templates = [t.strip() for t in map(chat_template_of, folders) if t and t.strip()]
    return Counter(templates).most_common(1)[0][0] if templates else None


def write_model_files(out: Path, config_from: Path | None, tokenizer_from: Path | None, *, dtype: str | None,
                      layer_map: Sequence[int] | None = None, vocab_size: int | None = None,
                      chat_template: str | None = None) -> list[str]:
    """Write into folder ``out`` the config (updated) and generation config of ``config_from`` and the
    tokenizer files of ``tokenizer_from``, with ``chat_template`` (text) in ``chat_template.jinja``
    as ``save_pretrained`` writes it; returns the names written.

    Example:
        >>> import json, os, tempfile
        >>> from pathlib import Path
        >>> from layerwise._model_folder import write_model_files
        >>> src, out = Path(tempfile.mkdtemp()), Path(tempfile.mkdtemp())
        >>> _ = (src / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "layer_types": ["a", "b"]}))
        >>> write_model_files(out, src, src, dtype="bfloat16", layer_map=[0, 1, 1])
        ['config.json']
        >>> json.loads((out / "config.json").read_text())
        {'num_hidden_layers': 3, 'layer_types': ['a', 'b', 'b'], 'torch_dtype': 'bfloat16'}
    """
    written = []
    if config_from is not None:
        (out / "config.json").write_text(json.dumps(_config(config_from, dtype, layer_map, vocab_size), indent=2) + "\n")
        written.append("config.json")
        for p in _copied(config_from):
            if p.name == "generation_config.json":
                shutil.copyfile(p, out / p.name)
                written.append(p.name)
    if tokenizer_from is not None:
        for p in _copied(tokenizer_from):
            if p.name not in ("config.json", "generation_config.json"):
                shutil.copyfile(p, out / p.name)
                written.append(p.name)
    if chat_template is not None:
        (out / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
        written += [] if "chat_template.jinja" in written else ["chat_template.jinja"]
        config = out / "tokenizer_config.json"
        if "tokenizer_config.json" in written:  # a template kept there too would contradict the file
            try:
                data = json.loads(config.read_text(encoding="utf-8"))
            except (ValueError, RecursionError) as e:
                raise CheckpointError(f"{tokenizer_from / config.name}: not a JSON tokenizer config ({e})") from None
            if isinstance(data, dict) and data.pop("chat_template", None) is not None:
                config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return sorted(written)


def layout_digest(specs: Mapping[str, tuple[tuple[int, ...], Any]]) -> str:
    """A short hash of a checkpoint's layout (every key, shape and dtype, in key order), from the
    specs already read from its header: the same for a safetensors and a ``.bin`` copy of one
    model, and different as soon as a tensor is added, removed, reshaped or retyped."""
    h = hashlib.sha256()
    for key in sorted(specs):
        shape, dtype = specs[key]
        h.update(json.dumps([key, list(shape), str(dtype).removeprefix("torch.")]).encode())
    return h.hexdigest()[:16]


def model_card(*, method: str, inputs: Sequence[tuple[str, str]], options: Mapping[str, Any], version: str,
               recipe_text: str | None = None) -> str:
    """The ``README.md`` of a merged folder: method, inputs with layout hashes, options, tool version."""
    lines = ["---", "library_name: transformers", "tags:", "- merge", "- layerwise", "---", "",
             "# Merged model", "", f"Made with [layerwise](https://github.com/) {version}, method `{method}`.", "",
             "## Inputs", "", "| model | layout sha256 (16): keys, shapes, dtypes |", "|---|---|"]
    lines += [f"| `{name}` | `{digest}` |" for name, digest in inputs]
    if options:
        lines += ["", "## Options", "", "```json", json.dumps(dict(options), indent=2, sort_keys=True, default=str),
                  "```"]
    if recipe_text:
        lines += ["", "## Recipe", "", "```yaml", recipe_text.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def folder_finisher(*, inputs: Sequence[tuple[Path, Checkpoint]], source: Path | None, tokenizer_source: Path | None = None,
                    dtype: str | None, method: str, options: Mapping[str, Any],
                    layer_map: Sequence[int] | None = None, recipe_text: str | None = None,
                    vocab_size: int | None = None, chat_template: str | None = None) -> Callable[[Path], None]:
    """What completes a merged folder before it is published: model files from ``source`` (the
    tokenizer from ``tokenizer_source``, default ``source``), the card, and for a recipe its text in
    ``mergekit_config.yml`` as mergekit writes it (the hub's merge tooling reads that file)."""
    from . import __version__

    digests = [(str(p), layout_digest(c.specs)) for p, c in inputs]
    if source is not None:  # a config that cannot be read fails now, not after every weight is written
        _config(source, dtype, layer_map, vocab_size)

    def finish(folder: Path) -> None:
        write_model_files(folder, source, tokenizer_source or source, dtype=dtype, layer_map=layer_map,
                          vocab_size=vocab_size, chat_template=chat_template)
        if recipe_text:
            (folder / "mergekit_config.yml").write_text(recipe_text, encoding="utf-8")
        (folder / "README.md").write_text(model_card(method=method, inputs=digests, options=options,
                                                     version=__version__, recipe_text=recipe_text))
    return finish


def vocabulary(folder: Path | None, who: str) -> dict[str, int]:
    """The vocabulary (token → id, added tokens included) of a model folder's ``tokenizer.json``,
    as ``transformers``' fast tokenizers give it (``get_vocab()``)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise MissingExtraError("tokenizer_source needs the tokenizers package: pip install 'layerwise[hf]'") from None
    path = (folder or Path(who)) / "tokenizer.json"
    if folder is None or not path.is_file():
        raise OptionError(f"tokenizer_source: {who} has no tokenizer.json to compare vocabularies with; "
                          "drop tokenizer_source to copy the base model's tokenizer files as they are")
    try:
        return Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
    except Exception as e:  # the tokenizers library raises its own exception type
        raise CheckpointError(f"{path}: not a readable tokenizer ({e})") from None
