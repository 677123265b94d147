"""PCGrad: backward through several task losses with their conflicting gradients projected away."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from ._ddp import ddp_wrapper, fsdp_params
from ._selector import unwrap_compiled
from ._tensors import buckets, pick
from .errors import GradError, OptionTypeError
from .select import Selector, describe, select
from .surgery import like, shard_like, trainable

__all__ = ["pcgrad"]


def pcgrad(losses: Sequence[torch.Tensor], model: nn.Module, *selectors: Selector,
           reduction: Literal["mean", "sum"] = "mean", generator: torch.Generator | None = None) -> None:
    """Backward through several task losses with projected conflicting gradients (PCGrad).

    Each task's gradient of the selected parameters ``g_i`` is projected onto the normal plane
    of every other task's ``g_j`` with which it conflicts (``g_i . g_j < 0``), the others taken
    in a random order drawn from ``generator``, a CPU ``torch.Generator`` (torch's default
    one if None) (Yu et al., 2020, "Gradient Surgery for Multi-Task Learning"). The projected
    gradients are combined and written into ``.grad``, replacing it: call ``pcgrad`` instead
    of ``loss.backward()``.

    ``reduction`` ("mean" or "sum") combines the gradients of parameters every loss reaches;
    a selected parameter that only some losses reach (a task's head) gets the sum, as in the
    reference implementation, so it is not divided by the number of tasks. A loss that does
    not reach a parameter counts as a zero gradient there. Parameters outside the selection
    get the plain sum of the losses' gradients; parameters no loss reaches are left alone.
    Select the shared trunk to leave task heads out of the projection.

    The projections are done on the ``T x T`` Gram matrix of the task gradients, so beyond the
    ``T`` backward passes the surgery costs two matrix products per (device, dtype) of
    parameters, and nothing waits for the device. Pass a DistributedDataParallel wrapper as
    ``model``: the task gradients are then averaged over its processes before the projections
    (one all-reduce per device and dtype, as DDP's own), so every rank writes the gradients one
    process would compute over the global batch. The same holds for a model sharded by FSDP2
    (``fully_shard``, HSDP too): the task gradients are those of its unsharded parameters, averaged
    over the mesh, and each rank keeps its shard of the result (call ``pcgrad`` after the forward).

    Example:
        >>> import layerwise as lw, torch
        >>> net = torch.nn.Linear(2, 1, bias=False)
        >>> _ = torch.nn.init.ones_(net.weight)
        >>> losses = [net(torch.tensor([1.0, 0.0])).sum(), net(torch.tensor([-1.0, 1.0])).sum()]
        >>> lw.pcgrad(losses, net)
        >>> net.weight.grad  # the mean of (1, 0) + 0.5 (-1, 1) and (-1, 1) + (1, 0)
        tensor([[0.2500, 0.7500]])
    """
    losses = list(losses)
    if len(losses) < 2:
        raise GradError(f"pcgrad needs two losses or more, got {len(losses)}: with one task, call loss.backward()")
    if reduction not in ("mean", "sum"):
        raise GradError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise OptionTypeError(f"pcgrad: generator must be a torch.Generator or None, got {type(generator).__name__}")
    for i, loss in enumerate(losses):
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            got = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise GradError(f"pcgrad: loss {i} must be a one-element tensor, got {got}")
        if not loss.requires_grad:
            raise GradError(f"pcgrad changed nothing: loss {i} does not require grad (it depends on no trainable parameter)")
    chosen = [p for _, p in trainable(model, selectors, "pcgrad")]
    ids = {id(p) for p in chosen}
    others = [p for p in select(model).params() if p.requires_grad and id(p) not in ids]
    managed = fsdp_params(unwrap_compiled(model))
    # Under FSDP2 autograd reaches the unsharded stand-in of each parameter: the task gradients are its (full,
    # this rank's); the result goes to the sharded parameter, each rank keeping its shard.
    targets = [managed[id(p)].sharded_param if id(p) in managed else p for p in chosen + others]
    inputs = [_stand_in(managed[id(p)]) if id(p) in managed else p for p in chosen + others]
    tasks = len(losses)
    grads = [torch.autograd.grad(loss, inputs, retain_graph=i < tasks - 1, allow_unused=True)
             for i, loss in enumerate(losses)]
    ddp = ddp_wrapper(model)
    reduce_over = [ddp.process_group] if ddp is not None else _fsdp_groups(managed) if managed else []
    target_of = {id(i): t for i, t in zip(inputs, targets)}
    chosen, others = inputs[:len(chosen)], inputs[len(chosen):]
    unreached = [str(i) for i, g in enumerate(grads) if all(x is None for x in g[:len(chosen)])]
    if unreached:
        raise GradError(f"pcgrad changed nothing: loss {', '.join(unreached)} reaches none of the selected parameters "
                        f"({', '.join(map(describe, selectors)) or 'all'}). Select parameters every loss depends on "
                        "(the shared trunk), or leave those losses out."
                        + (" Sharded (DTensor) parameters: pass the module fully_shard was applied to, whose forward "
                           "FSDP2 unshards them for." if any(hasattr(p, "_local_tensor") for p in chosen) else ""))
    # By parameter: each task's gradient, None where the task does not reach it; a sparse one
    # (Embedding(sparse=True)) dense, as the projections need (.grad becomes dense, as in autograd's sums).
    by_param = [[g.to_dense() if g is not None and g.is_sparse else g for g in gs] for gs in zip(*grads)]
    projected = [(p, gs) for p, gs in zip(chosen, by_param) if any(g is not None for g in gs)]

    with torch.no_grad():
        groups = buckets([p for p, _ in projected])
        mats = {key: _task_matrix(pick(projected, idx), tasks, torch.promote_types(key[1], torch.float32))
                for key, idx in groups.items()}
        for group in reduce_over:  # the projections of one process over the global batch: on the averaged task gradients
            _average(list(mats.values()), group)
        first = next(iter(mats.values()))
        gram = sum((m @ m.T).to(first.device) for m in mats.values())
        # Each projected gradient stays a combination of the original ones, pc_i = coef[i] @ G,
        # so a projection is a few ops on T numbers: pc_i . g_j = coef[i] @ gram[:, j].
        coef = torch.eye(tasks, dtype=gram.dtype, device=gram.device)
        for i in range(tasks):
            rest = [j for j in range(tasks) if j != i]
            for r in torch.randperm(tasks - 1, generator=generator).tolist():
                j = rest[r]
                dot = coef[i] @ gram[:, j]
                coef[i, j] -= torch.where(dot < 0, dot / gram[j, j], 0.0)
        weights = coef.sum(0)
        for key, idx in groups.items():
            entries = pick(projected, idx)
            merged = weights.to(mats[key]) @ mats[key]
            for (p, gs), flat in zip(entries, merged.split([p.numel() for p, _ in entries])):
                if reduction == "mean" and all(g is not None for g in gs):
                    flat = flat / tasks
                _set_grad(target_of[id(p)], like(p).copy_(flat.view(p.shape)))
        summed = []
        for p, gs in zip(others, by_param[len(chosen):]):
            reached = [g for g in gs if g is not None]
            if reached:
                summed.append((p, like(p).copy_(reached[0])))
                for g in reached[1:]:
                    summed[-1][1].add_(g)
        for group in reduce_over:
            _average([total for _, total in summed], group)
        for p, total in summed:
            _set_grad(target_of[id(p)], total)


def _set_grad(target: torch.Tensor, grad: torch.Tensor) -> None:
    target.grad = shard_like(target, grad) if hasattr(target, "_local_tensor") else grad


def _stand_in(param: Any) -> torch.Tensor:
    """The unsharded parameter FSDP2 made for ``param`` (an ``FSDPParam``) at its all-gather in forward."""
    unsharded = getattr(param, "_unsharded_param", None)
    if unsharded is None:
        raise GradError(f"pcgrad: FSDP2 has not unsharded {param._param_fqn or 'a parameter'} yet: call pcgrad "
                        "with losses computed by a forward of the fully_shard model")
    return unsharded


def _fsdp_groups(managed: dict[int, Any]) -> list[Any]:
    """The groups whose successive means are the mean over the whole FSDP2 mesh, each rank having had its own data:
    the shard group, then under HSDP the replicate group."""
    info = next(iter(managed.values())).mesh_info
    return [info.shard_process_group] + ([info.replicate_process_group] if hasattr(info, "replicate_process_group")
                                         else [])


def _average(tensors: list[torch.Tensor], group: object) -> None:
    """Replace ``tensors`` by their mean over the processes of ``group``: one all-reduce per device and dtype."""
    import torch.distributed as dist

    for idx in buckets(tensors).values():
        chunk = pick(tensors, idx)
        flat = torch.cat([t.reshape(-1) for t in chunk])
        dist.all_reduce(flat, group=group)
        flat /= dist.get_world_size(group)
        for t, part in zip(chunk, flat.split([t.numel() for t in chunk])):
            t.copy_(part.view_as(t))


def _task_matrix(entries: Sequence[tuple[torch.Tensor, Sequence[torch.Tensor | None]]], tasks: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """(tasks x numel): row t is task t's gradient of the entries' parameters, zero where it does not reach one."""
    rows = [torch.cat([(gs[t] if gs[t] is not None else p.new_zeros(p.shape)).reshape(-1) for p, gs in entries])
            for t in range(tasks)]
    return torch.stack(rows).to(dtype)
