"""Cost of gradient surgery in a training step: scale_grad hooks and per-layer clipping.

A 12-layer nn.TransformerEncoder (d_model=256, dim_feedforward=1024) trains with AdamW.
Each round times one step (forward, backward, optimizer step) of every variant in turn,
so a change in machine load hits all of them alike; ratios are medians over rounds of
the per-round ratios. Claims (issue 7):

* ``scale_grad`` on every parameter costs <= 1.01x the plain step. Its floor is one
  multiply of every gradient, which a hook cannot avoid (it may not modify the incoming
  gradient in place), measured alone and printed as the floor.
* ``clip_grad_norm(per="layer")`` costs <= 1.5x one global ``torch.nn.utils.clip_grad_norm_``,
  whose two passes over the gradients (a norm, a multiply) are the floor of any clipping.

    python benchmarks/bench_hooks.py [--rounds 9] [--batch 16] [--seq 64]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import layerwise as lw

from _timing import encoder


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()

    model, x = encoder(), torch.randn(args.batch, args.seq, 256)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    params = list(model.parameters())

    def step(clip: Callable[[], object] | None = None) -> None:
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        if clip is not None:
            clip()
        opt.step()

    def hooked_step() -> None:
        with lw.scale_grad(model, factor=0.5):
            step()

    variants = {
        "plain": step,
        "scale_grad": hooked_step,
        "clip per layer": lambda: step(lambda: lw.clip_grad_norm(model, 1.0, per="layer")),
        "clip global": lambda: step(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0)),
    }
    for fn in variants.values():  # warm up allocator and kernels
        fn()
    steps: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            steps[name].append(seconds(fn))

    # Clipping and the hook's multiply alone, on the gradients of the last backward.
    grads = [p.grad for p in params]
    alone = {
        "clip per layer": lambda: lw.clip_grad_norm(model, 1e6, per="layer"),
        "clip global": lambda: torch.nn.utils.clip_grad_norm_(params, 1e6),
        "multiply": lambda: [g * 0.5 for g in grads],
    }
    for fn in alone.values():
        fn()
    ops: dict[str, list[float]] = {name: [] for name in alone}
    for _ in range(10 * args.rounds):
        for name, fn in alone.items():
            ops[name].append(seconds(fn))

    plain = statistics.median(steps["plain"])
    numel = sum(p.numel() for p in params)
    print(f"12-layer TransformerEncoder, d=256, ff=1024: {len(params)} tensors, {numel / 1e6:.1f}M parameters; "
          f"batch {args.batch}x{args.seq}, AdamW, {torch.get_num_threads()} threads, {args.rounds} rounds")
    print(f"plain step                      {plain * 1e3:8.1f} ms")
    floor = 1 + statistics.median(ops["multiply"]) / plain
    print(f"scale_grad on every parameter   {median_ratio(steps, 'scale_grad', 'plain'):8.3f}x plain step"
          f"   (target <= 1.01; floor {floor:.3f}: one multiply of every gradient)")
    print(f"clip_grad_norm(per='layer')     {median_ratio(steps, 'clip per layer', 'plain'):8.3f}x plain step")
    print(f"torch clip_grad_norm_ (global)  {median_ratio(steps, 'clip global', 'plain'):8.3f}x plain step")
    layer, whole = statistics.median(ops["clip per layer"]), statistics.median(ops["clip global"])
    print(f"per-layer clip alone            {layer * 1e3:8.2f} ms = {median_ratio(ops, 'clip per layer', 'clip global'):.2f}x "
          f"global clip alone ({whole * 1e3:.2f} ms; target <= 1.5)")


if __name__ == "__main__":
    main()
