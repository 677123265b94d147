"""The ``layerwise`` command line: a thin layer over the library.

Exit status, chosen by the type of what went wrong: 0 on success; 2 on bad input
(a :class:`~layerwise.LayerwiseError`, or a file the system refused), with one line naming the
file and key; 1 when the demo's own verification fails or on an unexpected error (one line, and
"run with --debug for the traceback"); 130 on Ctrl-C. ``--help`` and ``--version`` never import
torch: commands import the library when they run.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from . import __version__
from .errors import LayerwiseError, VerificationError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["main"]


def console(**kwargs: Any):
    from ._term import console as make  # rich loads when a command prints, not for --help

    return make(**kwargs)


class _HelpFormatter(argparse.HelpFormatter):
    """Every option that has a default shows it in its help line."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.option_strings and "%(default)" not in text
                and action.default not in (None, False, argparse.SUPPRESS) and action.nargs != 0):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def _demo(args: argparse.Namespace) -> int:
    import layerwise_demo  # a package of its own, outside the library's import path

    try:
        layerwise_demo.run(args.out, seed=args.seed, epochs=args.epochs, device=args.device,
                           console=console(quiet=args.quiet))
    except VerificationError as e:
        print(f"layerwise demo: {e}", file=sys.stderr)
        return 1
    return 0


def _show(args: argparse.Namespace) -> int:
    from .checkpoint import describe_file

    console().print(describe_file(args.file, *args.selectors, key=args.key))
    return 0


def _merge(args: argparse.Namespace) -> int:
    if getattr(args, "config", None):
        return _merge_recipe(args)
    if not args.inputs:
        raise _usage("give the checkpoints to merge, or a recipe with --config")
    if getattr(args, "method", "linear") is None:
        raise _usage("give --method (or a recipe with --config)")
    from .checkpoint import merge_files

    options = {name: getattr(args, name) for name in ("density", "scale", "t", "seed")
               if getattr(args, name, None) is not None}
    for text in getattr(args, "option", None) or []:
        name, value = _option(text)
        if name in options:  # the later one silently won
            raise _usage(f"--option {text}: {name} is given twice (--{name} or an earlier --option); give it once")
        options[name] = value
    out = merge_files(args.inputs, args.output, getattr(args, "method", "linear"), weights=args.weights,
                      base=getattr(args, "base", None), dtype=args.dtype, select=args.select or None, key=args.key,
                      max_shard_size=args.max_shard_size, overwrite=args.force, progress=not args.quiet,
                      compute_dtype=getattr(args, "compute_dtype", None), copy_from=args.copy_from, **options)
    console(quiet=args.quiet).print(f"wrote {out}")
    return 0


def _merge_recipe(args: argparse.Namespace) -> int:
    given = [flag for flag, value in (("CHECKPOINT", args.inputs), ("--method", args.method), ("--base", args.base),
                                      ("--weights", args.weights), ("--option", args.option), ("--select", args.select))
             if value]
    if given:
        raise _usage(f"--config takes the models, method and options from the recipe; drop {', '.join(given)}")
    from ._recipe_run import DEFAULT_SHARD, run_recipe

    out = run_recipe(args.config, args.output, overwrite=args.force, max_shard_size=args.max_shard_size or DEFAULT_SHARD,
                     compute_dtype=args.compute_dtype, copy_from=args.copy_from, dtype=args.dtype,
                     progress=not args.quiet)
    console(quiet=args.quiet).print(f"wrote {out}")
    return 0


def _usage(message: str) -> Exception:
    from .errors import OptionError

    return OptionError(message)


def _option(text: str) -> tuple[str, object]:
    """``NAME=VALUE`` with VALUE read as JSON (numbers, true/false, lists), else kept as a string."""
    import json

    from .errors import OptionError

    name, sep, value = text.partition("=")
    if not sep or not name:
        raise OptionError(f"--option {text!r}: write NAME=VALUE, e.g. --option lambda=0.5 or --option 't=[0, 1]'")
    try:
        return name, json.loads(value)
    except (ValueError, RecursionError):  # not JSON, or brackets nested past the parser's depth: a string
        return name, value


def _diff(args: argparse.Namespace) -> int:
    from .checkpoint import diff_files

    result = diff_files(args.a, args.b, *args.selectors, key=args.key)
    console().print(result)
    return 0


def _output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=True, help="output: a .safetensors file, or a model folder (weights, config, tokenizer, card) that from_pretrained loads")
    p.add_argument("--copy-from", metavar="DIR", help="folder output: take config and tokenizer from this model "
                   "folder (default: the base model, else the first input)")
    p.add_argument("--dtype", help="cast floating tensors of the output: bf16, fp16, fp32")
    p.add_argument("--select", action="append", metavar="SELECTOR", help="merge only these keys; the rest come "
                   "from the base (or the first input); repeatable")
    p.add_argument("--max-shard-size", metavar="SIZE", help="largest shard of a folder output (default 5GB, as transformers)")
    p.add_argument("--key", help="the state dict inside nested .pt checkpoints, e.g. state_dict")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _epochs(text: str) -> int:
    try:
        epochs = int(text)
    except ValueError:
        epochs = 0
    if epochs < 1:
        raise argparse.ArgumentTypeError(f"{text}: a whole number of epochs, at least 1")
    return epochs


