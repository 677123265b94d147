"""Native CPU kernels behind ``compile=True``: each reads every tensor once, all tensors in one call.

The kernels: the gradient engine's statistics (:func:`primitives`), the monitor's weight snapshot
(:func:`copy_sumsq`, copied and measured in one pass) and ‖Δw‖ (:func:`distance_sumsq`), and
``EMA``'s average (:func:`lerp_`, bit for bit torch's ``lerp_``, whose CPU kernel blends both of
its formulas for every element: on the benchmark model it takes 1.1x this loop's time from
memory, 1.7x in cache).

Why not inductor: it fuses the four reductions into one loop too, but keeps one accumulator per
statistic, so its loop waits on the latency of each add and NaN-propagating max: measured on the
benchmark model (2 vCPUs, 1 thread) its kernel runs at 2.5-3x one flat norm, within 15% of the
eager engine, where this loop (32 independent lanes per statistic, which the C compiler
vectorizes) runs at the speed of memory, 27 µs per MB in cache against 16 for a BLAS dot.

Its ~70 lines of C are compiled once per machine by the system's C compiler (``$CC``, else
``cc``/``gcc``/``clang``) in about half a second, with the vector instructions torch itself
dispatches to on this CPU, into ``$LAYERWISE_CACHE_DIR`` (default ``~/.cache/layerwise``); the
file's name hashes the source, compiler, flags, OS, architecture and ISA, it is published by one
atomic rename, and a cached file that does not load is built again. It is called through
``ctypes`` with all tensors' pointers at once; with ``torch.get_num_threads() > 1`` and enough
elements, one call per thread over equal shares (ctypes releases the GIL), pieces of one tensor
pooled after: 1.8x faster on 2 threads.

Exactness: non-zero counts and max |x| are exact. Sums add 32 float lanes over blocks of 4096
elements, then the blocks in float64 (float64 lanes for float64), which is more accurate than
the float32 cascades of the eager kernels; a float32 sum those overflow to inf (a gradient of
about 1e19 and more) may stay finite here. max |x| is NaN exactly where the sum of squares is,
i.e. where a NaN is (x² of a finite or infinite value is never NaN).
"""

from __future__ import annotations

import array
import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from ._tensors import laid_out_alike
from .errors import GradError, MissingExtraError

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#define LANES 32
#define BLOCK 4096
#define KERNEL(NAME, T, ACC, LOAD, ABS)                                                       \
void NAME(int64_t count, const void* const* ptrs, const int64_t* sizes, double* out) {     \
  for (int64_t t = 0; t < count; ++t) {                                                      \
    const T* restrict p = (const T*)ptrs[t];                                                 \
    int64_t n = sizes[t], i = 0;                                                             \
    double sumsq = 0, sum = 0, nonzero = 0;                                                  \
    ACC top[LANES] = {0};                                                                    \
    while (i + LANES <= n) {                                                                 \
      int64_t end = i + BLOCK <= n ? i + BLOCK : n - (n - i) % LANES;                        \
      ACC sq[LANES] = {0}, s[LANES] = {0}, nz[LANES] = {0};                                  \
      for (; i < end; i += LANES)                                                            \
        for (int l = 0; l < LANES; ++l) {                                                    \
          ACC v = LOAD(p[i + l]), a = ABS(v);                                                \
          sq[l] += v * v; s[l] += v; nz[l] += v != 0; top[l] = top[l] < a ? a : top[l];      \
        }                                                                                    \
      for (int l = 0; l < LANES; ++l) { sumsq += sq[l]; sum += s[l]; nonzero += nz[l]; }     \
    }                                                                                        \
    ACC m = 0;                                                                               \
    for (int l = 0; l < LANES; ++l) m = m < top[l] ? top[l] : m;                             \
    for (; i < n; ++i) {                                                                     \
      ACC v = LOAD(p[i]), a = ABS(v);                                                        \
      sumsq += (double)v * v; sum += v; nonzero += v != 0; m = m < a ? a : m;                \
    }                                                                                        \
    out[4 * t] = sumsq; out[4 * t + 1] = sum; out[4 * t + 2] = nonzero;                      \
    out[4 * t + 3] = isnan(sumsq) ? NAN : m;                                                 \
  }                                                                                          \
}
/* Σx² alone (a norm request): the statistics kernel's sum of squares, its only load a stream. */
#define SUMSQ(NAME, T, ACC, LOAD)                                                            \
void NAME(int64_t count, const void* const* ptrs, const int64_t* sizes, double* out) {     \
  for (int64_t t = 0; t < count; ++t) {                                                      \
    const T* restrict p = (const T*)ptrs[t];                                                 \
    int64_t n = sizes[t], i = 0;                                                             \
    double total = 0;                                                                        \
    while (i + LANES <= n) {                                                                 \
      int64_t end = i + BLOCK <= n ? i + BLOCK : n - (n - i) % LANES;                        \
      ACC sq[LANES] = {0};                                                                   \
      for (; i < end; i += LANES)                                                            \
        for (int l = 0; l < LANES; ++l) { ACC v = LOAD(p[i + l]); sq[l] += v * v; }          \
      for (int l = 0; l < LANES; ++l) total += sq[l];                                        \
    }                                                                                        \
    for (; i < n; ++i) { ACC v = LOAD(p[i]); total += (double)v * v; }                       \
    out[t] = total;                                                                          \
  }                                                                                          \
}
/* Per pair of tensors a, b: Σb² while copying b into a (copy_), or Σ(b - a)² (distance_); STEP(k)
   does element k and gives the value to square. */
