"""Claim: lw.EMA of an FSDP2 model keeps sharded shadows and updates them locally, at local memory speed.

The benchmark encoder (``_timing.encoder()``, 9.5 M parameters) wrapped with ``fully_shard`` per
layer and at the root, on 2 gloo ranks on CPU. Per rank: collectives per ``EMA.update()``
(counted with ``CommDebugMode``; a ``full_tensor()`` of one shadow is counted alongside to show
the counter sees collectives), the time of an update ÷ one local ``lerp_`` over a flat buffer of
the rank's shard size (the limit), and shadow bytes ÷ parameter bytes held by the rank.
Three rounds of interleaved repeats. Targets: 0 collectives; update ÷ limit <= 1.3;
shadow bytes ÷ parameter bytes <= 1.0 for a float32 model.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import layerwise as lw

from _timing import compare, encoder, ms


def rank_main(rank: int, world_size: int, store: str, rounds: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.debug import CommDebugMode

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    mesh = init_device_mesh("cpu", (world_size,))
    model = encoder()
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    ema = lw.EMA(model, decay=0.999)

    with CommDebugMode() as comm:
        ema.update()
    per_update = comm.get_total_counts()
    with CommDebugMode() as comm:
        ema.shadow[0].full_tensor()
    per_gather = comm.get_total_counts()

    local = [p.to_local() for p in model.parameters()]
    numel = sum(t.numel() for t in local)
    param_bytes = sum(t.numel() * t.element_size() for t in local)
    shadow_bytes = sum(s.to_local().numel() * s.to_local().element_size() for s in ema.shadow)
    flat_ema, flat_live = torch.zeros(numel), torch.randn(numel)
    rows = []
    for _ in range(rounds):
        t = compare({"limit": lambda: flat_ema.lerp_(flat_live, 0.001), "lw": ema.update}, repeats=30, warmup=3)
        rows.append(t)
    dist.barrier()
    for r in range(world_size):
        if r == rank:
            print(f"rank {rank}: {numel / 1e6:.2f} M local elements in {len(local)} shards; collectives per update "
                  f"{per_update} (a full_tensor(): {per_gather}); shadow ÷ parameter bytes "
                  f"{shadow_bytes / param_bytes:.3f}", flush=True)
            for i, t in enumerate(rows):
                print(f"  round {i + 1}: local flat lerp {ms(t['limit'])} | EMA.update {ms(t['lw'])} = "
                      f"{t['lw'] / t['limit']:.3f}x the limit", flush=True)
        dist.barrier()
    dist.destroy_process_group()


def main(world_size: int = 2, rounds: int = 3) -> None:
    print(f"torch {torch.__version__}, FSDP2 on {world_size} gloo ranks (CPU), 1 thread each")
    print("targets: 0 collectives per update; update ÷ limit <= 1.3; shadow ÷ parameter bytes <= 1.0")
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(rank_main, args=(world_size, os.path.join(tmp, "store"), rounds),
                           nprocs=world_size, start_method="spawn")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    main()
