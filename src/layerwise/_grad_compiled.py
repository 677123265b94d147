"""The gradient engine's compiled kernels: every primitive of a tensor in ONE loop over its memory.

No library kernel computes several reductions in one pass, so the eager engine reads each
gradient once per primitive (on CPU, once from memory and again from cache). These kernels
read each once instead (``compile`` of ``grad_stats`` and ``GradMonitor``):

* on CPU, for float32, float64 and bfloat16, the native kernel of ``_native`` (a C loop, all
  tensors in one call): by default where it was built with the package, with ``compile=True``
  also built on first use;
* with ``compile=True``, on other devices and for other dtypes on CPU, ``torch.compile`` (inductor: Triton on GPUs,
  C++ on CPU), which fuses the sum of squares, the sum, the non-zero count and max |x| into one
  loop: a few seconds per dtype and device, less once inductor's on-disk cache holds the kernel
  (``benchmarks/bench_grad_stats.py --compile`` measures both).

One graph serves every size: the kernel is compiled with dynamic shapes for one 1-D tensor, so
it recompiles per dtype and device only (dynamo guards on nothing else). Each call costs 25-80 µs
of Python (dynamo's and inductor's wrappers), so only tensors of at least ``MIN_NUMEL`` elements
take it; smaller ones keep the eager kernels (and sizes 0 and 1, which dynamo specializes, never
reach the graph). There, norms alone, or any single primitive, are one pass already and stay
eager; so do complex gradients. The native kernel takes norms alone too: its one call over all
tensors reads them at 1.0-1.2x one flat norm, where torch's call per tensor takes 1.3-1.4x.

Results equal the eager engine's: non-zero counts and max |x| exactly. The graph's sums
accumulate in float32 (float64 for float64 gradients), as the eager kernels do, in another order
(inductor's cascades of 4096 vectors, BLAS dots); the native kernel adds its blocks in float64
(see ``_native``). They agree within 1e-5 of the sum of |x| (of x²) for float32 and 16-bit
gradients, 1e-13 for float64. Accumulating float32 in float64 in the graph would cost 2.6x the time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import _grad_kernels as kernels
from . import _native
from ._native import ORDER
from ._tensors import pick
from .errors import MissingExtraError

# Where a compiled call pays for its Python: measured on CPU (2 vCPUs, 1 thread; all four
# primitives ÷ a norm of the same tensors, 2026-12-06) eager 3.1x and compiled 3.3x at 2^17
# elements, 2.5x and 2.4x at 2^18, 2.7x and 1.9x at 2^22, 2.6x and 1.4x at 2^25 (a 128 MB gradient).
MIN_NUMEL = 1 << 18
# Elements per call, at most: the int32 count of non-zeros stays exact (2^30 < 2^31). A larger
# tensor is cut into equal pieces of 2^29 to 2^30 elements.
_PIECE = 1 << 30

_compiled: Callable[[Tensor], Tensor] | None = None
_ready: set[tuple[str, torch.dtype]] = set()  # (device type, dtype) that compiled in this process
_failed: dict[tuple[str, torch.dtype], str] = {}  # ... and those that could not, with the reason


def primitives(x: Tensor) -> Tensor:
    """(sum of squares, sum, non-zero count, max |x|) of a 1-D real tensor, float64: one loop once compiled."""
    a = x.to(torch.promote_types(x.dtype, torch.float32))  # 16-bit values widen in registers, not in memory
    # int32 counts: cheaper than int64 in the vector loop, exact below 2^31 elements (see _PIECE).
    return torch.stack([(a * a).sum().double(), a.sum().double(), (a != 0).sum(dtype=torch.int32).double(),
                        a.abs().amax().double()])


def _plain(v: Tensor) -> Tensor:
    """``v`` (1-D, contiguous) as a tensor on the same memory that is not a view: dynamo would guard a
    view on its base's size and recompile for each new relation between the two."""
    return v.new_empty(0).set_(v.untyped_storage(), v.storage_offset(), v.shape, (1,))


def _run(v: Tensor) -> Tensor:
    global _compiled
    key = (v.device.type, v.dtype)
    if key in _ready:
        return _compiled(v)
    if key in _failed:
        raise MissingExtraError(_failed[key])
    if _compiled is None:
        _compiled = torch.compile(primitives, dynamic=True)
    try:
        out = _compiled(v)
    except (RuntimeError, ImportError, OSError) as e:  # dynamo wraps what inductor raised in a RuntimeError
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        need = "a C++ compiler (g++ or clang, or set CXX)" if v.device.type == "cpu" else "Triton"
        _failed[key] = (f"compile=True could not compile the gradient kernel for {v.dtype} on {v.device.type}: "
                        f"torch.compile's inductor backend needs {need} there ({reason}). Install it, or pass "
                        "compile=False (the eager kernels give the same statistics).")
        raise MissingExtraError(_failed[key]) from e
    _ready.add(key)
    return out


def block(xs: list[Tensor], needed: tuple[str, ...], device: torch.device, foreach: bool | None,
          compile: bool | None = True) -> Tensor:
    """As :func:`layerwise._grad_kernels.block`, each tensor read once: on CPU (``_native.DTYPES``) all
    of them by the native kernel (with ``compile=None`` only where the package was built with it),
    and with ``compile=True`` elsewhere those of at least ``MIN_NUMEL`` elements by the compiled
    graph; the (primitives, tensors) float64 block is the same up to float32 rounding."""
    if device.type == "cpu" and xs[0].dtype in _native.DTYPES and _native.wanted(compile):  # one call: see _native
        if needed == ("sumsq",):  # a norm request: one stream, 1.0x one flat norm where eager takes 1.4x
            measured = _native.sumsq(xs)
            if measured is not None:
                return measured
        elif (measured := _native.primitives(xs)) is not None:
            return measured if needed == ORDER else measured[[ORDER.index(p) for p in needed]]
        return kernels.block(xs, needed, device, foreach)  # what the kernels do not take (see _native.takes)
    if compile is not True or len(needed) == 1 or xs[0].is_complex():
        return kernels.block(xs, needed, device, foreach)
    big = [i for i, x in enumerate(xs) if x.numel() >= MIN_NUMEL]
    if not big:
        return kernels.block(xs, needed, device, foreach)
    columns = []
    for i in big:
        v = xs[i].contiguous().view(-1)
        if v.numel() <= _PIECE:
            columns.append(_run(_plain(v)))
            continue
        parts = torch.stack([_run(_plain(p)) for p in v.tensor_split(-(-v.numel() // _PIECE))])
        columns.append(torch.cat([parts[:, :3].sum(0), parts[:, 3:].amax(0)]))  # pieces pool like tensors
    rows = [ORDER.index(p) for p in needed]
    measured = torch.stack(columns, 1)[rows]
    if len(big) == len(xs):
        return measured
    out = torch.empty(len(needed), len(xs), dtype=torch.float64, device=measured.device)
    small = [i for i, x in enumerate(xs) if x.numel() < MIN_NUMEL]
    out[:, small] = kernels.block(pick(xs, small), needed, device, foreach).to(out.device)
    out[:, big] = measured
    return out
