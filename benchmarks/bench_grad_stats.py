"""Claim: lw.grad_stats gives every layer's gradient statistics at close to the cost of one pass,
and a GradMonitor logging every step costs a small share of the step.

12-layer nn.TransformerEncoder (d=256, 9.5 M parameters, 144 gradient tensors) after a real
backward, one thread (the machine is shared; one thread keeps the ratios stable). Side by side,
interleaved, in each of 3 rounds, every call starting from the same caches: before each, untimed,
a read of twice the last-level cache (which also writes back what earlier calls left dirty),
then a read of the call's own input (the gradients, or their flat copy), as a backward has just
touched it; ``--cold`` leaves out that last read. Without this, order decides: a call after one
that read the same memory finds it in cache, one after a call that wrote 100 MB of temporaries
(the naive loop) pays for their write-back, each up to 2x:

* ``lw.grad_stats`` (five statistics of every tensor) ÷ one ``norm()`` over all gradients
  flattened (one pass over the memory: the limit), and ÷ the same five statistics over that
  flat buffer; a naive per-parameter loop with ``.item()`` for reference;
* ``lw.grad_stats(stats="norm")`` vs a Lightning-style loop (``grad_norm``: a norm per
  parameter, then ``.item()`` each as a logger does);
* a training step (forward + backward + AdamW) and the share of it taken by a ``GradMonitor``
  at every=1 (default stats, weight norms, update ratios, non-finite check), at every=1
  without an optimizer (no update ratio), and at every=50; and the floors of every=1: the
  memory it must move (gradients and weights read once; with the update ratio, the weights
  also copied, then read with their copy: the copy in huge pages, as the monitor keeps it).

Each lw call runs by default (``compile=None``: the native kernels where layerwise was installed
with them, as the first line printed says) and with ``compile=False`` (torch's kernels).
The monitors write to a sink that keeps nothing, so that every log step's rows are built, as
for any real sink. ``--compile`` adds ``compile=True`` beside each (``grad_stats``, the monitors),
the breakdown of every=1 by component (statistics, weight snapshot with its norms, ‖Δw‖, the
non-finite flag, rows and transfer; each from the same caches as grad_stats), and the compile time of
the kernel in a fresh process, with an empty inductor cache (cold) and with the one it filled (warm).
Last, the kernel table behind the engine's choices on this device.
Targets: lw ≤ 2× one flat norm; norm-only ≥ 1.2× faster than Lightning; every=1 ≤ 3% of a step.
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import tempfile

import torch

import layerwise as lw
from layerwise import _native, _pages

from _timing import compare, encoder, evicter, ms

torch.set_num_threads(1)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROUNDS = 3
COLD = "--cold" in sys.argv
COMPILE = "--compile" in sys.argv
EVICT = evicter()
KERNELS = ("native C, installed with layerwise" if _native.wanted(None) and DEVICE.type == "cpu"
           else "torch's (layerwise was installed without its native kernels)" if DEVICE.type == "cpu" else "torch's")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


class NoStep(torch.optim.Optimizer):
    """An optimizer whose step does nothing, so that timing its step times the monitor's hooks alone."""

    def __init__(self, params):
        super().__init__(params, {})

    def step(self, closure=None):
        return None


def naive(model) -> dict:
    return {name: {"norm": g.norm().item(), "mean": g.mean().item(), "std": g.std().item(),
                   "max_abs": g.abs().max().item(), "zero_frac": (g == 0).float().mean().item()}
            for name, g in ((n, p.grad) for n, p in model.named_parameters())}


def lightning_like(model) -> dict:
    # As lightning.pytorch.utilities.grads.grad_norm(model, norm_type=2), then .item() per value as a logger does.
    norms = {f"grad_2.0_norm/{n}": p.grad.data.norm(2) for n, p in model.named_parameters() if p.grad is not None}
    norms["grad_2.0_norm_total"] = torch.tensor(list(norms.values())).norm(2)
    return {k: v.item() for k, v in norms.items()}


