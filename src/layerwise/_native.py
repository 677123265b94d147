"""Native CPU kernels behind ``compile``: each reads every tensor once, all tensors in one call.

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

Its ~100 lines of C (``_native.c``, instantiated for the baseline ISA, AVX2+FMA and AVX-512;
each call takes the one torch itself dispatches to) are built with the package by ``setup.py``
when a C compiler is there: then the default (``compile=None``) uses them, and nothing is ever
compiled at run time. Without them, the default runs torch's kernels, and ``compile=True``
builds the library once per machine with the system's C compiler (``$CC``, else
``cc``/``gcc``/``clang``), in about a second, into ``$LAYERWISE_CACHE_DIR`` (default
``~/.cache/layerwise``); the file's name hashes the source, compiler, flags, OS and
architecture, it is published by one atomic rename, and a cached file that does not load is
built again. A library built from another version of ``_native.c`` (an in-place build left
behind by an edit) is never used: it names the hash of its source. The kernels are called
through ``ctypes`` with all tensors' pointers at once; with ``torch.get_num_threads() > 1`` and
enough elements, one call per thread over equal shares (ctypes releases the GIL), pieces of one
tensor pooled after: 1.8x faster on 2 threads.

Exactness: non-zero counts and max |x| are exact. Each square is rounded to the tensor's float
type, as in torch's kernels; sums add 32 float lanes over blocks of 4096 elements, then the
blocks in float64 (float64 lanes for float64), which is more accurate than the float32 cascades
of the eager kernels: a float32 sum whose total passes float32's range while each block's stays
below it is finite here, inf there. max |x| is NaN exactly where the sum of squares is,
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

# The rows of the kernel's output, in the engine's canonical order (_grad_engine.PRIMITIVES).
ORDER = ("sumsq", "sum", "nonzero", "max_abs")
DTYPES = (torch.float32, torch.float64, torch.bfloat16)
LERP_DTYPES = (torch.float32, torch.float64)  # torch rounds a bfloat16 lerp from float: not replayed here
# torch's vector lerp fuses its multiply-add (as this loop does) only in its AVX2 and AVX-512 kernels.
LERP_CAPABILITIES = ("AVX2", "AVX512")
# The kernels' instance for the vector ISA torch dispatches to on this CPU (its own kernels' choice).
_SUFFIX = {"AVX512": "_avx512", "AVX2": "_avx2"}
# Each kernel of DTYPES, and its pointer arguments (besides its sizes and output).
_POINTERS = {"primitives": 1, "sumsq": 2, "copy": 2, "distance": 2}

_SOURCE = Path(__file__).with_name("_native.c")
_COMPILE_SECONDS = 300
_kernels: dict[str, Callable] | None = None
_packaged: bool | None = None  # whether the library built with the package loaded (None: not tried)
_failed: str | None = None


def wanted(compile: bool | None) -> bool:
    """Whether a ``compile`` flag sends CPU work of ``DTYPES`` to these kernels: ``None`` (the default)
    where they were built with the package, ``True`` always, building them now if needed (and raising
    :class:`MissingExtraError` where that fails), ``False`` never."""
    if compile is None:
        return _from_package()
    if compile:
        _load()
    return compile


def lerps(compile: bool | None) -> bool:
    """Whether :func:`lerp_plan` serves ``compile`` here: as :func:`wanted`, on a CPU where torch's own
    ``lerp_`` fuses its multiply-add (``LERP_CAPABILITIES``), as the kernel's AVX2/AVX-512 instances do."""
    return (wanted(compile) and torch.backends.cpu.get_cpu_capability() in LERP_CAPABILITIES
            and "lerp_float32" in _kernels)


def _source_hash() -> str:
    return hashlib.sha256(_SOURCE.read_bytes()).hexdigest()


