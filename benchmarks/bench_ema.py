"""Claim: lw.EMA.update() runs at the speed of one fused pass over the weights.

12-layer nn.TransformerEncoder (d=256, 9.5 M parameters, 144 tensors). One EMA update with
``lw.EMA`` vs ``torch.optim.swa_utils.AveragedModel`` with its default ``avg_fn`` and with
``multi_avg_fn=get_ema_multi_avg_fn(...)``, and the limit: one ``lerp_`` over a single flat
buffer of the same size (the memory traffic any EMA must do: read two copies, write one).
Targets: lw <= 1.2x the limit; lw >= 1.5x faster than AveragedModel(multi_avg_fn=...).
"""

from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import layerwise as lw

from _timing import compare, encoder, ms


def main() -> None:
    model = encoder()
    params = list(model.parameters())
    numel = sum(p.numel() for p in params)
    decay = 0.999

    ema = lw.EMA(model, decay=decay)
    swa_default = AveragedModel(model)
    swa_multi = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
    for averaged in (swa_default, swa_multi):
        averaged.update_parameters(model)  # the first call only copies
    flat_ema, flat_model = torch.zeros(numel), torch.randn(numel)

    t = compare({
        "limit": lambda: flat_ema.lerp_(flat_model, 1 - decay),
        "lw": ema.update,
        "swa_multi": lambda: swa_multi.update_parameters(model),
        "swa_default": lambda: swa_default.update_parameters(model),
    }, repeats=30, warmup=3)

    traffic = 3 * 4 * numel
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {numel / 1e6:.2f} M parameters in {len(params)} tensors")
    print(f"limit: flat lerp_            {ms(t['limit'])}  ({traffic / t['limit'] / 1e9:.1f} GB/s)")
    print(f"lw.EMA.update                {ms(t['lw'])}  {t['lw'] / t['limit']:5.2f}x the limit")
    print(f"AveragedModel(multi_avg_fn)  {ms(t['swa_multi'])}  lw is {t['swa_multi'] / t['lw']:5.2f}x faster")
    print(f"AveragedModel(default)       {ms(t['swa_default'])}  lw is {t['swa_default'] / t['lw']:5.2f}x faster")
    print("targets: lw <= 1.2x the limit; lw >= 1.5x faster than AveragedModel(multi_avg_fn)")


if __name__ == "__main__":
    main()
