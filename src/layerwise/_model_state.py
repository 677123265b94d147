"""A model's state as checkpoint files see it: the names inside torch.compile and DistributedDataParallel
wrappers, FSDP2 (DTensor) shards gathered to rank 0 for writing, and full tensors laid out as a sharded
model's parameters for loading."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from ._ddp import ddp_wrapper
from .errors import CheckpointError

T = TypeVar("T")


def is_dtensor(t: object) -> bool:
    return hasattr(t, "_local_tensor")


def unwrap_ddp(model: nn.Module) -> nn.Module:
    """The module a DistributedDataParallel wrapper trains: files hold its names, not ``module.``-prefixed ones."""
    ddp = ddp_wrapper(model)
    return model if ddp is None else ddp.module


def unwrapped(name: str) -> str:
    """A key without torch.compile's wrapper segment: files never hold ``_orig_mod.`` names."""
    return ".".join(p for p in name.split(".") if p != "_orig_mod") if "_orig_mod" in name else name


def file_state(obj: Any) -> tuple[Any, Any]:
    """(what to save, its full tensors): a DDP wrapper gives its inner module's state dict, and a state dict
    holding DTensors (FSDP2) its full tensors on rank 0 and None elsewhere (a collective: every rank calls);
    anything else is returned twice, as it is."""
    if isinstance(obj, nn.Module):
        obj = unwrap_ddp(obj)
        state = obj.state_dict(keep_vars=True)  # the parameters themselves: tied ones are one object
        return (obj, gathered(state)) if any(map(is_dtensor, state.values())) else (obj, obj)
    if isinstance(obj, Mapping) and any(map(is_dtensor, obj.values())):
        return obj, gathered(obj)
    return obj, obj


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path | str) -> None:
    """``model.load_state_dict(state, strict=True)`` by file names, after checking every key and shape: torch
    would copy the tensors that fit before raising. A sharded parameter takes its shard of the full tensor."""
    model = unwrap_ddp(model)
    own = {unwrapped(k): (k, t) for k, t in model.state_dict().items()}
    problems = [f"{k}: not in the model" for k in state if k not in own]
    problems += [f"{k}: missing from the file" for k in own if k not in state]
    problems += [f"{k}: shape {tuple(v.shape)} in the file, {tuple(own[k][1].shape)} in the model"
                 for k, v in state.items() if k in own and v.shape != own[k][1].shape]
    if problems:
        raise CheckpointError(f"{path}: does not fit {type(model).__name__} ({len(problems)} differences): "
                              + "; ".join(problems[:20]) + (" ..." if len(problems) > 20 else ""))
    model.load_state_dict({own[k][0]: laid_out_as(own[k][1], v) for k, v in state.items()}, strict=True)


@torch.no_grad()
def gathered(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The full tensors of ``state`` on rank 0 (on the CPU), None on the other ranks; every rank must call.

    One all-gather per DTensor, in key order, each freed on the other ranks at once, so a rank
    holds one full tensor at a time beyond rank 0's copy. A tensor object under several names (tied
    parameters) is gathered once and stays shared.
    """
    import torch.distributed as dist

    rank0 = dist.get_rank() == 0
    out: dict[str, torch.Tensor] = {}
    first: dict[int, str] = {}
    for k, t in state.items():
        if isinstance(t, torch.Tensor) and id(t) in first:
            out[k] = out.get(first[id(t)])
            continue
        if isinstance(t, torch.Tensor):
            first[id(t)] = k
        full = t.full_tensor() if is_dtensor(t) else t
        if rank0:
            out[k] = full.detach().cpu() if isinstance(full, torch.Tensor) else full
    return out if rank0 else None


@torch.no_grad()
def full_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with each DTensor gathered whole on every rank (one all-gather each; every rank must call);
    a tensor object under several names (tied parameters) is gathered once and stays shared."""
    out: dict[str, torch.Tensor] = {}
    first: dict[int, str] = {}
    for k, t in state.items():
        if id(t) in first:
            out[k] = out[first[id(t)]]
            continue
        first[id(t)] = k
        out[k] = (t.full_tensor() if is_dtensor(t) else t).detach()
    return out


def on_rank0(write: Callable[[], T]) -> T | None:
    """Run ``write`` on rank 0 and give every rank its outcome: rank 0's result, or the error it raised."""
    import torch.distributed as dist

    outcome: list[object] = [None]
    if dist.get_rank() == 0:
        try:
            outcome[0] = ("ok", write())
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            outcome[0] = ("error", e)
    dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]  # type: ignore[misc]
    if kind == "error":
        raise value  # type: ignore[misc]
    return value  # type: ignore[return-value]


def laid_out_as(mine: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The full tensor ``value`` sharded as the model's DTensor ``mine``; each rank cuts its shard, no collective."""
    if not is_dtensor(mine) or is_dtensor(value):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(mine.device), mine.device_mesh, mine.placements, src_data_rank=None)
