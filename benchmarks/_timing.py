"""Timing helpers shared by the benchmark scripts: interleaved repeats, medians, a fixed model."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn


def encoder(layers: int = 12, d_model: int = 256, seed: int = 0) -> nn.TransformerEncoder:
    """The benchmarks' model: a 12-layer nn.TransformerEncoder, d=256 (about 9.5 M parameters)."""
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=4 * d_model, batch_first=True, dropout=0.0)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def compare(fns: dict[str, Callable[[], object]], repeats: int = 15, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each function, run interleaved (ABAB...) so drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.2f} ms"