def _report_folder(text: str) -> str:
    if not text:  # Path("") is the current folder: the report would land among the user's files
        raise argparse.ArgumentTypeError("an empty path; give a folder name (created if missing)")
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: exists and is not a folder; give a folder name")
    return text


def _device(text: str) -> str:
    """cpu, or a CUDA device this machine has: checked while parsing, so the demo's usage line comes with it."""
    if text == "cpu":
        return text  # the default: --help and a cpu run never import torch here
    import torch

    try:
        kind = torch.device(text).type
    except (RuntimeError, ValueError):  # torch's message lists every device type it knows
        kind = None
    if kind != "cuda":
        raise argparse.ArgumentTypeError(f"{text}: the demo runs on cpu or cuda")
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no CUDA device is available here; use --device cpu")
    return text


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="layerwise", description="Per-layer control of PyTorch training.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    demo = sub.add_parser("demo", help="walk through the techniques on a Siamese LSTM over the digits data")
    demo.add_argument("--out", type=_report_folder, default="layerwise-demo", help="report folder (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="seed of data, initialization and order (default: %(default)s)")
    demo.add_argument("--epochs", type=_epochs, default=10, help="epochs of the main training run (default: %(default)s)")
    demo.add_argument("--device", type=_device, default="cpu", help="cpu, or cuda where present (default: %(default)s)")
    demo.add_argument("--quiet", action="store_true", help="print nothing but errors")
    demo.set_defaults(run=_demo)

    show = sub.add_parser("show", help="list a checkpoint's tensors: name, dtype, shape, numel, bytes, totals")
    show.add_argument("file", help="a .safetensors/.pt/.bin file or a Hugging Face folder")
    show.add_argument("selectors", nargs="*", default=[], metavar="SELECTOR", help="only these tensors (e.g. 'encoder.**' '!**.bias')")
    show.add_argument("--key", help="the state dict inside a nested .pt checkpoint")
    show.set_defaults(run=_show)

    average = sub.add_parser("average", help="average checkpoints tensor by tensor, in bounded memory")
    average.add_argument("inputs", nargs="+", metavar="CHECKPOINT")
    average.add_argument("--weights", type=float, nargs="+", metavar="W", help="one weight per input (normalized)")
    _output_options(average)
    average.set_defaults(run=_merge)

    from ._merge_methods import METHODS, describe_methods  # no torch: --help stays fast

    merge = sub.add_parser("merge", help="merge checkpoints: mergekit's methods (ties, dare, slerp, model_stock...)",
                           epilog="methods and their options (give them with --option NAME=VALUE):\n"
                           + describe_methods(), formatter_class=argparse.RawDescriptionHelpFormatter)
    merge.add_argument("inputs", nargs="*", metavar="CHECKPOINT")
    merge.add_argument("--config", metavar="RECIPE.yml", help="run a mergekit recipe (models, method, parameters, "
                       "slices) into the model folder -o DIR")
    merge.add_argument("--method", choices=list(METHODS), metavar="METHOD",
                       help="one of: " + ", ".join(METHODS))
    merge.add_argument("--base", help="the common ancestor (the task-vector methods need it)")
    merge.add_argument("--option", action="append", metavar="NAME=VALUE",
                       help="a method option, VALUE as JSON: lambda=0.5, 't=[0, 0.5, 1]', normalize=false; repeatable")
    merge.add_argument("--compute-dtype", help="precision of the arithmetic: fp32 (default), fp64")
    merge.add_argument("--weights", type=float, nargs="+", metavar="W", help="one weight per input")
    def takes(option: str) -> str:
        return ", ".join(m.name for m in METHODS.values() if any(o.name == option for o in m.options))

    merge.add_argument("--density", type=float, help=f"fraction of each task vector kept ({takes('density')})")
    merge.add_argument("--scale", type=float, help=f"lambda, the scale of the merged task vector ({takes('lambda')})")
    merge.add_argument("--t", type=float, help=f"see the methods below ({takes('t')})")
    merge.add_argument("--seed", type=int, help=f"seed of the random drop ({takes('seed')})")
    _output_options(merge)
    merge.set_defaults(run=_merge)

    diff = sub.add_parser("diff", help="compare two checkpoints: max |a-b|, relative L2, cosine per tensor")
    diff.add_argument("a")
    diff.add_argument("b")
    diff.add_argument("selectors", nargs="*", default=[], metavar="SELECTOR")
    diff.add_argument("--key", help="the state dict inside nested .pt checkpoints")
    diff.set_defaults(run=_diff)

    for command in sub.choices.values():  # global flags work after the command too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the full traceback of an error")
    return parser


def _exit_code(error: BaseException) -> int:
    if isinstance(error, VerificationError):
        return 1
    if isinstance(error, (LayerwiseError, OSError)):  # bad input, or a file the system refused
        return 2
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``) and return its exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"layerwise {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        code, message = _exit_code(e), " ".join(str(e).split()) or type(e).__name__
        if code == 1 and not isinstance(e, LayerwiseError):
            message = f"unexpected {type(e).__name__}: {message} (run with --debug for the traceback)"
        print(f"layerwise {args.command}: error: {message}", file=sys.stderr)
        return code

if __name__ == "__main__":
    sys.exit(main())
