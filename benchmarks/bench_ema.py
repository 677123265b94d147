"""Claim: lw.EMA.update runs near the speed of one pass over the weights, at the limit with flat storage.

12-layer nn.TransformerEncoder (d=256, 9.5 M parameters, 144 tensors). One EMA update with
``lw.EMA`` on the plain model and on a copy laid out by ``lw.flatten_parameters``, against
``torch.optim.swa_utils.AveragedModel`` with its default ``avg_fn`` and with
``multi_avg_fn=get_ema_multi_avg_fn(...)``, and the limit: one ``lerp_`` over a single flat
buffer of the same size (the memory traffic any EMA must do: read two copies, write one).
Every timed call starts as it would after a training step: caches evicted, then the live
weights it averages read (the optimizer just wrote them) and the model's modules walked (its
forward just ran through them); the averages come from memory. Without
that, each call inherits whatever its predecessor left in the cache (480 MB of L3 here holds
every copy), and the order of the calls decides the ratios.
By default (``compile=None``) lw averages with its native lerp where layerwise was installed with
its kernels (CPU), bit for bit torch's: torch's CPU ``lerp_`` computes both of its formulas for
every element, so a flat ``lerp_`` is not the memory limit; the same flat buffer through the
native kernel is ("native limit"), and the default's own limit. ``compile=False`` (torch's
``lerp_``) runs beside it, against torch's flat ``lerp_``. lw keeps its averages in one buffer per
dtype, in transparent huge pages on Linux (``layerwise/_pages.py``): fewer TLB misses, each a walk
of two page tables under a hypervisor. So the limit is also measured with its average in huge
pages (the live weights, torch's, stay in 4 KiB pages): the limit of lw's layout; and with both
in huge pages, as ``lw.flatten_parameters`` lays out the weights: the limit of flat storage.
Three rounds of interleaved repeats; each round's medians are printed, then the range.
Targets: lw >= 1.5x faster than AveragedModel(multi_avg_fn) in 3 of 3 rounds;
lw on flat storage <= 1.05x the limit.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import layerwise as lw
from layerwise import _native, _pages

from _timing import compare, encoder, evicter, ms


def main(rounds: int = 3) -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = encoder().to(device)
    numel = sum(p.numel() for p in model.parameters())
    decay = 0.999
    # By default (compile=None) the native lerp where layerwise was installed with its kernels; compile=False
    # keeps torch's lerp_. Both give the same bits. Where 144 separate shadows landed moved an update by up
    # to 30% here (their pages, not their layout): the same EMA is made twice, first right after the model
    # (as in a training script) and last, after the flat copy and the other EMAs ("lw late").
    ema = lw.EMA(model, decay=decay)
    flat_model = copy.deepcopy(model)
    lw.flatten_parameters(flat_model)
    ema_eager, ema_flat_eager = lw.EMA(model, decay=decay, compile=False), lw.EMA(flat_model, decay=decay,
                                                                                  compile=False)
    ema_flat, ema_late = lw.EMA(flat_model, decay=decay), lw.EMA(model, decay=decay)
    native = device == "cpu" and _native.lerps(None)
    swa_default = AveragedModel(model)
    swa_multi = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
    for averaged in (swa_default, swa_multi):
        averaged.update_parameters(model)  # the first call only copies
    flat_ema, flat_live = torch.zeros(numel, device=device), torch.randn(numel, device=device)
    # lw keeps its shadows in huge pages on CPU (see layerwise/_pages.py); the live weights are torch's.
    flat_ema_huge = _pages.empty(numel, torch.float32, device).zero_()
    flat_live_huge = _pages.empty(numel, torch.float32, device).copy_(flat_live)  # as flatten_parameters lays it
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed(fn):
        return lambda: (fn(), sync())

    evict = evicter()
    model_of = {"lw": model, "lw_late": model, "lw_flat": flat_model, "swa_multi": model, "swa_default": model, "check": flat_model,
                "lw_eager": model, "lw_flat_eager": flat_model}

    def after_a_step(name: str) -> None:  # the step wrote the live weights and ran through every module
        evict()
        if name == "both_huge_limit":
            flat_live_huge.sum()
        elif name in ("limit", "native_limit", "huge_limit"):
            flat_live.sum()
        else:
            torch._foreach_norm([p.detach() for _, p in model_of[name].named_parameters()])
        sync()

    fns = {"native_limit": timed(lambda: _native.lerp_([flat_ema], [flat_live], 1 - decay)),
           "huge_limit": timed(lambda: _native.lerp_([flat_ema_huge], [flat_live], 1 - decay)),
           "both_huge_limit": timed(lambda: _native.lerp_([flat_ema_huge], [flat_live_huge], 1 - decay))
           } if native else {}
    fns.update({
        "lw": timed(ema.update),
        "lw_late": timed(ema_late.update),
        "lw_flat": timed(ema_flat.update),
        "limit": timed(lambda: flat_ema.lerp_(flat_live, 1 - decay)),
        "lw_eager": timed(ema_eager.update),
        "lw_flat_eager": timed(ema_flat_eager.update),
        "swa_multi": timed(lambda: swa_multi.update_parameters(model)),
        "swa_default": timed(lambda: swa_default.update_parameters(model)),
        "check": ema_flat._check_unchanged,  # lw's fixed cost per update: is the model still the one tracked?
    })
    kernels = "native lerp, installed with layerwise" if native else "torch's lerp_"
    print(f"torch {torch.__version__} on {device}, {torch.get_num_threads()} threads; "
          f"{numel / 1e6:.2f} M parameters in {len(list(model.parameters()))} tensors; by default: {kernels}")
    results = []
    for r in range(rounds):
        t = compare(fns, repeats=30, warmup=3, between=after_a_step)
        t["own_limit"] = t["native_limit"] if native else t["limit"]  # the limit of the default's kernel
        t["huge"] = t["huge_limit"] if native else t["limit"]
        t["both_huge"] = t["both_huge_limit"] if native else t["limit"]
        results.append(t)
        traffic = 3 * 4 * numel
        print(f"round {r + 1}: limit {ms(t['own_limit'])} ({traffic / t['own_limit'] / 1e9:.1f} GB/s) | "
              f"lw {ms(t['lw'])} = {t['lw'] / t['own_limit']:.2f}x limit (late {ms(t['lw_late']).strip()}) | "
              f"lw flat {ms(t['lw_flat'])} = {t['lw_flat'] / t['own_limit']:.3f}x limit | "
              f"AveragedModel(multi) {ms(t['swa_multi'])}: lw {t['swa_multi'] / t['lw']:.2f}x faster | "
              f"AveragedModel() {ms(t['swa_default'])}: lw {t['swa_default'] / t['lw']:.1f}x faster")
        print(f"         compile=False: torch lerp_ limit {ms(t['limit'])} | lw {ms(t['lw_eager'])} = "
              f"{t['lw_eager'] / t['limit']:.2f}x its limit, AveragedModel(multi) {t['swa_multi'] / t['lw_eager']:.2f}x "
              f"slower | flat {ms(t['lw_flat_eager'])} = {t['lw_flat_eager'] / t['limit']:.3f}x its limit")

    def spread(f) -> str:
        values = sorted(f(t) for t in results)
        return f"median {values[len(values) // 2]:.3f} (range {values[0]:.3f}-{values[-1]:.3f})"

    faster = [t["swa_multi"] / t["lw"] for t in results]
    print(f"by default ({kernels}):")
    print(f"AveragedModel(multi) ÷ lw:    {spread(lambda t: t['swa_multi'] / t['lw'])}   target >= 1.5 in "
          f"{rounds} of {rounds}: {sum(f >= 1.5 for f in faster)} of {rounds}")
    late = [t["swa_multi"] / t["lw_late"] for t in results]
    print(f"  the same EMA made last:     {spread(lambda t: t['swa_multi'] / t['lw_late'])}   target >= 1.5 in "
          f"{rounds} of {rounds}: {sum(f >= 1.5 for f in late)} of {rounds}")
    print(f"lw ÷ limit:                   {spread(lambda t: t['lw'] / t['own_limit'])}")
    print(f"  the same EMA made last:     {spread(lambda t: t['lw_late'] / t['own_limit'])}")
    print(f"lw flat ÷ limit:              {spread(lambda t: t['lw_flat'] / t['own_limit'])}   target <= 1.05")
    print(f"the limit with the average in huge pages (lw's layout) ÷ limit: {spread(lambda t: t['huge'] / t['own_limit'])}")
    print(f"lw ÷ that limit:              {spread(lambda t: t['lw'] / t['huge'])}")
    print(f"the limit with both in huge pages (flat storage's layout) ÷ limit: "
          f"{spread(lambda t: t['both_huge'] / t['own_limit'])}")
    print(f"lw flat ÷ that limit:         {spread(lambda t: t['lw_flat'] / t['both_huge'])}   target <= 1.05")
    print(f"AveragedModel() ÷ lw:         {spread(lambda t: t['swa_default'] / t['lw'])}")
    print(f"lw's change check ÷ limit:    {spread(lambda t: t['check'] / t['own_limit'])}   "
          f"({ms(sorted(t['check'] for t in results)[len(results) // 2])} per update)")
    print("compile=False (torch's lerp_):")
    print(f"AveragedModel(multi) ÷ lw:    {spread(lambda t: t['swa_multi'] / t['lw_eager'])}")
    print(f"lw ÷ torch's flat lerp_:      {spread(lambda t: t['lw_eager'] / t['limit'])}")
    print(f"lw flat ÷ torch's flat lerp_: {spread(lambda t: t['lw_flat_eager'] / t['limit'])}")
    print(f"AveragedModel(multi) ÷ torch's flat lerp_: {spread(lambda t: t['swa_multi'] / t['limit'])}   "
          "(the most an EMA built on torch's lerp_ can gain)")
    if native:
        print(f"native limit ÷ torch lerp_:   {spread(lambda t: t['native_limit'] / t['limit'])}")
        # Every EMA moves the same bytes: about the most any can gain over AveragedModel(multi) here (the
        # 144 separate tensors sometimes stream a little faster than the one flat pair of the limit).
        print(f"AveragedModel(multi) ÷ native limit: {spread(lambda t: t['swa_multi'] / t['native_limit'])}   "
              "(about the most any EMA can gain over it here)")


if __name__ == "__main__":
    main()