def flat_limit(flat: torch.Tensor) -> dict:
    """The five statistics of one tensor, with one pass per primitive and one transfer."""
    lo, hi = torch.aminmax(flat)
    sumsq, total, max_abs, nonzero = torch.stack([
        torch.linalg.vector_norm(flat).double().square(), flat.sum().double(), torch.maximum(hi, -lo).double(),
        torch.count_nonzero(flat).double()]).tolist()
    n = flat.numel()
    return {"norm": math.sqrt(sumsq), "mean": total / n, "std": math.sqrt(max(sumsq - total * total / n, 0) / (n - 1)),
            "max_abs": max_abs, "zero_frac": 1 - nonzero / n}


def kernel_table(grads: list[torch.Tensor]) -> None:
    """Each primitive as one fused foreach call, as a per-tensor loop, and the whole sets, each from cold caches."""
    from layerwise import _grad_engine as engine
    from layerwise import _grad_kernels as kernels

    np = kernels._numpy()
    views = [g.view(-1) for g in grads]
    acc = torch.float32
    candidates = {  # name: (fused foreach, per-tensor torch loop, other per-tensor loop or None)
        "sum of squares": (lambda: torch._foreach_norm(grads, 2, dtype=acc),
                           lambda: [torch.linalg.vector_norm(g) for g in grads],
                           lambda: [torch.dot(v, v) for v in views]),  # BLAS dot
        "sum (signed)": (lambda: torch._foreach_norm(torch._foreach_clamp_min(grads, 0.0), 1),  # Σrelu: a copy
                         lambda: [g.sum() for g in grads], None),
        "max |x|": (lambda: torch._foreach_norm(grads, math.inf), lambda: [torch.aminmax(g) for g in grads],
                    None if np is None else lambda: [(a.max(), a.min()) for a in (g.numpy() for g in grads)]),
        "non-zeros": (lambda: torch._foreach_norm(grads, 0), lambda: [torch.count_nonzero(g) for g in grads],
                      None if np is None else lambda: [np.count_nonzero(g.numpy() != 0) for g in grads]),
    }
    flat = torch.cat([g.flatten() for g in grads])
    fns = {"flat": lambda: (flat.norm(), sync())}

    def warm(name: str) -> None:  # as in one_round
        EVICT()
        if not COLD:
            flat.norm() if name == "flat" else torch._foreach_norm(grads)
        sync()

    for name, variants in candidates.items():
        for label, fn in zip(("fused", "loop", "other"), variants):
            if fn is not None and (DEVICE.type == "cpu" or label != "other"):
                fns[f"{name} {label}"] = lambda f=fn: (f(), sync())
    need = engine.PRIMITIVES
    if DEVICE.type == "cpu":
        fns["in cache torch"] = lambda: kernels._in_cache_torch(grads, need, acc)
        fns["in cache lw"] = lambda: kernels._in_cache(grads, need, acc)
    fns["lw engine"] = lambda: (engine.local_primitives(grads, [None] * len(grads), need, None, False), sync())
    fns["lw default"] = lambda: (engine.local_primitives(grads, [None] * len(grads), need, None, None), sync())
    if COMPILE:
        fns["lw compiled"] = lambda: (engine.local_primitives(grads, [None] * len(grads), need, None, True), sync())
    t = compare(fns, repeats=7, warmup=1, between=warm)
    print(f"\nprimitive kernels on {DEVICE.type} ({len(grads)} tensors, {'cold' if COLD else 'warm'} caches), "
          "÷ one flat norm:")
    print(f"  {'':16}{'fused foreach':>14}{'per-tensor':>12}{'NumPy / BLAS':>14}")
    for name in candidates:
        cells = [f"{t[f'{name} {k}'] / t['flat']:.2f}" if f"{name} {k}" in t else "-" for k in ("fused", "loop", "other")]
        print(f"  {name:16}{cells[0]:>14}{cells[1]:>12}{cells[2]:>14}")
    best = sum(min(t[k] for k in t if k.startswith(name + " ")) for name in candidates)
    print(f"  all four, one pass each (best kernels)   {best / t['flat']:6.2f}")
    if DEVICE.type == "cpu":
        print(f"  all four per tensor in cache, torch      {t['in cache torch'] / t['flat']:6.2f}")
        print(f"  all four per tensor in cache, lw's path  {t['in cache lw'] / t['flat']:6.2f}   (dot; sum; NumPy max/min, count)")
    print(f"  the engine, compile=False (all four)     {t['lw engine'] / t['flat']:6.2f}")
    print(f"  the engine by default                    {t['lw default'] / t['flat']:6.2f}   ({KERNELS})")
    if COMPILE:
        kernel = "native C kernel, one call" if DEVICE.type == "cpu" else "torch.compile"
        print(f"  the same, compile=True                   {t['lw compiled'] / t['flat']:6.2f}   ({kernel})")


