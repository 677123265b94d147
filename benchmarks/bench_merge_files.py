"""Claim: lw.merge_files averages checkpoints at near disk speed in memory bounded by a few tensors.

Four checkpoints of ~530 MB of fp32 each (an embedding of 32000x1024 plus 96 other tensors)
are averaged by (a) the common recipe: torch.load every input, average, torch.save; (b) the
same with safetensors load_file / save_file; (c) lw.merge_files (which also fsyncs). The
limit is reading every input once (cat > /dev/null) plus writing one output of the same size
(dd with direct I/O, as lw writes, fsynced). Each run is a subprocess: wall time and peak RSS are its own. The inputs are in
the page cache for every run alike (written just before). Times are of the work alone, not
of the interpreter's start-up; peak RSS is each process's own high-water mark.
Targets: lw >= 2x faster than (a) and >= 1.3x faster than (b); lw <= 1.2x the limit; the merge's own
memory (peak RSS beyond Python + torch + layerwise) <= 64 MB. Rounds are interleaved; round 0 only
warms the page cache. lw's page faults (minflt) per merge are printed: fresh pages are what a new
process pays for (see benchmarks/README.md).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import layerwise as lw

# Each child times its own work (not the interpreter's start-up) and reports its peak RSS
# (VmHWM: the high-water mark of this process, which ru_maxrss would mix with the parent's).
REPORT = """
import re
rss = int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read())[1]) / 1024
print(f"{elapsed} {rss}")
"""
TORCH = """
import sys, time, torch
start = time.perf_counter()
sds = [torch.load(p, weights_only=True) for p in sys.argv[1:-1]]
torch.save({k: sum(sd[k] for sd in sds) / len(sds) for k in sds[0]}, sys.argv[-1])
elapsed = time.perf_counter() - start
""" + REPORT
SAFETENSORS = """
import sys, time
from safetensors.torch import load_file, save_file
start = time.perf_counter()
sds = [load_file(p) for p in sys.argv[1:-1]]
save_file({k: sum(sd[k] for sd in sds) / len(sds) for k in sds[0]}, sys.argv[-1])
elapsed = time.perf_counter() - start
""" + REPORT
LAYERWISE = """
import resource, sys, time, layerwise as lw
merge_files = lw.merge_files  # the package loads submodules on first use: load it before the clock, as (a) and (b) do
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
start = time.perf_counter()
merge_files(sys.argv[1:-1], sys.argv[-1])
elapsed = time.perf_counter() - start
print("faults", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
""" + REPORT
IMPORT_ONLY = """
import layerwise.checkpoint  # with torch, as the merge run has it
elapsed = 0.0
""" + REPORT
LIMIT = """
cat "$@" > /dev/null
# The faster way to write here: direct I/O skips the page cache's fresh pages (see benchmarks/README.md);
# a file system without it takes the buffered write.
dd if=/dev/zero of="$OUT" bs=1M count="$MB" oflag=direct conv=fsync status=none 2>/dev/null ||
  dd if=/dev/zero of="$OUT" bs=1M count="$MB" conv=fsync status=none
"""


FAULTS: list[int] = []  # page faults (minflt) of each lw.merge_files run


def measure(argv: list[str]) -> tuple[float, float]:
    """Seconds of the work itself and peak RSS (MB) of one child process, as the child reports them."""
    os.sync()  # the previous run's unsynced output must not be flushed on this run's clock
    run = subprocess.run(argv, capture_output=True, text=True, check=True)
    words = run.stdout.split()
    if "faults" in words:
        FAULTS.append(int(words[words.index("faults") + 1]))
    return float(words[-2]), float(words[-1])


def measure_limit(inputs: list[Path], output: Path, megabytes: int) -> tuple[float, float]:
    """Read every input once, write one output of the same size with fsync (no interpreter: bash, cat, dd)."""
    os.sync()
    start = time.perf_counter()
    subprocess.run(["bash", "-c", LIMIT, "limit", *map(str, inputs)], check=True,
                   env={**os.environ, "OUT": str(output), "MB": str(megabytes)})
    return time.perf_counter() - start, 0.0


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="bench-merge-", dir=os.environ.get("BENCH_DIR")))
    torch.manual_seed(0)
    st_paths, pt_paths = [], []
    for i in range(4):
        state = {"embed.weight": torch.randn(32000, 1024)}
        state.update({f"layers.{j}.{w}": torch.randn(1024, 1024) for j in range(24) for w in ("q", "k", "v", "o")})
        st_paths.append(folder / f"m{i}.safetensors")
        pt_paths.append(folder / f"m{i}.pt")
        lw.save(state, st_paths[-1])
        torch.save(state, pt_paths[-1])
        del state
    size = st_paths[0].stat().st_size
    largest = 32000 * 1024 * 4 / 2**20

    rounds: dict[str, list[tuple[float, float]]] = {}
    for r in range(4):  # round 0 warms the page cache and is dropped; rounds 1-3 are reported
        for f in folder.glob("out*"):
            f.unlink()
        runs = {"import": measure([sys.executable, "-c", IMPORT_ONLY]),
                "limit": measure_limit(st_paths, folder / "out.raw", size // 2**20),
                "torch": measure([sys.executable, "-c", TORCH, *map(str, pt_paths), str(folder / "out.pt")]),
                "safetensors": measure([sys.executable, "-c", SAFETENSORS, *map(str, st_paths),
                                        str(folder / "out_st.safetensors")]),
                "layerwise": measure([sys.executable, "-c", LAYERWISE, *map(str, st_paths),
                                      str(folder / "out_lw.safetensors")])}
        if r:
            for name, value in runs.items():
                rounds.setdefault(name, []).append(value)
    assert torch.allclose(lw.load(folder / "out_lw.safetensors")["embed.weight"],
                          lw.load(folder / "out_st.safetensors")["embed.weight"], atol=1e-6)

    def med(name: str) -> float:
        return statistics.median(t for t, _ in rounds[name])

    def span(values: list[float]) -> str:
        return f"{min(values):.2f}-{max(values):.2f}"

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"4 inputs x {size / 2**20:.0f} MB; largest tensor {largest:.0f} MB; {os.cpu_count()} CPUs; 3 rounds; "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{'run':<38} {'median':>8} {'range':>11} {'peak RSS':>10}")
    for name, label in (("limit", "limit: cat inputs + dd output (direct, fsync)"), ("torch", "(a) torch.load all + torch.save"),
                        ("safetensors", "(b) safetensors load all + save"), ("layerwise", "(c) lw.merge_files")):
        rss = max(m for _, m in rounds[name])
        print(f"{label:<38} {med(name):7.2f}s {span([t for t, _ in rounds[name]]):>11} "
              f"{f'{rss:8.0f} MB' if rss else '       -':>10}")
    per_round = {k: [rounds[k][i][0] / rounds["layerwise"][i][0] for i in range(3)] for k in ("torch", "safetensors")}
    print(f"lw vs (a): {med('torch') / med('layerwise'):.2f}x faster ({span(per_round['torch'])}); "
          f"vs (b): {med('safetensors') / med('layerwise'):.2f}x faster ({span(per_round['safetensors'])})")
    print(f"lw / limit: {med('layerwise') / med('limit'):.2f}x "
          f"({span([rounds['layerwise'][i][0] / rounds['limit'][i][0] for i in range(3)])})")
    print(f"lw page faults (minflt) per merge: {', '.join(map(str, FAULTS[-3:]))}")
    imported = max(m for _, m in rounds["import"])
    lw_rss = max(m for _, m in rounds["layerwise"])
    print(f"lw peak RSS {lw_rss:.0f} MB = {imported:.0f} MB for Python + torch + layerwise alone "
          f"+ {lw_rss - imported:.0f} MB for the merge (target: <= 64 MB for element-wise methods)")
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()


if __name__ == "__main__":
    main()