def _from_package() -> bool:
    """Load the library ``setup.py`` built beside the package, once; False where there is none (or it
    is from another source: an in-place build older than ``_native.c``)."""
    global _kernels, _packaged
    if _packaged is None:
        _packaged = False
        try:
            from . import _native_kernels  # an empty extension module: the kernels are for ctypes

            library = ctypes.CDLL(_native_kernels.__file__)
            if ctypes.c_char_p.in_dll(library, "layerwise_source_sha256").value.decode() == _source_hash():
                _kernels, _packaged = _bind(library), True
        except (ImportError, OSError, ValueError, AttributeError):
            pass
    return _packaged


def _build(rebuild: bool = False) -> Path:
    """The kernels' shared library, compiled into the cache on first use (or again when ``rebuild``)."""
    compiler = shlex.split(os.environ.get("CC", "")) or [next(filter(shutil.which, ("cc", "gcc", "clang")), "cc")]
    if shutil.which(compiler[0]) is None:
        raise OSError(f"no C compiler found ({'CC=' + os.environ['CC'] if os.environ.get('CC') else 'cc, gcc, clang'})")
    flags = ["-O3", "-shared", "-fPIC", "-std=c99", "-ffp-contract=off"]  # as setup.py's
    source = _SOURCE.read_text()
    # One file per source, compiler, flags, OS and architecture: a cache shared by several machines
    # (an NFS home) holds one for each.
    key = "\0".join([source, *compiler, *flags, sys.platform, platform.machine()])
    cache = Path(os.environ.get("LAYERWISE_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or
                                                               Path.home() / ".cache") / "layerwise")
    target = cache / f"kernels-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    if target.exists() and not rebuild:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as work:
        copy, built = Path(work) / _SOURCE.name, Path(work) / target.name
        copy.write_text(source)
        try:
            done = subprocess.run([*compiler, *flags, str(copy), "-o", str(built), "-lm"], capture_output=True,
                                  text=True, timeout=_COMPILE_SECONDS)
        except subprocess.TimeoutExpired:
            raise OSError(f"{' '.join(compiler)} ran over {_COMPILE_SECONDS} s") from None
        if done.returncode != 0:
            raise OSError(f"{' '.join(compiler)} failed (exit {done.returncode}): "
                          f"{(done.stderr or done.stdout).strip()[:300] or 'no message'}")
        os.replace(built, target)  # atomic: a concurrent process finds the whole file or none
    return target


def _load() -> dict[str, Callable]:
    """The kernels by name (``primitives_float32``, ...): the package's, else built into the cache."""
    global _kernels, _failed
    if _kernels is not None or _from_package():
        return _kernels
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
                   "compile=None or False (torch's kernels give the same results).")
        raise MissingExtraError(_failed) from e
    _kernels = _bind(library)
    return _kernels


def _bind(library: ctypes.CDLL) -> dict[str, Callable]:
    """Each kernel's instance for this CPU's ISA, typed; the lerp only where it fuses as torch's does."""
    suffix = _SUFFIX.get(torch.backends.cpu.get_cpu_capability(), "")
    found = {}
    for kernel, pointers in _POINTERS.items():
        for dtype in DTYPES:
            name = f"{kernel}_{str(dtype)[6:]}"
            found[name] = getattr(library, name + suffix, None) or getattr(library, name)
            found[name].argtypes = [ctypes.c_int64, *[ctypes.c_void_p] * (pointers + 2)]
    for dtype in LERP_DTYPES if suffix else ():  # the vector instances only: the baseline's fma is libm's
        lerp = getattr(library, f"lerp_{str(dtype)[6:]}{suffix}", None)
        if lerp is not None:
            lerp.argtypes = [ctypes.c_int64, *[ctypes.c_void_p] * 3, ctypes.c_double]
            found[f"lerp_{str(dtype)[6:]}"] = lerp
    return found


# What the C loops may read through data_ptr(): tensors and parameters holding their own strided
# memory. A wrapper subclass (DTensor, TwoTensor) has none (data_ptr() is 0), and a negative view
# stores the values it negates: both are left to torch's kernels.
_PLAIN = frozenset({Tensor, torch.nn.Parameter})