#define PAIRWISE(NAME, T, ACC, A, STEP)                                                      \
void NAME(int64_t count, void* const* ptrs_a, const void* const* ptrs_b, const int64_t* sizes, \
          double* out) {                                                                     \
  for (int64_t t = 0; t < count; ++t) {                                                      \
    A* restrict a = (A*)ptrs_a[t];                                                           \
    const T* restrict b = (const T*)ptrs_b[t];                                               \
    int64_t n = sizes[t], i = 0;                                                             \
    double total = 0;                                                                        \
    while (i + LANES <= n) {                                                                 \
      int64_t end = i + BLOCK <= n ? i + BLOCK : n - (n - i) % LANES;                        \
      ACC sq[LANES] = {0};                                                                   \
      for (; i < end; i += LANES)                                                            \
        for (int l = 0; l < LANES; ++l) { ACC v = STEP(i + l); sq[l] += v * v; }             \
      for (int l = 0; l < LANES; ++l) total += sq[l];                                        \
    }                                                                                        \
    for (; i < n; ++i) { ACC v = STEP(i); total += (double)v * v; }                          \
    out[t] = total;                                                                          \
  }                                                                                          \
}
static inline float bf16(uint16_t h) { union { uint32_t u; float f; } x = { (uint32_t)h << 16 }; return x.f; }
#define SAME(x) (x)
/* STEP(k) is a comma expression: the copy stores element k of b into a, then yields it. */
#define COPY_F(k) (a[k] = b[k], b[k])
#define COPY_BF(k) (a[k] = b[k], bf16(b[k]))
#define DIFF_F(k) (b[k] - a[k])
#define DIFF_BF(k) (bf16(b[k]) - bf16(a[k]))
/* torch's lerp_ bit for bit: fma(w, b - a, a) for |w| < 0.5, else fma(w - 1, b - a, b), as its vector kernel. */
#define LERP(NAME, T, FMA)                                                                   \
void NAME(int64_t count, void* const* ptrs_a, const void* const* ptrs_b, const int64_t* sizes, \
          double weight) {                                                                   \
  T w = (T)weight; /* torch converts the weight to the tensors' type, then picks the formula */ \
  int small = fabs((double)w) < 0.5;                                                         \
  T coeff = small ? w : w - (T)1;                                                            \
  for (int64_t t = 0; t < count; ++t) {                                                      \
    T* restrict a = (T*)ptrs_a[t];                                                           \
    const T* restrict b = (const T*)ptrs_b[t];                                               \
    int64_t n = sizes[t];                                                                    \
    if (small) for (int64_t i = 0; i < n; ++i) a[i] = FMA(coeff, b[i] - a[i], a[i]);         \
    else for (int64_t i = 0; i < n; ++i) a[i] = FMA(coeff, b[i] - a[i], b[i]);               \
  }                                                                                          \
}
KERNEL(primitives_float32, float, float, SAME, fabsf)
KERNEL(primitives_float64, double, double, SAME, fabs)
KERNEL(primitives_bfloat16, uint16_t, float, bf16, fabsf)
SUMSQ(sumsq_float32, float, float, SAME)
SUMSQ(sumsq_float64, double, double, SAME)
SUMSQ(sumsq_bfloat16, uint16_t, float, bf16)
PAIRWISE(copy_float32, float, float, float, COPY_F)
PAIRWISE(copy_float64, double, double, double, COPY_F)
PAIRWISE(copy_bfloat16, uint16_t, float, uint16_t, COPY_BF)
PAIRWISE(distance_float32, float, float, const float, DIFF_F)
PAIRWISE(distance_float64, double, double, const double, DIFF_F)
PAIRWISE(distance_bfloat16, uint16_t, float, const uint16_t, DIFF_BF)
LERP(lerp_float32, float, fmaf)
LERP(lerp_float64, double, fma)
"""
# The rows of the kernel's output, in the engine's canonical order (_grad_engine.PRIMITIVES).
ORDER = ("sumsq", "sum", "nonzero", "max_abs")
DTYPES = (torch.float32, torch.float64, torch.bfloat16)
LERP_DTYPES = (torch.float32, torch.float64)  # torch rounds a bfloat16 lerp from float: not replayed here
# torch's vector lerp fuses its multiply-add (as this loop does) only in its AVX2 and AVX-512 kernels.
LERP_CAPABILITIES = ("AVX2", "AVX512")
# Vector instructions by the capability torch dispatches to (its own kernels' choice on this CPU).
_ISA = {"AVX512": ["-mavx2", "-mfma", "-mavx512f", "-mprefer-vector-width=512"], "AVX2": ["-mavx2", "-mfma"]}

_COMPILE_SECONDS = 300
_library: ctypes.CDLL | None = None
_failed: str | None = None


def _build(rebuild: bool = False) -> Path:
    """The kernel's shared library, compiled into the cache on first use (or again when ``rebuild``)."""
    compiler = shlex.split(os.environ.get("CC", "")) or [next(filter(shutil.which, ("cc", "gcc", "clang")), "cc")]
    if shutil.which(compiler[0]) is None:
        raise OSError(f"no C compiler found ({'CC=' + os.environ['CC'] if os.environ.get('CC') else 'cc, gcc, clang'})")
    capability = torch.backends.cpu.get_cpu_capability()
    flags = ["-O3", "-shared", "-fPIC", "-std=c99"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags += _ISA.get(capability, [])
    # One file per source, compiler, flags, OS, architecture and vector ISA: a cache shared by
    # several machines (an NFS home) holds one for each.
    key = "\0".join([_SOURCE, *compiler, *flags, sys.platform, platform.machine(), capability])
    cache = Path(os.environ.get("LAYERWISE_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or
                                                               Path.home() / ".cache") / "layerwise")
    target = cache / f"grad-primitives-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    if target.exists() and not rebuild:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as work:
        source, built = Path(work) / "primitives.c", Path(work) / target.name
        source.write_text(_SOURCE)
        try:
            done = subprocess.run([*compiler, *flags, str(source), "-o", str(built)], capture_output=True, text=True,
                                  timeout=_COMPILE_SECONDS)
        except subprocess.TimeoutExpired:
            raise OSError(f"{' '.join(compiler)} ran over {_COMPILE_SECONDS} s") from None
        if done.returncode != 0:
            raise OSError(f"{' '.join(compiler)} failed (exit {done.returncode}): "
                          f"{(done.stderr or done.stdout).strip()[:300] or 'no message'}")
        os.replace(built, target)  # atomic: a concurrent process finds the whole file or none
    return target


def _load() -> ctypes.CDLL:
    global _library, _failed
    if _library is not None:
        return _library
    if _failed is not None:
        raise MissingExtraError(_failed)
    try:
        path = _build()
        try:
            library = ctypes.CDLL(str(path))
        except OSError:  # a cached file this process cannot load (another machine's, cut short): built again
            library = ctypes.CDLL(str(_build(rebuild=True)))
    except OSError as e:
        _failed = (f"compile=True could not build its native CPU kernels: {e}. Install a C compiler "
                   "(gcc or clang, or set CC; LAYERWISE_CACHE_DIR names a writable folder for it), or pass "
                   "compile=False (the eager kernels give the same results).")
        raise MissingExtraError(_failed) from e
    for dtype in DTYPES:
        for name, pointers in (("primitives", 1), ("sumsq", 1), ("copy", 2), ("distance", 2)):
            getattr(library, f"{name}_{str(dtype)[6:]}").argtypes = [ctypes.c_int64, *[ctypes.c_void_p] * (pointers + 2)]
    for dtype in LERP_DTYPES:
        getattr(library, f"lerp_{str(dtype)[6:]}").argtypes = [ctypes.c_int64, *[ctypes.c_void_p] * 3, ctypes.c_double]
    _library = library
    return library


def primitives(xs: list[Tensor]) -> Tensor:
    """(sum of squares, sum, non-zero count, max |x|) of each CPU tensor of one dtype in ``DTYPES``,
    as a (4, len(xs)) float64 tensor: one pass over each tensor's memory, one call for all, or with
    ``torch.get_num_threads() > 1`` one call per thread over equal shares of the elements."""
    if not all(map(Tensor.is_contiguous, xs)):
        xs = [x.contiguous() for x in xs]
    return _launch("primitives", [xs], 4)


def sumsq(xs: list[Tensor]) -> Tensor:
    """Σx² of each CPU tensor of one dtype in ``DTYPES``, as a (len(xs),) float64 tensor: the sum of
    squares of :func:`primitives`, its other three statistics left out (one stream, like a BLAS dot)."""
    if not all(map(Tensor.is_contiguous, xs)):
        xs = [x.contiguous() for x in xs]
    return _launch("sumsq", [xs], 1)[0]


def copy_sumsq(dst: list[Tensor], src: list[Tensor]) -> Tensor:
    """Copy each ``src`` into ``dst`` (contiguous CPU tensors of one dtype in ``DTYPES``, each pair laid
    out alike, not overlapping) and return Σx² of each as a (len(src),) float64 tensor, in one pass."""
    return _launch("copy", _pairs(dst, src, DTYPES), 1)[0]


def distance_sumsq(before: list[Tensor], after: list[Tensor]) -> Tensor:
    """Σ(after - before)² of each pair (contiguous CPU tensors of one dtype in ``DTYPES``, each pair
    laid out alike), as a (len(after),) float64 tensor, in one pass; nothing is written."""
    return _launch("distance", _pairs(before, after, DTYPES), 1)[0]


def lerp_(shadows: list[Tensor], live: list[Tensor], weight: float) -> None:
    """``torch._foreach_lerp_(shadows, live, weight)``, bit for bit, in one pass (contiguous CPU pairs of
    one dtype in ``LERP_DTYPES``, each pair laid out alike, not overlapping)."""
    lerp_plan(shadows, live)(weight)


def fits(a: Tensor, b: Tensor, dtypes: tuple[torch.dtype, ...]) -> bool:
    """Whether a pairwise kernel may take ``a`` and ``b``: CPU tensors of one of ``dtypes``, laid out
    alike and contiguous, which its C loop reads and writes as one flat layout without checking."""
    return a.device.type == "cpu" and a.dtype in dtypes and laid_out_alike(a, b) and a.is_contiguous()


def _pairs(a: list[Tensor], b: list[Tensor], dtypes: tuple[torch.dtype, ...]) -> list[list[Tensor]]:
    """``[a, b]``, once every pair :func:`fits` and all share one dtype (the kernel is chosen by it)."""
    dtype = b[0].dtype
    for x, y in zip(a, b, strict=True):
        if not (fits(x, y, dtypes) and y.dtype == dtype):
            raise GradError(f"native kernels take contiguous CPU pairs of one dtype laid out alike, not "
                            f"{tuple(x.shape)} {x.dtype} {x.device} and {tuple(y.shape)} {y.dtype} {y.device}")
    return [a, b]


def _launch(name: str, tensors: list[list[Tensor]], columns: int, *scalars: float) -> Tensor:
    """Run kernel ``name`` over lists of tensors (the kernel's pointer arguments, tensor i of each
    list alike) and ``scalars``, as ``(columns, tensors)`` float64: sums pooled, a 4th column
    (max |x|) maxed; with no columns the kernel only writes its first tensors."""
    kernel = getattr(_load(), f"{name}_{str(tensors[0][0].dtype)[6:]}")
    runs, owners = _runs(tensors)
    out = torch.empty(len(owners), columns, dtype=torch.float64)
    _run(kernel, runs, out, scalars)
    if len(owners) == len(tensors[0]):
        return out.T
    where = torch.tensor(owners)
    pooled = out.new_zeros(len(tensors[0]), columns).index_add_(0, where, out)
    if columns == 4:
        pooled[:, 3] = out.new_zeros(len(tensors[0])).scatter_reduce_(0, where, out[:, 3], "amax")
    return pooled.T


def lerp_plan(shadows: list[Tensor], live: list[Tensor]) -> Callable[[float], None]:
    """:func:`lerp_` for tensors that stay where they are (``EMA`` checks that before every update),
    checked and laid out once: each call is one kernel call per thread, with no Python per tensor."""
    kernel = getattr(_load(), f"lerp_{str(live[0].dtype)[6:]}")
    runs, owners = _runs(_pairs(shadows, live, LERP_DTYPES))
    none = torch.empty(len(owners), 0)
    # Aliases of their own hold the memory the pointers name, whatever is later done to the tensors.
    keep = [t.detach() for t in (*shadows, *live)]
    return lambda weight, _keep=keep: _run(kernel, runs, none, (weight,))


def _runs(tensors: list[list[Tensor]]) -> tuple[list[list[array.array]], list[int]]:
    """The kernel calls over ``tensors``: one, or with ``torch.get_num_threads() > 1`` and enough
    elements one per thread over equal shares (pieces of a tensor pooled by owner afterwards),
    each as (pointer arrays..., sizes); and each piece's owner, in call order."""
    sizes = list(map(Tensor.numel, tensors[0]))
    threads = min(torch.get_num_threads(), sum(sizes) // _PER_THREAD)
    if threads <= 1:
        return [[array.array("q", map(Tensor.data_ptr, ts)) for ts in tensors] + [array.array("q", sizes)]], \
            list(range(len(sizes)))
    # Runs of equal shares of all elements in order: a tensor across a share's boundary is cut near it.
    share, width = -(-sum(sizes) // threads), tensors[0][0].element_size()
    columns: list[list[list[int]]] = [[[] for _ in range(len(tensors) + 1)] for _ in range(threads)]
    owners, done = [], 0
    for i, n in enumerate(sizes):
        start = 0
        while True:
            run = min(done // share, threads - 1)
            # Cut at a multiple of the kernels' block (4096) from the tensor's start: the sums of each
            # block then add as on one thread, and a run exceeds its share by less than a block.
            left = (run + 1) * share - done
            length = n - start if run == threads - 1 else min(n - start, max(4096, left // 4096 * 4096))
            for column, ts in zip(columns[run], tensors):
                column.append(ts[i].data_ptr() + start * width)
            columns[run][-1].append(length)
            owners.append(i)
            start, done = start + length, done + length
            if start >= n:
                break
    return [[array.array("q", column) for column in run] for run in columns if run[-1]], owners


def _run(kernel, runs: list[list[array.array]], out: Tensor, scalars: tuple[float, ...]) -> None:
    """Each run's kernel call, its rows of ``out`` next (a thread each when several: ctypes releases the GIL)."""
    calls, row = [], 0
    for arrays in runs:
        count = len(arrays[-1])
        tail = (out[row:row + count].data_ptr(),) if out.shape[1] else ()
        calls.append((count, *(a.buffer_info()[0] for a in arrays), *tail, *scalars))
        row += count
    if len(calls) == 1:
        kernel(*calls[0])
    else:
        list(_pool(len(calls)).map(lambda call: kernel(*call), calls))


# Elements per thread, at least: below it a thread's start costs more than its share of the pass.
_PER_THREAD = 1 << 21
_executor: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, executor)


def _pool(threads: int) -> ThreadPoolExecutor:
    global _executor
    # A forked child inherits the executor but not its threads: work sent to it would never run.
    if _executor is None or _executor[0] != os.getpid() or _executor[1] < threads:
        if _executor is not None and _executor[0] == os.getpid():
            _executor[2].shutdown(wait=False)  # its threads end once idle
        _executor = (os.getpid(), threads, ThreadPoolExecutor(threads, thread_name_prefix="layerwise-native"))
    return _executor[2]
