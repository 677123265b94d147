"""Keeping a DistributedDataParallel wrapper in step with the parameters that train.

DDP decides at construction which parameters it all-reduces: those with ``requires_grad``.
A layer unfrozen later is never synchronised (its replicas drift apart), and a layer frozen
later leaves the reducer waiting for a gradient that never comes. ``find_unused_parameters``
hides only the second problem, at the cost of a graph walk every step; ``_set_static_graph``
fixes neither. So after every freeze or unfreeze on a DDP model the reducer is rebuilt for
the new set of trainable parameters, as DDP itself does when it is unpickled
(``DistributedDataParallel.__setstate__``): same process group, bucket size, options and
communication hooks; no collective, so it costs no synchronisation, but every rank must
freeze and unfreeze alike, as they must build the wrapper alike.
"""

from __future__ import annotations

import sys

from torch import nn


def ddp_wrapper(model: nn.Module) -> nn.Module | None:
    """The DistributedDataParallel wrapper ``model`` is (compiled or not), or None; never imports torch.distributed."""
    parallel = sys.modules.get("torch.nn.parallel.distributed")
    ddp = getattr(parallel, "DistributedDataParallel", None)
    model = getattr(model, "_orig_mod", model)  # torch.compile(ddp_model)
    return model if ddp is not None and isinstance(model, ddp) else None


def rebuild_reducer(ddp: nn.Module) -> None:
    """Give ``ddp`` a new reducer over the parameters that require grad now."""
    import torch.distributed as dist

    if getattr(ddp, "_delay_all_reduce_all_params", False):
        return  # every parameter is all-reduced by one hook after backward: no reducer to rebuild
    ddp.reducer._remove_autograd_hooks()
    parameters, expect_sparse = ddp._build_params_for_reducer()
    if not parameters:
        # Everything frozen: nothing to all-reduce, and torch builds no reducer over nothing.
        # The old one, its hooks off, serves forward passes until a layer is unfrozen.
        return
    names = ddp._build_debug_param_to_name_mapping(parameters)
    ddp._ddp_init_helper(parameters, expect_sparse, names, ddp.static_graph)
    if ddp.static_graph:  # the new reducer records the graph again in its first backward
        ddp.reducer._set_static_graph()
        ddp.logger._set_static_graph()
        ddp._static_graph_delay_allreduce_enqueued = False
    for hook, state in ddp._comm_hooks:
        dist._register_comm_hook(ddp.reducer, state, hook)
    ddp._has_rebuilt_buckets = False
    if ddp._use_python_reducer:
        for handle in ddp._accum_grad_hooks:
            handle.remove()
        ddp._accum_grad_hooks = []
        ddp._register_accum_grad_hook()


def fsdp_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` (FSDP2) manages ``model``: it follows requires_grad by itself."""
    fsdp = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    return fsdp is not None and any(isinstance(m, fsdp) for m in model.modules())


def fsdp_params(model: nn.Module) -> dict[int, object]:
    """id -> FSDP2's ``FSDPParam`` for each tensor that stands for a parameter ``fully_shard`` manages: the sharded
    parameter and, once FSDP2 made it, the unsharded one it swaps in for forward and backward (the one
    ``named_parameters()`` returns between a forward and its backward, e.g. with ``reshard_after_forward=False``)."""
    fsdp = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    out: dict[int, object] = {}
    for module in model.modules() if fsdp is not None else ():
        group = module._get_fsdp_state()._fsdp_param_group if isinstance(module, fsdp) else None
        for param in group.fsdp_params if group is not None else ():
            out[id(param.sharded_param)] = param
            if (unsharded := getattr(param, "_unsharded_param", None)) is not None:
                out[id(unsharded)] = param
    return out


def built_before_sharding(model: nn.Module, held: list) -> bool:
    """Whether an optimizer holding ``held`` was built on ``model`` before ``fully_shard`` replaced its parameters:
    the model is sharded, and the optimizer holds only plain tensors, none of them the model's. (An optimizer
    over another model, a GAN's second one, or a head outside ``model``, holds that model's parameters instead.)"""
    if not held or not fsdp_params(model):
        return False
    own = {id(p) for p in model.parameters()}
    return not any(id(t) in own or hasattr(t, "_local_tensor") for t in held)
