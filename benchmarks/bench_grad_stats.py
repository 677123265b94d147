"""Claim: lw.grad_stats gives every layer's gradient statistics at close to the cost of one pass.

12-layer nn.TransformerEncoder (d=256, 9.5 M parameters, 144 gradient tensors) after a real
backward. The five statistics (norm, mean, std, max_abs, zero_frac) of every tensor with
``lw.grad_stats`` vs (a) a naive loop computing them per parameter with ``.item()``, (b) a
per-parameter norm loop as Lightning's ``grad_norm`` (the norm only, then ``.item()`` per value
as a logger does), and the limit: the same five statistics over one pre-flattened buffer of
all gradients (a single ``flat.norm()`` pass is printed for reference). Then the training step
(forward + backward + AdamW step) and a ``GradMonitor``'s share of it (default stats, weight
norms, update ratios, non-finite check) at every=1 and every=50. Last, the per-primitive
kernels behind lw's choice on this device: fused ``torch._foreach_*`` vs a per-tensor loop.
Targets: lw <= 2x the limit; GradMonitor at every=1 <= 1 % of a step.
"""

from __future__ import annotations

import math

import torch

import layerwise as lw

from _timing import compare, encoder, ms

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
    """Each primitive as one fused foreach call and as a loop of per-tensor kernels."""
    fused_sum = lambda: torch._foreach_norm(torch._foreach_clamp_min(grads, 0.0), 1)  # noqa: E731  (Σrelu; needs a copy)
    candidates = {
        "sum of squares": (lambda: torch._foreach_norm(grads, 2), lambda: [torch.linalg.vector_norm(g) for g in grads]),
        "sum (signed)": (fused_sum, lambda: [g.sum() for g in grads]),
        "max |x|": (lambda: torch._foreach_norm(grads, math.inf), lambda: [torch.aminmax(g) for g in grads]),
        "non-zeros": (lambda: torch._foreach_norm(grads, 0), lambda: [torch.count_nonzero(g) for g in grads]),
    }
    print(f"\nprimitive kernels on {DEVICE.type} ({len(grads)} tensors):  fused foreach   per-tensor loop")
    for name, (fused, loop) in candidates.items():
        t = compare({"fused": lambda f=fused: (f(), sync()), "loop": lambda f=loop: (f(), sync())}, repeats=15)
        print(f"  {name:16}{ms(t['fused'])}      {ms(t['loop'])}")
    print("  lw's default: the fused kernel, except for the signed sum (whose fused form copies every gradient)\n"
          "  and, on CPU, where foreach is itself a loop over per-tensor kernels, for max |x| and non-zeros")


def main() -> None:
    model = encoder().to(DEVICE)
    params = list(model.parameters())
    numel = sum(p.numel() for p in params)
    x = torch.randn(8, 64, 256, device=DEVICE)
    model(x).square().mean().backward()
    grads = [p.grad for p in params]
    flat = torch.cat([g.flatten() for g in grads])

    t = compare({
        "lw": lambda: lw.grad_stats(model),
        "naive": lambda: naive(model),
        "lw_norm": lambda: lw.grad_stats(model, stats="norm"),
        "lightning": lambda: lightning_like(model),
        "limit": lambda: flat_limit(flat),
        "flat_norm": lambda: flat.norm().item(),
    }, repeats=25)

    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)

    def train_step():
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()
        sync()

    no_step = NoStep(params)
    every_1 = lw.GradMonitor(model, every=1, optimizer=no_step)

    def fifty_steps_every_50():
        for _ in range(50):
            no_step.step()

    every_1_step = lambda: (no_step.step(), sync())  # noqa: E731
    share = compare({"step": train_step, "every_1": every_1_step}, repeats=10, warmup=2)
    every_1.remove()
    every_50 = lw.GradMonitor(model, every=50, optimizer=no_step)
    share["every_50"] = compare({"x50": fifty_steps_every_50}, repeats=5, warmup=1)["x50"] / 50
    every_50.remove()

    print(f"torch {torch.__version__}, {DEVICE.type}, {torch.get_num_threads()} threads; "
          f"{numel / 1e6:.2f} M parameters in {len(params)} tensors")
    print(f"limit: 5 stats over one flat buffer {ms(t['limit'])}   (one flat.norm(): {ms(t['flat_norm']).strip()})")
    print(f"lw.grad_stats, 5 stats             {ms(t['lw'])}   lw ÷ limit     {t['lw'] / t['limit']:5.2f}")
    print(f"naive per-parameter loop, .item()  {ms(t['naive'])}   lw ÷ naive     {t['lw'] / t['naive']:5.2f}")
    print(f"lw.grad_stats, norm only           {ms(t['lw_norm'])}")
    print(f"Lightning-style grad_norm          {ms(t['lightning'])}   lw ÷ Lightning {t['lw_norm'] / t['lightning']:5.2f}"
          "  (norm only, both)")
    step = share["step"]
    print(f"\ntraining step (fwd + bwd + AdamW)  {ms(step)}   (the flat limit of the 5 stats alone: "
          f"{t['limit'] / step:.2%} of it)")
    print(f"GradMonitor, every=1               {ms(share['every_1'])}   {share['every_1'] / step:6.2%} of a step")
    print(f"GradMonitor, every=50 (per step)   {ms(share['every_50'])}   {share['every_50'] / step:6.2%} of a step")
    kernel_table(grads)
    print("\ntargets: lw <= 2x the limit; GradMonitor at every=1 <= 1 % of a step")


if __name__ == "__main__":
    main()
