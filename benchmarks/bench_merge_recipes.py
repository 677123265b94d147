"""Claim: `layerwise merge --config` runs mergekit recipes >= 2x faster than `mergekit-yaml`, in <= 0.7x its
peak memory, with the same numbers (deterministic methods equal to 1e-5 in float32).

Three tiny-Llama checkpoints of ~40M parameters (bf16, written by transformers' save_pretrained),
and one recipe per method (linear, ties, dare_ties, slerp, model_stock, della) computed in float32.
Both tools run as their users run them: one command line per merge, timed from the outside (wall
time, start-up included) with the child's own peak RSS (wait4's rusage). mergekit 0.1.5 runs from a
separate venv this script creates (it pins its own tqdm/click/pydantic; never a layerwise
dependency): `benchmarks/.mergekit-venv`, reused on later runs. Runs are interleaved over 3 rounds;
medians and ranges are printed. For random methods (dare_ties, della) the outputs differ by design
and only speed and memory are compared. The physical limit printed is reading the three inputs
plus writing one output (cat + dd with fsync), the floor for any streaming merge.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
WORK = HERE / ".merge-recipes"
VENV = HERE / ".mergekit-venv"
METHODS = {
    "linear": ("models", {}, {"weight": [0.5, 0.3, 0.2]}),
    "ties": ("base", {"normalize": True}, {"weight": [0.6, 0.4], "density": [0.5, 0.7]}),
    "dare_ties": ("base", {"normalize": True}, {"weight": [0.6, 0.4], "density": [0.5, 0.7]}),
    "slerp": ("slerp", {"t": [0.0, 0.3, 0.7, 1.0]}, {}),
    "model_stock": ("base", {}, {}),
    "della": ("base", {"epsilon": 0.05, "lambda": 1.0}, {"weight": [0.6, 0.4], "density": [0.5, 0.7]}),
}
RANDOM = {"dare_ties", "della"}


def checkpoints() -> dict[str, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=16000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    out = {}
    for seed, name in enumerate(("base", "a", "b")):
        folder = WORK / "models" / name
        out[name] = folder
        if not (folder / "config.json").exists():
            torch.manual_seed(seed)
            LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return out


def recipe(method: str, m: dict[str, Path]) -> Path:
    form, params, per_model = METHODS[method]
    lines = [f"merge_method: {method}", "dtype: float32"]
    if form == "models":
        lines.append("models:")
        for i, name in enumerate(("base", "a", "b")):
            lines.append(f"  - model: {m[name]}\n    parameters: {{weight: {per_model['weight'][i]}}}")
    elif form == "slerp":
        lines += [f"base_model: {m['base']}", "models:", f"  - model: {m['base']}", f"  - model: {m['a']}"]
    else:
        lines += [f"base_model: {m['base']}", "models:"]
        for i, name in enumerate(("a", "b")):
            ps = ", ".join(f"{k}: {v[i]}" for k, v in per_model.items())
            lines.append(f"  - model: {m[name]}" + (f"\n    parameters: {{{ps}}}" if ps else ""))
    if params:
        lines.append("parameters:")
        lines += [f"  {k}: {v}" for k, v in params.items()]
    path = WORK / f"{method}.yml"
    path.write_text("\n".join(lines) + "\n")
    return path


def mergekit() -> Path | None:
    exe = VENV / "bin" / "mergekit-yaml"
    if not exe.exists():
        print("creating the mergekit 0.1.5 venv (once) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        r = subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", "torch==2.13.0", "mergekit==0.1.5"],
                           capture_output=True, text=True)
        if r.returncode != 0 or not exe.exists():
            print("mergekit could not be installed; comparing with the limit only:\n" + r.stderr[-2000:])
            return None
    return exe


# Linux carries a process's peak RSS across fork and exec: a command started from this process (torch,
# models, loaded outputs: hundreds of MB) would report at least this process's size. A small launcher
# starts it instead and reports its own child's peak.
_LAUNCH = """import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(child.pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def run(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one command, its own."""
    # One torch thread each by default (BENCH_THREADS to change it): on a shared 2-core machine, OpenMP
    # threads spin-waiting for a busy core cost both tools more than the second thread gains.
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("BENCH_THREADS", "1"), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-S", "-c", _LAUNCH, *cmd], capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    status, peak_kb = map(int, proc.stdout.split())
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return elapsed, peak_kb / 1024


def limit(m: dict[str, Path], out: Path) -> float:
    inputs = [str(p) for name in ("base", "a", "b") for p in m[name].glob("*.safetensors")]
    mb = sum(os.path.getsize(p) for p in inputs[1:2]) * 2 // (1 << 20) + 1  # one float32 output of one model
    start = time.perf_counter()
    subprocess.run(f"cat {' '.join(inputs)} > /dev/null && dd if=/dev/zero of={out} bs=1M count={mb} "
                   f"conv=fsync status=none", shell=True, check=True)
    return time.perf_counter() - start


def max_diff(a: Path, b: Path) -> float:
    import layerwise as lw

    x, y = lw.load(a), lw.load(b)
    if set(x) != set(y):
        return float("inf")
    return max((x[k].float() - y[k].float()).abs().max().item() for k in x)


def main() -> None:
    torch.set_num_threads(1)
    (WORK / "out").mkdir(parents=True, exist_ok=True)
    m = checkpoints()
    mk = mergekit()
    layerwise = [str(Path(sys.executable).parent / "layerwise")]
    rows: dict[str, dict[str, list[tuple[float, float]]]] = {k: {"lw": [], "mk": []} for k in METHODS}
    floor = []
    load = [os.getloadavg()[0]]
    for _ in range(3):
        floor.append(limit(m, WORK / "limit.bin"))
        for method in METHODS:
            path = recipe(method, m)
            out_lw, out_mk = WORK / "out" / f"lw-{method}", WORK / "out" / f"mk-{method}"
            shutil.rmtree(out_lw, ignore_errors=True)
            rows[method]["lw"].append(run(layerwise + ["merge", "--config", str(path), "-o", str(out_lw),
                                                       "--force", "--quiet"]))
            if mk is not None:
                shutil.rmtree(out_mk, ignore_errors=True)
                rows[method]["mk"].append(run([str(mk), str(path), str(out_mk), "--lazy-unpickle",
                                               "--allow-crimes"]))
            lw_t, lw_m = rows[method]["lw"][-1]
            mk_line = f", mergekit {rows[method]['mk'][-1][0]:.2f} s {rows[method]['mk'][-1][1]:.0f} MB" if mk else ""
            print(f"round {len(floor)} {method}: layerwise {lw_t:.2f} s {lw_m:.0f} MB{mk_line}", flush=True)
    load.append(os.getloadavg()[0])
    print(f"load average (1 min) {load[0]:.2f} at the start, {load[1]:.2f} at the end; {os.cpu_count()} CPUs")
    print(f"limit (read 3 inputs + write 1 output): {statistics.median(floor):.2f} s")
    print(f"{'method':12} {'layerwise s':>12} {'mergekit s':>11} {'speed-up':>9} {'lw RSS MB':>10} "
          f"{'mk RSS MB':>10} {'RSS ratio':>10} {'÷ limit':>8} {'max |diff|':>11}")
    for method, r in rows.items():
        lw_t = statistics.median(t for t, _ in r["lw"])
        lw_m = max(mem for _, mem in r["lw"])
        line = f"{method:12} {lw_t:12.2f}"
        if r["mk"]:
            mk_t, mk_m = statistics.median(t for t, _ in r["mk"]), max(mem for _, mem in r["mk"])
            diff = "random" if method in RANDOM else f"{max_diff(WORK / 'out' / f'lw-{method}', WORK / 'out' / f'mk-{method}'):.1e}"
            line += f" {mk_t:11.2f} {mk_t / lw_t:8.2f}x {lw_m:10.0f} {mk_m:10.0f} {lw_m / mk_m:10.2f}"
        else:
            diff = "-"
            line += f" {'-':>11} {'-':>9} {lw_m:10.0f} {'-':>10} {'-':>10}"
        spread = f"{min(t for t, _ in r['lw']):.2f}-{max(t for t, _ in r['lw']):.2f}"
        print(line + f" {lw_t / statistics.median(floor):7.1f}x {diff:>11}   (lw range {spread} s)")


if __name__ == "__main__":
    main()
