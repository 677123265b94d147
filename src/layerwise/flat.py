"""Flat parameter storage: every parameter (and its gradient) a view into one buffer per dtype and device.

A model whose parameters tile one buffer can be read and written with a single kernel over that
buffer instead of one per tensor (or one foreach launch per bucket): :class:`~layerwise.EMA`
detects this and averages with one ``lerp_``. It is the layout DDP's
``gradient_as_bucket_view`` and FSDP1's flat parameters use, offered for plain modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from . import _pages
from ._tensors import buckets, named_tensor_groups, require_module
from .errors import StateError
from .select import unwrap_compiled

__all__ = ["FlatParameters", "flatten_parameters"]


@dataclass
class FlatParameters:
    """What :func:`flatten_parameters` built: per ``(device, dtype)``, the 1-D buffer the parameters
    view (``params``) and the aligned 1-D buffer their gradients view (``grads``; the entries of
    parameters that do not require a gradient stay zero). ``remove()`` stops re-binding gradients.

    Example:
        >>> import layerwise as lw, torch
        >>> flat = lw.flatten_parameters(torch.nn.Linear(3, 2))
        >>> [tuple(t.shape) for t in flat.params.values()]
        [(8,)]
    """

    params: dict[tuple[torch.device, torch.dtype], torch.Tensor]
    grads: dict[tuple[torch.device, torch.dtype], torch.Tensor]
    handles: list[RemovableHandle] = field(default_factory=list, repr=False)

    def remove(self) -> None:
        """Remove the gradient hooks (the parameters stay views of their buffers)."""
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _rebind_grad(view: torch.Tensor):
    def hook(p: torch.Tensor) -> None:
        # Autograd accumulates in place into an existing .grad (our view); only after
        # zero_grad(set_to_none=True) does it allocate a new one, which is copied back here.
        if p.grad is not None and p.grad.data_ptr() != view.data_ptr():
            view.copy_(p.grad)
            p.grad = view
    return hook


@torch.inference_mode(False)  # under inference_mode the buffers would be inference tensors: no backward through them
@torch.no_grad()
def flatten_parameters(model: nn.Module) -> FlatParameters:
    """Lay the parameters of ``model`` out as views into one contiguous buffer per dtype and device.

    Each distinct parameter (a tied one once) keeps its identity (optimizers built before or
    after keep working, fused and foreach paths included), its values and ``requires_grad``;
    only its memory moves, in model order. Gradients become views of an aligned buffer: autograd
    accumulates into them in place, and a hook re-binds a gradient that ``zero_grad()`` set to
    None after its next accumulation (one copy; ``zero_grad(set_to_none=False)`` avoids it).
    ``state_dict``/``load_state_dict`` are unchanged (loading copies into the views). Parameters
    lose a non-contiguous layout (channels-last). ``model.to()`` afterwards re-allocates each
    parameter: flatten again after it. Sharded (DTensor) parameters are refused: FSDP2 already
    keeps each rank's shard of a parameter group in one buffer. On Linux CPUs both buffers sit in
    transparent huge pages where the system allows them (see :class:`EMA`).

    Example:
        >>> import layerwise as lw, torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
        >>> flat = lw.flatten_parameters(net)
        >>> buffer = flat.params[(torch.device("cpu"), torch.float32)]
        >>> buffer.numel(), net[1].bias.data_ptr() == buffer[-2:].data_ptr()
        (26, True)
        >>> net(torch.ones(1, 3)).sum().backward()
        >>> net[1].bias.grad.data_ptr() == flat.grads[(torch.device("cpu"), torch.float32)][-2:].data_ptr()
        True
    """
    require_module(model, "flatten_parameters")
    groups = named_tensor_groups(unwrap_compiled(model))
    params, names = [p for _, p in groups], [names[0] for names, _ in groups]
    sharded = [n for n, p in zip(names, params) if hasattr(p, "_local_tensor")]
    if sharded:
        raise StateError(f"{', '.join(sharded[:3])} {'is a' if len(sharded) == 1 else 'are'} sharded (DTensor) "
                         "parameter(s): flatten_parameters lays out plain parameters; FSDP2 already keeps each "
                         "rank's shard in one buffer, so call it before fully_shard or not at all")
    sparse_ids = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse}
    sparse = [n for n, p in zip(names, params) if id(p) in sparse_ids or p.grad is not None and p.grad.is_sparse]
    if sparse:  # a dense gradient buffer cannot hold them: autograd would fail copying into it mid-backward
        raise StateError(f"{', '.join(sparse[:3])} get{'s' if len(sparse) == 1 else ''} sparse gradients "
                         "(Embedding(sparse=True)): flatten_parameters lays gradients out densely; build the "
                         "embedding with sparse=False to flatten this model")
    # Build everything first: a failure (out of memory) leaves the model as it was.
    plan = []
    for (device, dtype), idx in buckets(params).items():
        members = [params[i] for i in idx]
        # In huge pages on CPU (see _pages): every kernel over the buffers takes fewer TLB misses.
        flat = _pages.empty(sum(p.numel() for p in members), dtype, device)
        torch.cat([p.detach().reshape(-1) for p in members], out=flat)
        grad_flat = _pages.empty(flat.numel(), dtype, device).zero_()
        plan.append(((device, dtype), members, flat, grad_flat))
    result = FlatParameters({}, {})
    for key, members, flat, grad_flat in plan:
        offset = 0
        for p in members:
            n = p.numel()
            p.data = flat[offset:offset + n].view(p.shape)
            view = grad_flat[offset:offset + n].view(p.shape)
            if p.grad is not None:
                view.copy_(p.grad)
                p.grad = view
            if p.requires_grad:
                result.handles.append(p.register_post_accumulate_grad_hook(_rebind_grad(view)))
            offset += n
        result.params[key], result.grads[key] = flat, grad_flat
    return result