class NullSink:
    """A sink that keeps nothing: the monitor still builds every row, as it does for any sink."""

    def write(self, step, rows, histograms=None):
        pass

    def close(self):
        pass


def monitor_parts(monitor: lw.GradMonitor, params: list, compile: bool | None) -> dict:
    """Each component of one every=1 log step with an optimizer, run as the monitor runs it."""
    from layerwise import _grad_engine as engine

    grads, weights = [p.grad for p in params], [p.detach() for p in params]
    shards = [None] * len(params)
    snapshot = _pages.packed_like(weights)  # as the monitor lays it out
    prims = engine.local_primitives(grads, shards, monitor._needed, None, compile)
    record = monitor._done[-1]  # a log step already on the host: its rows, and its transfer again
    tensors = [t.to(DEVICE) for t in record.tensors()]
    return {
        "part_stats": lambda: (engine.local_primitives(grads, shards, monitor._needed, None, compile), sync()),
        "part_snapshot": lambda: (engine.copy_primitives(snapshot, weights, shards, None, compile), sync()),
        # The alternative on CPU (the default before this measurement): each piece copied, then measured in cache.
        "part_snapshot_pieces": lambda: (engine.copy_primitives(snapshot, weights, shards, False, False), sync()),
        "part_delta": lambda: (engine.distance_primitives(snapshot, weights, shards, None, compile), sync()),
        "part_flag": lambda: bool(torch.cat([b[-1] for b in prims.tensors()]).isfinite().all()),
        "part_rows": lambda: (engine.to_host(tensors), monitor._rows(record)),
    }


def one_round(model, x, flat) -> dict[str, float]:
    grads = [p.grad for p in model.parameters()]

    def same_caches(name: str) -> None:  # as after a backward: caches clean, the call's own input just read
        EVICT()
        if not COLD:
            flat.norm() if name in ("limit", "flat_norm") else torch._foreach_norm(grads)
        sync()

    fns = {
        "lw": lambda: (lw.grad_stats(model), sync()),
        "lw_eager": lambda: (lw.grad_stats(model, compile=False), sync()),
        "naive": lambda: naive(model),
        "lw_norm": lambda: (lw.grad_stats(model, stats="norm"), sync()),
        "lw_norm_eager": lambda: (lw.grad_stats(model, stats="norm", compile=False), sync()),
        "lightning": lambda: lightning_like(model),
        "limit": lambda: flat_limit(flat),
        "flat_norm": lambda: flat.norm().item(),
        "one_pass": lambda: (torch.stack(torch._foreach_norm(grads)).tolist(), sync()),
    }
    if COMPILE:
        fns["lw_compiled"] = lambda: (lw.grad_stats(model, compile=True), sync())
    t = compare(fns, repeats=9, between=same_caches)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)

    def train_step():
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()
        sync()

    # The memory every=1 must move, as flat kernels: the gradients read once, the weights copied,
    # then read beside their copy (for ‖Δw‖ after the step).
    weights = torch.cat([p.detach().flatten() for p in params])
    snapshot = _pages.empty(weights.numel(), weights.dtype, weights.device)  # in huge pages, as the monitor's

    def floor():
        flat.norm(), snapshot.copy_(weights), torch.dot(weights, snapshot)
        sync()

    sink = [NullSink()]
    variants = {"": None, "_eager": False, **({"_compiled": True} if COMPILE else {})}
    monitors, steps = [], {"step": train_step}
    for suffix, compiled in variants.items():
        no_step = NoStep(params)  # one per monitor: each times its own hooks
        monitors.append(lw.GradMonitor(model, every=1, optimizer=no_step, sinks=sink, compile=compiled))
        grads_only = lw.GradMonitor(model, every=1, sinks=sink, compile=compiled)
        norms_only = lw.GradMonitor(model, every=1, sinks=sink, compile=compiled, stats="norm")
        monitors += [grads_only, norms_only]
        steps[f"every_1{suffix}"] = lambda s=no_step: (s.step(), sync())
        steps[f"every_1_no_opt{suffix}"] = lambda m=grads_only: (m.step(), sync())
        steps[f"every_1_norm_no_opt{suffix}"] = lambda m=norms_only: (m.step(), sync())
    steps["every_1"]()
    monitors[0].flush()  # a log step on the host, for the breakdown's rows
    share = compare({**steps, "floor": floor, "floor_no_opt": lambda: (flat.norm(), weights.norm(), sync())},
                    repeats=7, warmup=1)
    if COMPILE:  # each component from the same caches: after an evicting read, the gradients just written
        default = monitor_parts(monitors[0], params, None)
        parts = {**monitor_parts(monitors[0], params, False),
                 **{f"{k}_default": default[k] for k in ("part_stats", "part_snapshot", "part_delta")}}
        share.update(compare(parts, repeats=7, warmup=1, between=lambda name: (EVICT(), torch._foreach_norm(grads))))
    for monitor in monitors:
        monitor.remove()
    no_step = NoStep(params)
    every_50 = lw.GradMonitor(model, every=50, optimizer=no_step, sinks=sink)
    share["every_50"] = compare({"x50": lambda: [no_step.step() for _ in range(50)]}, repeats=3, warmup=1)["x50"] / 50
    every_50.remove()
    model(x).square().mean().backward()  # train_step left fresh gradients; keep them for the next round
    return {**{k: v for k, v in t.items()}, **{f"share_{k}": v / share["step"] for k, v in share.items()},
            "step": share["step"]}


