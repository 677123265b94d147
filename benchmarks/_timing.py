"""Timing helpers shared by the benchmark scripts: interleaved repeats, medians, a fixed model."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


def encoder(layers: int = 12, d_model: int = 256, seed: int = 0) -> nn.TransformerEncoder:
    """The benchmarks' model: a 12-layer nn.TransformerEncoder, d=256 (about 9.5 M parameters)."""
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=4 * d_model, batch_first=True, dropout=0.0)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def compare(fns: dict[str, Callable[[], object]], repeats: int = 15, warmup: int = 3,
            between: Callable[[str], object] | None = None) -> dict[str, float]:
    """Median seconds per call of each function, run interleaved (ABAB...) so drift hits all alike.

    ``between(name)`` runs untimed before every timed call of ``fns[name]``: e.g. an evicter (see
    :func:`evicter`) or a read of that call's inputs, so that each call starts from the same
    caches whatever ran before it."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if between is not None:
                between(name)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def evicter() -> Callable[[], object]:
    """A function that reads twice the last-level cache (capped at 1 GiB), so that what ran before
    leaves nothing in it; it takes (and ignores) the name of the call about to be timed."""
    size = 64 << 20
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        size = int(text[:-1]) << {"K": 10, "M": 20, "G": 30}[text[-1]] if text[-1] in "KMG" else int(text)
    except (OSError, ValueError, KeyError):
        pass
    junk = torch.ones(min(2 * size, 1 << 30) // 4)
    return lambda name=None: junk.sum()


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.2f} ms"
