"""The demo beside a busy process: why it runs its tiny models on one torch thread (issue 16 item 6).

The demo trains an LSTM of 48 units on batches of 64. With torch's default thread count (one
per core) each of its small ops is split across threads that spin while they wait; beside
another busy process those threads fight it for the cores and every op slows down several
fold. One thread does the same work with no synchronisation at all. Measured: a fixed chunk
of the demo's training (its model, data and batch size), on a quiet machine and beside one
busy process (a torch matmul loop keeping one core busy, like a second job), with
the default thread count and with the demo's one thread, interleaved, ``--rounds`` rounds.

Claim: with one thread the chunk runs ≤ 1.5× its quiet time beside a busy process. The
limit is 1.0× (the busy process costs the demo nothing); the baseline is the default threads.

    python benchmarks/bench_demo.py [--rounds 3] [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from layerwise_demo.data import SiameseLSTM, batches, digit_pairs

BUSY = "import torch\ntorch.set_num_threads(1)\nx = torch.randn(1024, 1024)\nwhile True:\n    x @ x\n"


def chunk(model: SiameseLSTM, train, steps: int, threads: int) -> float:
    """Seconds for ``steps`` of the demo's training with ``threads`` torch threads."""
    torch.set_num_threads(threads)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for step, batch in enumerate(batches(train, 64, gen)):
        if step == steps:
            break
        loss = F.cross_entropy(model(batch.a, batch.b), batch.y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    default = torch.get_num_threads()
    train, _ = digit_pairs(0, n_train=64 * args.steps, n_test=10)
    torch.manual_seed(0)
    model = SiameseLSTM()
    chunk(model, train, 5, 1)  # warm-up
    print(f"{args.steps} steps of the demo's training; torch's default thread count here: {default}")
    print(f"{'round':>5} {'threads':>7} {'quiet':>9} {'busy':>9} {'busy/quiet':>10} {'÷ limit 1.0':>11}")
    times: dict[tuple[str, int], list[float]] = {}
    for r in range(args.rounds):
        quiet = {t: chunk(model, train, args.steps, t) for t in (default, 1)}
        busy_process = subprocess.Popen([sys.executable, "-c", BUSY])
        try:
            time.sleep(1.0)  # let it reach its loop
            busy = {t: chunk(model, train, args.steps, t) for t in (default, 1)}
        finally:
            busy_process.kill()
            busy_process.wait()
        for t in (default, 1):
            times.setdefault(("quiet", t), []).append(quiet[t])
            times.setdefault(("busy", t), []).append(busy[t])
            ratio = busy[t] / quiet[t]
            print(f"{r + 1:>5} {t:>7} {quiet[t]:>8.2f}s {busy[t]:>8.2f}s {ratio:>9.2f}× {ratio:>10.2f}×")
    median = {key: statistics.median(v) for key, v in times.items()}
    print(f"one thread beside the busy process ÷ its quiet time: {median['busy', 1] / median['quiet', 1]:.2f}× "
          "(claim ≤ 1.5×, limit 1.0×)")
    print(f"default threads beside the busy process ÷ their quiet time: "
          f"{median['busy', default] / median['quiet', default]:.2f}×")
    print(f"default threads ÷ one thread: quiet {median['quiet', default] / median['quiet', 1]:.1f}×, "
          f"beside the busy process {median['busy', default] / median['busy', 1]:.1f}×")

if __name__ == "__main__":
    main()