def one_large_gradient() -> list[dict[str, float]]:
    """Where compile=True pays: the four primitives of one 32000 x 1024 gradient (an embedding's, 131 MB),
    eager and compiled, ÷ its norm; 3 rounds, each call after an evicting read and a read of the gradient."""
    from layerwise import _grad_engine as engine

    grad = [torch.randn(32000, 1024, device=DEVICE)]

    def same_caches(name: str) -> None:
        EVICT()
        grad[0].norm()
        sync()

    fns = {"norm": lambda: (grad[0].norm(), sync()),
           "eager": lambda: (engine.local_primitives(grad, [None], engine.PRIMITIVES, None, False), sync()),
           "compiled": lambda: (engine.local_primitives(grad, [None], engine.PRIMITIVES, None, True), sync())}
    return [compare(fns, repeats=5, warmup=1, between=same_caches) for _ in range(ROUNDS)]


def compile_seconds() -> tuple[float, float]:
    """Seconds of the first compile=True call in a fresh process (after `import torch`): with an empty
    inductor cache, then with the cache that run filled (inductor's FX graph cache, on disk)."""
    code = ("import time, torch; start = time.perf_counter(); import layerwise as lw; "
            "net = torch.nn.Linear(1024, 512); net(torch.ones(1, 1024)).sum().backward(); "
            f"lw.grad_stats(net, compile=True); {'torch.cuda.synchronize(); ' if DEVICE.type == 'cuda' else ''}"
            "print(time.perf_counter() - start)")
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "LAYERWISE_CACHE_DIR": cache, "OMP_NUM_THREADS": "1"}
        return tuple(float(subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                                          text=True).stdout.split()[-1]) for _ in range(2))


