"""Claim: freezing with lw.freeze costs nothing at run time.

Step time (forward + backward + AdamW step) of a 12-layer nn.TransformerEncoder (d=256) with
the first k blocks frozen by ``lw.freeze`` ÷ the same with a hand-written freeze
(``requires_grad = False`` and an optimizer over the trainable parameters), for k = 0, 6
and 11. The hand-written freeze is also the limit: no freeze can skip more backward work.
Target: 1.00 ± 0.05.
"""

from __future__ import annotations

import torch

import layerwise as lw

from _timing import compare, encoder, ms


def step_fn(model, x):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)

    def step():
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()

    return step


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 64, 256)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; step = forward + backward + AdamW step")
    print(f"{'frozen blocks':>14} {'hand-written':>12} {'lw.freeze':>12} {'ratio':>7}  {'step vs none frozen':>20}")
    unfrozen = None
    for k in (0, 6, 11):
        hand, ours = encoder(), encoder()
        for p in hand.layers[:k].parameters():
            p.requires_grad = False
        if k:
            lw.freeze(ours, f"layers.[0-{k - 1}]")
        t = compare({"hand": step_fn(hand, x), "lw": step_fn(ours, x)}, repeats=12)
        unfrozen = unfrozen or t["hand"]
        print(f"{k:>14} {ms(t['hand'])} {ms(t['lw'])} {t['lw'] / t['hand']:7.3f}  {t['hand'] / unfrozen:19.2f}x")
    print("ratio = lw.freeze ÷ hand-written freeze (= the limit); target 1.00 ± 0.05")


if __name__ == "__main__":
    main()