def takes(xs: list[Tensor]) -> bool:
    """Whether :func:`primitives` and :func:`sumsq` may read ``xs``: plain tensors, no negative view and
    no ZeroTensor (autograd's all-zero gradient, e.g. of ``torch.sgn``, with no memory either)."""
    return (_PLAIN.issuperset(map(type, xs)) and not any(map(Tensor.is_neg, xs))
            and not any(map(Tensor._is_zerotensor, xs)))


def primitives(xs: list[Tensor]) -> Tensor | None:
    """(sum of squares, sum, non-zero count, max |x|) of each CPU tensor of one dtype in ``DTYPES``,
    as a (4, len(xs)) float64 tensor: one pass over each tensor's memory, one call for all, or with
    ``torch.get_num_threads() > 1`` one call per thread over equal shares. None unless it
    :func:`takes` them (checked here, where a wrong pointer would be read: callers need not)."""
    if not takes(xs):
        return None
    return _launch("primitives", [_contiguous(xs)], 4)


def sumsq(xs: list[Tensor]) -> Tensor | None:
    """Σx² of each CPU tensor of one dtype in ``DTYPES``, as a (1, len(xs)) float64 tensor: the first
    row of :func:`primitives`, the other three left out (one stream, as a BLAS dot). None unless it
    :func:`takes` them."""
    if not takes(xs):
        return None
    xs = _contiguous(xs)
    return _launch("sumsq", [xs, xs], 1)  # a pairwise kernel that reads the second of each pair


def _contiguous(xs: list[Tensor]) -> list[Tensor]:
    return xs if all(map(Tensor.is_contiguous, xs)) else [x.contiguous() for x in xs]


def copy_sumsq(dst: list[Tensor], src: list[Tensor]) -> Tensor:
    """Copy each ``src`` into ``dst`` (contiguous CPU tensors of one dtype in ``DTYPES``, each pair laid
    out alike, not overlapping) and return Σx² of each as a (1, len(src)) float64 tensor, in one pass."""
    return _launch("copy", _pairs(dst, src, DTYPES), 1)


def distance_sumsq(before: list[Tensor], after: list[Tensor]) -> Tensor:
    """Σ(after - before)² of each pair (contiguous CPU tensors of one dtype in ``DTYPES``, each pair
    laid out alike), as a (1, len(after)) float64 tensor, in one pass; nothing is written."""
    return _launch("distance", _pairs(before, after, DTYPES), 1)


def lerp_(shadows: list[Tensor], live: list[Tensor], weight: float) -> None:
    """``torch._foreach_lerp_(shadows, live, weight)``, bit for bit, in one pass (contiguous CPU pairs of
    one dtype in ``LERP_DTYPES``, each pair laid out alike, not overlapping)."""
    lerp_plan(shadows, live)(weight)


def fits(a: Tensor, b: Tensor, dtypes: tuple[torch.dtype, ...]) -> bool:
    """Whether a pairwise kernel may take ``a`` and ``b``: plain CPU tensors (see :func:`takes`) of one of
    ``dtypes``, laid out alike and contiguous, which its C loop reads and writes as one flat layout."""
    return (a.device.type == "cpu" and a.dtype in dtypes and laid_out_alike(a, b) and a.is_contiguous()
            and takes([a, b]))


def _pairs(a: list[Tensor], b: list[Tensor], dtypes: tuple[torch.dtype, ...]) -> list[list[Tensor]]:
    """``[a, b]``, once every pair :func:`fits` and all share one dtype (the kernel is chosen by it)."""
    dtype = b[0].dtype
    for x, y in zip(a, b, strict=True):
        if not (fits(x, y, dtypes) and y.dtype == dtype):
            raise GradError(f"native kernels take contiguous CPU pairs of one dtype laid out alike, not "
                            f"{tuple(x.shape)} {x.dtype} {x.device} and {tuple(y.shape)} {y.dtype} {y.device}")
    return [a, b]


