"""The ``layerwise`` command line: a thin layer over the library.

Exit status 0 on success, 2 on bad input with one line naming the culprit (a traceback only
with ``--debug``), 1 when the demo's own verification fails.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._term import console
from .errors import LayerwiseError

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    import layerwise_demo  # a package of its own, outside the library's import path

    from .errors import VerificationError

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
    from .checkpoint import merge_files

    options = {name: getattr(args, name) for name in ("density", "scale", "t", "seed")
               if getattr(args, name, None) is not None}
    for text in getattr(args, "option", None) or []:
        name, value = _option(text)
        options[name] = value
    out = merge_files(args.inputs, args.output, getattr(args, "method", "linear"), weights=args.weights,
                      base=getattr(args, "base", None), dtype=args.dtype, select=args.select or None, key=args.key,
                      max_shard_size=args.max_shard_size, overwrite=args.force, progress=not args.quiet,
                      compute_dtype=getattr(args, "compute_dtype", None), **options)
    console(quiet=args.quiet).print(f"wrote {out}")
    return 0


def _option(text: str) -> tuple[str, object]:
    """``NAME=VALUE`` with VALUE read as JSON (numbers, true/false, lists), else kept as a string."""
    import json

    from .errors import OptionError

    name, sep, value = text.partition("=")
    if not sep or not name:
        raise OptionError(f"--option {text!r}: write NAME=VALUE, e.g. --option lambda=0.5 or --option 't=[0, 1]'")
    try:
        return name, json.loads(value)
    except ValueError:
        return name, value


def _diff(args: argparse.Namespace) -> int:
    from .checkpoint import diff_files

    result = diff_files(args.a, args.b, *args.selectors, key=args.key)
    console().print(result)
    return 0


def _output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=True, help="output .safetensors file (a folder with --max-shard-size)")
    p.add_argument("--dtype", help="cast floating tensors of the output: bf16, fp16, fp32")
    p.add_argument("--select", action="append", metavar="SELECTOR", help="merge only these keys; the rest come "
                   "from the base (or the first input); repeatable")
    p.add_argument("--max-shard-size", metavar="SIZE", help="write a Hugging Face sharded folder, e.g. 5GB")
    p.add_argument("--key", help="the state dict inside nested .pt checkpoints, e.g. state_dict")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layerwise", description="Per-layer control of PyTorch training.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="walk through the techniques on a Siamese LSTM over the digits data")
    demo.add_argument("--out", default="layerwise-demo", help="report folder (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="seed of data, initialization and order (default: %(default)s)")
    demo.add_argument("--epochs", type=int, default=10, help="epochs of the main training run (default: %(default)s)")
    demo.add_argument("--device", default="cpu", help="cpu, or cuda where present (default: %(default)s)")
    demo.add_argument("--quiet", action="store_true", help="print nothing but errors")
    demo.set_defaults(run=_demo)

    show = sub.add_parser("show", help="list a checkpoint's tensors: name, dtype, shape, numel, bytes, totals")
    show.add_argument("file", help="a .safetensors/.pt/.bin file or a Hugging Face folder")
    show.add_argument("selectors", nargs="*", metavar="SELECTOR", help="only these tensors (e.g. 'encoder.**' '!**.bias')")
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
    merge.add_argument("inputs", nargs="+", metavar="CHECKPOINT")
    merge.add_argument("--method", required=True, choices=list(METHODS), metavar="METHOD",
                       help="one of: " + ", ".join(METHODS))
    merge.add_argument("--base", help="the common ancestor (the task-vector methods need it)")
    merge.add_argument("--option", action="append", metavar="NAME=VALUE",
                       help="a method option, VALUE as JSON: lambda=0.5, 't=[0, 0.5, 1]', normalize=false; repeatable")
    merge.add_argument("--compute-dtype", help="precision of the arithmetic: fp32 (default), fp64")
    merge.add_argument("--weights", type=float, nargs="+", metavar="W", help="one weight per input")
    merge.add_argument("--density", type=float, help="ties/dare: fraction of each task vector kept")
    merge.add_argument("--scale", type=float, help="task_arithmetic/ties/dare: scale of the merged task vector")
    merge.add_argument("--t", type=float, help="slerp: interpolation position in [0, 1]")
    merge.add_argument("--seed", type=int, help="dare: seed of the random drop")
    _output_options(merge)
    merge.set_defaults(run=_merge)

    diff = sub.add_parser("diff", help="compare two checkpoints: max |a-b|, relative L2, cosine per tensor")
    diff.add_argument("a")
    diff.add_argument("b")
    diff.add_argument("selectors", nargs="*", metavar="SELECTOR")
    diff.add_argument("--key", help="the state dict inside nested .pt checkpoints")
    diff.set_defaults(run=_diff)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``) and return its exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if getattr(args, "epochs", 1) < 1:
        parser.error("--epochs must be at least 1")
    if getattr(args, "device", "cpu").startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error(f"--device {args.device}: no CUDA device is available here; use --device cpu")
    try:
        return args.run(args)
    except (LayerwiseError, ValueError, OSError) as e:
        if args.debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"layerwise {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