def main() -> None:
    model = encoder().to(DEVICE)
    params = list(model.parameters())
    x = torch.randn(8, 64, 256, device=DEVICE)
    model(x).square().mean().backward()
    flat = torch.cat([p.grad.flatten() for p in params])
    rounds = [one_round(model, x, flat) for _ in range(ROUNDS)]

    def show(label: str, values: list[float], fmt: str = "{:6.2f}", note: str = "") -> None:
        med = statistics.median(values)
        print(f"{label:44}{fmt.format(med)}  ({fmt.format(min(values)).strip()}–{fmt.format(max(values)).strip()})"
              f"{note}")

    print(f"torch {torch.__version__}, {DEVICE.type}, {torch.get_num_threads()} thread(s); "
          f"{sum(p.numel() for p in params) / 1e6:.2f} M parameters in {len(params)} tensors; "
          f"median (range) of {ROUNDS} rounds")
    print(f"one flat.norm() {ms(statistics.median(r['flat_norm'] for r in rounds)).strip()}, "
          f"lw.grad_stats {ms(statistics.median(r['lw'] for r in rounds)).strip()}, "
          f"training step {ms(statistics.median(r['step'] for r in rounds)).strip()}")
    print(f"kernels by default (compile=None): {KERNELS}")
    show("lw.grad_stats, 5 stats ÷ one flat norm", [r["lw"] / r["flat_norm"] for r in rounds], note="   target <= 2")
    show("  compile=False (torch's kernels)", [r["lw_eager"] / r["flat_norm"] for r in rounds])
    show("  ÷ one pass over the 144 tensors (_foreach_norm)", [r["lw"] / r["one_pass"] for r in rounds])
    show("lw.grad_stats ÷ the 5 stats over the flat buffer", [r["lw"] / r["limit"] for r in rounds])
    show("naive per-parameter loop ÷ lw.grad_stats", [r["naive"] / r["lw"] for r in rounds])
    show("Lightning-style grad_norm ÷ lw (norm only)", [r["lightning"] / r["lw_norm"] for r in rounds],
         note="   target >= 1.2")
    show("  compile=False", [r["lightning"] / r["lw_norm_eager"] for r in rounds])
    show("lw norm only ÷ one flat norm", [r["lw_norm"] / r["flat_norm"] for r in rounds])
    show("  compile=False", [r["lw_norm_eager"] / r["flat_norm"] for r in rounds])
    # Both read every gradient once, so no norm can beat the Lightning loop by more than that loop's own
    # distance from one flat norm: the ceiling of the speed-up on this device.
    show("  Lightning-style ÷ one flat norm (the ceiling)", [r["lightning"] / r["flat_norm"] for r in rounds])
    for suffix, label in (("", ""), ("_eager", ", compile=False"), *((("_compiled", ", compile=True"),) if COMPILE else ())):
        show(f"GradMonitor every=1{label}, share of a step", [r[f"share_every_1{suffix}"] for r in rounds], "{:6.2%}",
             "   target <= 3%")
        show("  the same without optimizer (no Δw)", [r[f"share_every_1_no_opt{suffix}"] for r in rounds], "{:6.2%}",
             "   target <= 3%")
        show("  without optimizer, stats='norm'", [r[f"share_every_1_norm_no_opt{suffix}"] for r in rounds], "{:6.2%}",
             "   target <= 3%")
    show("  its floor (gradients and weights read once)", [r["share_floor_no_opt"] for r in rounds], "{:6.2%}")
    show("  its floor (memory moved, as flat kernels)", [r["share_floor"] for r in rounds], "{:6.2%}")
    show("  the 5 stats over one flat buffer", [r["limit"] / r["step"] for r in rounds], "{:6.2%}")
    show("GradMonitor every=50, share of a step", [r["share_every_50"] for r in rounds], "{:6.2%}")
    if COMPILE:
        print("GradMonitor every=1 with optimizer, by component (share of a step):")
        parts = {"part_stats": "statistics of the gradients (compile=False)", "part_stats_default": "  by default",
                 "part_snapshot": "weight snapshot: fused copy, fused norm (compile=False)",
                 "part_snapshot_pieces": "  the same, each piece measured in cache",
                 "part_snapshot_default": "  by default (native: copy and norm in one pass)",
                 "part_delta": "‖Δw‖ after the step (compile=False)", "part_delta_default": "  by default",
                 "part_flag": "non-finite flag (one host read)", "part_rows": "rows and transfer"}
        for key, label in parts.items():
            show(f"  {label}", [r[f"share_{key}"] for r in rounds], "{:6.2%}")
        show("lw.grad_stats(compile=True) ÷ one flat norm", [r["lw_compiled"] / r["flat_norm"] for r in rounds],
             note="   target <= 2")
        show("  ÷ lw.grad_stats (compile=False)", [r["lw_compiled"] / r["lw_eager"] for r in rounds])
        large = one_large_gradient()
        show("one 131 MB gradient, 4 primitives compile=False ÷ its norm", [r["eager"] / r["norm"] for r in large])
        show("  compile=True ÷ its norm", [r["compiled"] / r["norm"] for r in large], note="   target <= 2")
        cold, warm = compile_seconds()
        print(f"compile=True, first call in a fresh process: {cold:.1f} s with an empty kernel cache, "
              f"{warm:.1f} s with a warm one")
    kernel_table([p.grad for p in params])


if __name__ == "__main__":
    main()