def _launch(name: str, tensors: list[list[Tensor]], columns: int) -> Tensor:
    """Run kernel ``name`` over lists of tensors (the kernel's pointer arguments, tensor i of each
    list alike), as a float64 ``(columns, tensors)``: pieces of a tensor pooled, sums added, a 4th
    column (max |x|) maxed."""
    kernel = _load()[f"{name}_{str(tensors[0][0].dtype)[6:]}"]
    runs, owners = _runs(tensors)
    # One column is laid out as its transpose: made in its final shape, with no view to dispatch.
    out = torch.empty((len(owners), columns) if columns > 1 else (1, len(owners)), dtype=torch.float64)
    _run(kernel, runs, out.data_ptr(), columns, ())
    if len(owners) != len(tensors[0]):
        rows, where = out.view(len(owners), columns), torch.tensor(owners)
        pooled = rows.new_zeros(len(tensors[0]), columns).index_add_(0, where, rows)
        if columns == 4:
            pooled[:, 3] = rows.new_zeros(len(tensors[0])).scatter_reduce_(0, where, rows[:, 3], "amax")
        return pooled.T
    return out.T if columns > 1 else out


def lerp_plan(shadows: list[Tensor], live: list[Tensor]) -> Callable[[float], None]:
    """:func:`lerp_` for tensors that stay where they are (``EMA`` checks that before every update),
    checked and laid out once: each call is one kernel call per thread, with no Python per tensor."""
    return _LerpPlan(shadows, live)


class _LerpPlan:
    """A prebuilt :func:`lerp_`. Its pointers name the memory it was built over, so a copy (pickle,
    ``copy.deepcopy``) has no plan, and never builds one while being loaded."""

    __slots__ = ("kernel", "runs", "keep")

    def __init__(self, shadows: list[Tensor], live: list[Tensor]):
        self.kernel = _load()[f"lerp_{str(live[0].dtype)[6:]}"]
        self.runs = _runs(_pairs(shadows, live, LERP_DTYPES))[0]
        # Aliases of their own hold the memory the pointers name, whatever is later done to the tensors.
        self.keep = [t.detach() for t in (*shadows, *live)]

    def __call__(self, weight: float) -> None:
        _run(self.kernel, self.runs, 0, 0, (weight,))

    def __reduce__(self):
        return _no_plan, ()


def _no_plan() -> None:
    return None


def _runs(tensors: list[list[Tensor]]) -> tuple[list[list[array.array]], list[int]]:
    """The kernel calls over ``tensors``: one, or with ``torch.get_num_threads() > 1`` and enough
    elements one per thread over equal shares (pieces of a tensor pooled by owner afterwards),
    each as (pointer arrays..., sizes); and each piece's owner, in call order."""
    sizes = list(map(Tensor.numel, tensors[0]))
    threads = min(torch.get_num_threads(), sum(sizes) // _PER_THREAD)
    if threads <= 1:
        pointers = {id(ts): array.array("q", map(Tensor.data_ptr, ts)) for ts in tensors}  # sumsq passes one list twice
        return [[pointers[id(ts)] for ts in tensors] + [array.array("q", sizes)]], list(range(len(sizes)))
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


def _run(kernel, runs: list[list[array.array]], out: int, columns: int, scalars: tuple[float, ...]) -> None:
    """Each run's kernel call, its rows of the float64 output at address ``out`` next (none without
    ``columns``); a thread each when several: ctypes releases the GIL."""
    calls, row = [], 0
    for arrays in runs:
        count = len(arrays[-1])
        tail = (out + 8 * columns * row,) if columns else ()
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
    # A forked child inherits the executor but not its threads: work sent to it would never run. A
    # smaller one is dropped, not shut down (another thread may be sending it work): its threads end
    # once it is collected.
    executor = _executor
    if executor is None or executor[0] != os.getpid() or executor[1] < threads:
        executor = _executor = (os.getpid(), threads, ThreadPoolExecutor(threads, thread_name_prefix="layerwise-native"))
    return executor[2]
