"""Start-up cost: ``import layerwise`` after torch, and ``layerwise --help`` (issue 12 item 6).

Each measurement is a fresh interpreter (imports are cached within one), run interleaved
(A B C A B C ...) for ``--repeats`` per round; medians per round. Claims:

* ``import layerwise`` after ``import torch`` ≤ 50 ms (timed inside the child, so interpreter
  start and torch are not counted). The baseline is loading every submodule, as ``import
  layerwise`` did before submodules loaded lazily; the limit is importing an empty module.
* ``layerwise --help`` (and every command's ``--help``) ≤ 0.6 s wall. The limit is the bare
  interpreter (``python -c pass``); the baseline is what help cost when it imported torch.

    python benchmarks/bench_startup.py [--rounds 3] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

IMPORT_AFTER_TORCH = ("import time, torch; t = time.perf_counter(); import layerwise; "
                      "print(time.perf_counter() - t)")
EMPTY_AFTER_TORCH = ("import time, torch, types, sys; t = time.perf_counter(); "
                     "sys.modules['empty'] = types.ModuleType('empty'); import empty; print(time.perf_counter() - t)")
EAGER_AFTER_TORCH = ("import time, torch; t = time.perf_counter(); import layerwise as lw; "
                     "[getattr(lw, n) for n in lw.__all__]; print(time.perf_counter() - t)")
EAGER = "every submodule (after torch): before"
BEFORE = "python -c 'import torch': help before"
HELP = "import sys; from layerwise.cli import main; sys.argv = ['layerwise', {args}]; main()"


def wall(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=False, capture_output=True)
    return time.perf_counter() - start


def inner(code: str) -> float:
    return float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    from layerwise.cli import _parser

    commands = list(_parser()._subparsers._group_actions[0].choices)
    probes = {
        "import layerwise (after torch)": lambda: inner(IMPORT_AFTER_TORCH),
        "empty import (after torch): limit": lambda: inner(EMPTY_AFTER_TORCH),
        EAGER: lambda: inner(EAGER_AFTER_TORCH),
        "layerwise --help": lambda: wall(HELP.format(args="'--help'")),
        **{f"layerwise {c} --help": (lambda c=c: wall(HELP.format(args=f"'{c}', '--help'"))) for c in commands},
        "python -c pass: limit": lambda: wall("pass"),
        BEFORE: lambda: wall("import torch"),
    }
    print(f"python {sys.version.split()[0]}, {args.rounds} rounds × {args.repeats} fresh interpreters each")
    for r in range(args.rounds):
        times: dict[str, list[float]] = {k: [] for k in probes}
        for _ in range(args.repeats):
            for name, probe in probes.items():
                times[name].append(probe())
        med = {k: statistics.median(v) for k, v in times.items()}
        slowest_help = max(v for k, v in med.items() if k.endswith("--help"))
        print(f"\nround {r + 1}")
        for name, t in med.items():
            print(f"  {name:42s} {t * 1e3:8.1f} ms")
        print(f"  import layerwise after torch: {med['import layerwise (after torch)'] * 1e3:.1f} ms (target ≤ 50 ms); "
              f"{med[EAGER] / med['import layerwise (after torch)']:.0f}× faster than loading every submodule (before); "
              f"the limit, an empty module, takes {med['empty import (after torch): limit'] * 1e3:.2f} ms")
        print(f"  slowest --help: {slowest_help:.3f} s (target ≤ 0.6 s); {slowest_help / med['python -c pass: limit']:.2f}× "
              f"the bare interpreter (limit); help importing torch would take ≥ "
              f"{med[BEFORE] / slowest_help:.1f}× as long")


if __name__ == "__main__":
    main()
