"""Claim: resolving selectors costs little beside the work it selects for, however many there are.

Model: ``nn.Sequential`` of 5000 ``Linear(1, 1)`` (10 000 parameters, 5001 modules).

1. ``lw.freeze`` with 200 selectors (module paths and parameter names) ÷ a hand-written freeze of
   the same parameters (the limit: ``requires_grad_(False)`` and ``grad = None`` on each, found by
   ``get_submodule``/``get_parameter``), and ÷ one ``named_parameters()`` walk, which any call
   taking selectors must make. Target: ≤ 0.3 s.
2. ``lw.select(model, "**.bias")`` ÷ the hand-written ``[p for n, p in named_parameters() if
   n.endswith(".bias")]`` (the limit: one walk, one string test per name). Target: ≤ 20 ms.
3. ``lw.select(model, "**." * 12 + "bias")``: twelve ``**`` in a row. Target: ≤ 50 ms.

Each is printed beside v0.1's selector engine (``git show daec905:src/layerwise/select.py``,
loaded as a module; its ``freeze`` resolved every selector twice, then all of them twice more).
v0.1 takes tens of seconds on case 1, so it runs 20 of the 200 selectors, once; its cost grows
linearly in the number of selectors. Times are medians of 3 interleaved rounds.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import layerwise as lw

from _timing import compare, ms

ROOT = Path(__file__).resolve().parents[1]


def v01_select():
    """v0.1's select.py, imported inside the layerwise package (it imports ._tensors and .errors)."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", "daec905:src/layerwise/select.py"],
                            capture_output=True, text=True, check=True).stdout
    spec = importlib.util.spec_from_loader("layerwise._select_v01", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "layerwise"
    sys.modules[spec.name] = module  # dataclasses look their module up
    exec(compile(source, "select_v01.py", "exec"), module.__dict__)
    return module


def v01_freeze(old, model: nn.Module, selectors: list[str]) -> None:
    """The selection work of v0.1's freeze: _check_found, then select and select_modules."""
    for s in selectors:
        if not old.select(model, s, missing_ok=True):
            old.select_modules(model, s)
    chosen = old.select(model, *selectors, missing_ok=True)
    old.select_modules(model, *selectors)
    for p in chosen.params():
        p.requires_grad_(False)
        p.grad = None


def hand_freeze(model: nn.Module, modules: list[str], params: list[str]) -> None:
    for path in modules:
        for p in model.get_submodule(path).parameters():
            p.requires_grad_(False)
            p.grad = None
    for name in params:
        p = model.get_parameter(name)
        p.requires_grad_(False)
        p.grad = None


def once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    torch.set_num_threads(1)
    model = nn.Sequential(*[nn.Linear(1, 1) for _ in range(5000)])
    modules = [str(i) for i in range(0, 5000, 50)]  # 100 module paths
    params = [f"{i}.bias" for i in range(25, 5000, 50)]  # and 100 parameter names
    selectors = modules + params
    old = v01_select()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread; {len(list(model.parameters()))} parameters, "
          f"{len(list(model.modules()))} modules")

    t = compare({"hand": lambda: hand_freeze(model, modules, params), "lw": lambda: lw.freeze(model, *selectors),
                 "walk": lambda: list(model.named_parameters())}, repeats=3, warmup=1)
    old20 = once(lambda: v01_freeze(old, model, modules[:10] + params[:10]))
    print(f"1. freeze, 200 selectors:  lw {ms(t['lw'])}  hand-written {ms(t['hand'])}  ratio {t['lw'] / t['hand']:6.2f}x"
          f"  ÷ one named_parameters() walk {t['lw'] / t['walk']:5.2f}x"
          f"  | v0.1 with 20 selectors {old20:7.2f} s (x10 for 200: ~{10 * old20:.0f} s)   target <= 0.3 s")

    def hand_bias():
        return [p for n, p in model.named_parameters() if n.endswith(".bias")]

    deep = "**." * 12 + "bias"
    t = compare({"hand": hand_bias, "lw": lambda: lw.select(model, "**.bias"),
                 "deep": lambda: lw.select(model, deep), "v0.1": lambda: old.select(model, "**.bias")},
                repeats=3, warmup=1)
    print(f"2. select '**.bias':        lw {ms(t['lw'])}  hand-written {ms(t['hand'])}  ratio {t['lw'] / t['hand']:6.2f}x"
          f"  | v0.1 {ms(t['v0.1'])}   target <= 20 ms")
    old_deep = once(lambda: old.select(model, deep))
    print(f"3. select '**.' * 12 + 'bias': lw {ms(t['deep'])}  ÷ '**.bias' {t['deep'] / t['lw']:5.2f}x"
          f"  ÷ hand-written {t['deep'] / t['hand']:5.2f}x  | v0.1 {old_deep:7.2f} s   target <= 50 ms")


if __name__ == "__main__":
    sys.exit(main())
