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
    from . import demo

    try:
        demo.run(args.out, seed=args.seed, epochs=args.epochs, device=args.device, console=console(quiet=args.quiet))
    except RuntimeError as e:
        if "demo verification failed" not in str(e):
            raise
        print(f"layerwise demo: {e}", file=sys.stderr)
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layerwise", description="Per-layer control of PyTorch training.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="walk through the techniques on a Siamese LSTM over the digits data")
    demo.add_argument("--out", default="layerwise-demo", help="report folder (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="seed of data, initialization and order (default: %(default)s)")
    demo.add_argument("--epochs", type=int, default=3, help="epochs of the main training run (default: %(default)s)")
    demo.add_argument("--device", default="cpu", help="cpu, or cuda where present (default: %(default)s)")
    demo.add_argument("--quiet", action="store_true", help="print nothing but errors")
    demo.set_defaults(run=_demo)
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
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"layerwise {args.command}: error: {message} (run with --debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
