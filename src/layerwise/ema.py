"""An exponential moving average of a model's weights: fused, float32 for half models, subsets, sharded.

The shadow of each parameter has the parameter's layout: a plain tensor for a plain parameter,
a DTensor sharded like it for an FSDP2 (``fully_shard``) parameter, whose update then touches
only the local shard (no collective). Parameters that are views tiling one buffer (see
:func:`~layerwise.flatten_parameters`) are averaged with a single kernel over that buffer.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping
from itertools import chain
from typing import Any, Literal

import torch
from torch import nn

from . import _pages
from ._model_state import unwrap_ddp
from ._shadow import Bucket, acc_dtype, flat_view, local, planned, reshard, shadow_like
from ._tensors import named_tensor_groups, require_flag, require_int, require_module
from .errors import OptionError, OptionTypeError, StateError
from .select import Selector, as_selectors, unwrap_compiled
from .select import select as _select

__all__ = ["EMA"]


def _check_int(name: str, value: Any, low: int) -> int:
    return require_int(value, name, "EMA", low, "a number of calls")


def _check_decay(value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise OptionTypeError(f"EMA option decay={value!r} must be a number in [0, 1], e.g. 0.999")
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise OptionError(f"EMA option decay={value} must be in [0, 1], e.g. 0.999 (the weight kept per update)")
    return float(value)


class EMA:
    """An exponential moving average of a model's parameters, updated with fused kernels.

    ``update()`` does ``shadow ← shadow + (1 − decay)·(param − shadow)`` with one
    ``torch._foreach_lerp_`` per device/dtype bucket (one ``lerp_`` when the parameters are
    views of one flat buffer, see :func:`~layerwise.flatten_parameters`). With ``warmup=N``
    the n-th update (n = 1, 2, ...) uses ``min(decay, (1 + n) / (10 + n))`` while n <= N, so
    early averages are not dominated by the random initialization: torch-ema's
    ``ExponentialMovingAverage`` (its ``num_updates`` rule, on every update) for any
    N >= (10·decay − 1) / (1 − decay). Without it the decay is constant, as timm's ``ModelEmaV3``
    and ``swa_utils.get_ema_multi_avg_fn``. ``update_after_step=K`` makes the first K + 1 updates
    copy the weights, so the average starts from them and not from the weights at creation:
    ``swa_utils.AveragedModel`` (K = 0) and timm's ``ModelEmaV3.update(model, step)``, as
    timm's training script calls it (K = its ``update_after_step``). ``every=k`` updates on every k-th call.
    ``select=`` tracks a subset (e.g. ``"**.lora_*"``: LoRA adapters only) and the buffers
    whose names it matches; by default every parameter and buffer. Buffers (BatchNorm
    statistics) are copied from the model (``buffers="copy"``, as ``swa_utils.AveragedModel``) or
    averaged too (``"ema"``, as timm's ``ModelEmaV3``; integer buffers are copied).
    ``device=`` keeps the shadows elsewhere (e.g. ``"cpu"`` for a GPU model). Tied parameters
    are averaged once; a ``torch.compile``d model or a ``DistributedDataParallel`` wrapper is tracked
    by its inner names (no ``_orig_mod.``, no ``module.``). Create the EMA after wrapping in DDP, or
    with every rank's model initialized alike: DDP copies rank 0's weights to every rank when it
    wraps, after an EMA made before has copied each rank's own.
    The average of a float16/bfloat16 model is kept in float32: with a
    decay of 0.999 most half-precision updates would round away. float32/float64 CPU weights, all
    contiguous in a dtype, are averaged by a C loop, bit for bit torch's ``lerp_`` (whose CPU
    kernel computes both of its formulas for every element) in 0.9x its time from memory, on CPUs
    where torch's own kernel fuses its multiply-add (AVX2, AVX-512): by default (``compile=None``)
    where layerwise was installed with its native kernels; ``compile=True`` builds them if needed
    (as in :func:`grad_stats`; :class:`MissingExtraError` without a C compiler); ``compile=False``
    keeps torch's ``lerp_``. On CPUs the shadows of one dtype are views into one buffer, in huge pages
    where Linux allows them: fewer TLB misses (on the benchmark VM an update is 1.7x faster than
    ``AveragedModel(multi_avg_fn)``; separate shadows gave 1.2x-1.55x by where they landed).

    On an FSDP2 model (``fully_shard``) each shadow is a DTensor sharded like its parameter:
    a rank holds only its shard and ``update()`` runs no collective; ``state_dict()`` holds
    those DTensors, so ``torch.distributed.checkpoint`` saves and reshards them.

    ``with ema.swapped(model):`` evaluates with the EMA weights and restores the training
    weights bit-identically; ``copy_to(model)`` keeps them; ``state_dict()`` resumes. If the
    model changes under the EMA (``model.to(torch.float16)``, a parameter replaced or added),
    ``update()`` raises :class:`~layerwise.StateError` naming what changed rather than
    averaging stale tensors: create the EMA after such changes.

    Example:
        >>> import layerwise as lw, torch
        >>> net = torch.nn.Linear(2, 1, bias=False)
        >>> _ = torch.nn.init.zeros_(net.weight)
        >>> ema = lw.EMA(net, decay=0.9)
        >>> _ = torch.nn.init.ones_(net.weight)   # a training step moved the weights
        >>> ema.update()
        >>> with ema.swapped(net):
        ...     print(net.weight.data)             # 10 % of the way from 0 to 1
        tensor([[0.1000, 0.1000]])
        >>> net.weight.data                        # the training weights are back
        tensor([[1., 1.]])
        >>> two = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
        >>> lw.EMA(two, select="1").names           # a subset: only these get a shadow
        ['1.weight', '1.bias']
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, *, warmup: int = 0, every: int = 1,
                 buffers: Literal["copy", "ema"] = "copy", select: Selector | Iterable[Selector] | None = None,
                 device: torch.device | str | None = None, foreach: bool | None = None,
                 update_after_step: int | None = None, compile: bool | None = None):
        require_module(model, "EMA")
        self.decay, self.warmup, self.every = _check_decay(decay), _check_int("warmup", warmup, 0), _check_int(
            "every", every, 1)
        self.update_after_step = None if update_after_step is None else _check_int(
            "update_after_step", update_after_step, 0)
        if buffers not in ("copy", "ema"):
            raise OptionError(f"EMA option buffers={buffers!r} must be 'copy' (copy them from the model) or 'ema'")
        if foreach not in (None, True, False):
            raise OptionTypeError(f"EMA option foreach={foreach!r} must be None, True or False")
        require_flag(compile, "compile", "EMA", none=True)
        try:
            self.device = None if device is None else torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise OptionError(f"EMA option device={device!r} is not a device: {e}") from None
        try:  # a device this machine lacks (cuda without a GPU, cuda:7 of 2): named now, not mid-construction
            if self.device is not None:
                torch.empty(0, device=self.device)
        except (RuntimeError, AssertionError) as e:  # torch asserts when it was built without CUDA
            raise OptionError(f"EMA option device={device!r} is not available here: {e}") from None
        model = unwrap_compiled(unwrap_ddp(model))  # tracked by the inner names, as checkpoint files hold them
        self.buffers, self.foreach, self.model, self.compile = buffers, foreach, model, compile
        try:
            self.selectors = as_selectors(select)
        except TypeError:
            self.selectors = (select,)
        bad = [s for s in self.selectors if not (isinstance(s, (str, type)) or callable(s))]
        if bad:
            raise OptionTypeError(f"EMA option select={select!r}: {bad[0]!r} is not a selector (a string, a module "
                                  "class or a callable (name, param) -> bool), nor a list of them")
        groups = named_tensor_groups(model)
        if self.selectors:
            chosen = {id(t) for t in _select(model, *self.selectors).params()}
            groups = [g for g in groups if id(g[1]) in chosen]
        if self.device is not None and any(hasattr(p, "_local_tensor") for _, p in groups):
            raise OptionError("EMA option device= is not supported for sharded (DTensor) parameters: their shadows "
                              "stay sharded on the parameters' devices; leave device unset")
        named_buffers = dict(model.named_buffers())
        if self.selectors:
            names = _select(named_buffers, *self.selectors, missing_ok=True).names() if named_buffers else []
            named_buffers = {n: named_buffers[n] for n in names}
        self.names = [names[0] for names, _ in groups]
        self._params = [p for _, p in groups]
        self._buffer_names, self._buffers = list(named_buffers), list(named_buffers.values())
        self._build()
        self.num_updates = 0
        self._calls = 0

    # ----------------------------------------------------------------------- layout and change checks

    @torch.no_grad()
    @torch.inference_mode(False)  # shadows built under inference_mode() must still take in-place updates
    def _build(self) -> None:
        """Make the shadows and prebuild the hot path: buckets of (shadow, live) local tensors per device
        and dtype, each bucket's shadows views into one buffer (in huge pages on CPU: see ``_pages``);
        where the live tensors tile one buffer, one flat shadow averaged with one kernel."""
        # Integer tensors (step counters, quantized weights) cannot be averaged: they are copied.
        averaged = [p.is_floating_point() or p.is_complex() for p in self._params]
        floats = [b.is_floating_point() and self.buffers == "ema" for b in self._buffers]
        self.shadow: list[torch.Tensor] = [  # plain averaged ones are made per bucket below
            shadow_like(p, self.device, float_shadow=a) if hasattr(p, "_local_tensor") or not a else p
            for p, a in zip(self._params, averaged)]
        self.shadow_buffers: list[torch.Tensor] = [
            b if f else shadow_like(b, self.device, float_shadow=False) for b, f in zip(self._buffers, floats)]
        slots = [(self.shadow, i) for i, a in enumerate(averaged) if a] + [
            (self.shadow_buffers, i) for i, f in enumerate(floats) if f]
        groups: dict[tuple, list[tuple[list, int]]] = {}
        for owner, i in slots:
            t = (self._params if owner is self.shadow else self._buffers)[i]
            groups.setdefault((t.device, t.dtype, hasattr(t, "_local_tensor")), []).append((owner, i))
        self._buckets = []
        for (_, _, sharded), members in groups.items():
            live = [local((self._params if owner is self.shadow else self._buffers)[i].detach())
                    for owner, i in members]
            flat_live = flat_view(live) if self.foreach is not False and not sharded else None
            dtype, device = acc_dtype(live[0].dtype), self.device or live[0].device
            if flat_live is not None:  # one kernel over the buffer the live tensors tile
                flat = _pages.empty(flat_live.numel(), dtype, device).copy_(flat_live)
                offset = 0
                for (owner, i), t in zip(members, live):
                    owner[i] = flat[offset:offset + t.numel()].view(t.shape)
                    offset += t.numel()
            elif not sharded:  # on CPU one buffer, in huge pages: see _pages
                for (owner, i), shadow, t in zip(members, _pages.packed_like(live, dtype, device), live):
                    owner[i] = shadow.copy_(t)
            bucket = Bucket([local(owner[i]) for owner, i in members], live, self.foreach)
            if flat_live is not None:
                bucket.shadow, bucket.flat = [flat], (flat, flat_live)
            bucket.compile(self.compile)
            self._buckets.append(bucket)
        copied = [(self.shadow, self._params, i) for i, a in enumerate(averaged) if not a] + [
            (self.shadow_buffers, self._buffers, i) for i, f in enumerate(floats) if not f]
        self._copied = ([local(shadow[i]) for shadow, _, i in copied], [local(live[i].detach()) for _, live, i in copied])
        self._walk = _slots(self.model)
        self._tracked = [local(t) for t in self._params + self._buffers]
        self._planned = planned(self._buckets)  # if their memory moves, the plans are made again
        self._shapes = [(t.dtype, t.device, t.shape) for t in self._params + self._buffers]
        self._layout = self._signature()

    def _signature(self) -> tuple:
        """What must not change under the EMA, in ~40 µs for 150 tensors: the identity of every module's
        parameters, buffers and children, and the memory each tracked tensor is in (the old memory
        stays referenced by the prebuilt buckets, so a re-allocated tensor cannot reuse its address).
        Iterated by C functions (map, chain): a Python loop over 400 slots costs as much as the rest."""
        return (tuple(map(id, chain.from_iterable(map(dict.values, self._walk)))),
                tuple(map(torch.Tensor.data_ptr, self._tracked)), tuple(map(torch.Tensor.data_ptr, self._planned)))

    def _check_unchanged(self) -> None:
        if self._signature() == self._layout or (reshard(self.model) and self._signature() == self._layout):
            return
        params = dict(self.model.named_parameters(remove_duplicate=False))
        changes = [f"{n} was replaced by a new parameter" for n, p in zip(self.names, self._params)
                   if params.get(n) is not p]
        wanted = _select(self.model, *self.selectors, missing_ok=True).params() if self.selectors else params.values()
        new = {id(p) for p in wanted} - {id(p) for p in self._params}
        changes += [f"{n} is a new parameter" for n, p in params.items() if id(p) in new]
        named_buffers = dict(self.model.named_buffers())
        changes += [f"buffer {n} was replaced (by model.to()?)" for n, b in zip(self._buffer_names, self._buffers)
                    if named_buffers.get(n) is not b]
        for name, t, (dtype, device, shape) in zip(self.names + self._buffer_names, self._params + self._buffers,
                                                   self._shapes):
            if (t.dtype, t.device, t.shape) != (dtype, device, shape):
                changes.append(f"{name} was {dtype} {tuple(shape)} on {device}, is now {t.dtype} {tuple(t.shape)} "
                               f"on {t.device}")
        if not changes:
            if self._signature()[1] == self._layout[1]:  # only untracked tensors, modules or shadows moved
                self._walk = _slots(self.model)
                if self._signature()[2] != self._layout[2]:  # a shadow's memory was replaced (shadow.data = ...)
                    for bucket in [b for b in self._buckets if b.native is not None]:
                        bucket.compile(self.compile)
                    self._planned = planned(self._buckets)
                self._layout = self._signature()
                return
            changes = ["parameters were moved to new memory (model.to(), load_state_dict(assign=True), re-flattened)"]
        raise StateError(f"the model changed under this EMA: {'; '.join(changes[:5])}"
                         f"{' ...' if len(changes) > 5 else ''}. An EMA tracks the tensors it was created with: "
                         "create it after converting or editing the model (and load_state_dict() an old state)")

    # ----------------------------------------------------------------------- averaging

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if self.update_after_step is not None and self.num_updates <= self.update_after_step:
            return 0.0  # the average starts from the weights of this update
        if self.num_updates < self.warmup:  # n counts this update, from 1: torch-ema's and TensorFlow's num_updates
            n = self.num_updates + 1
            return min(self.decay, (1 + n) / (10 + n))
        return self.decay

    @torch.no_grad()
    def update(self) -> None:
        """Fold the model's current weights into the average (on every ``every``-th call)."""
        self._check_unchanged()
        self._calls += 1
        if self._calls % self.every:
            return
        for bucket in self._buckets:
            bucket.average(1.0 - self.current_decay())
        if self._copied[0]:
            torch._foreach_copy_(*self._copied)
        self.num_updates += 1

    def _targets(self, model: nn.Module | None) -> list[torch.Tensor]:
        """The local tensors of ``model`` (default: the tracked one) that the shadows belong in."""
        if model is not None:
            require_module(model, "EMA.copy_to (or swapped)")
        model = None if model is None else unwrap_compiled(unwrap_ddp(model))
        if model is not None:
            reshard(model)
        if model is None or model is self.model:
            self._check_unchanged()
            return [local(t.detach()) for t in self._params + self._buffers]
        params = dict(model.named_parameters(remove_duplicate=False))
        named_buffers = dict(model.named_buffers())
        missing = [n for n in self.names if n not in params] + [n for n in self._buffer_names if n not in named_buffers]
        if missing:
            prefix = next((p for p in ("module.", "_orig_mod.", "model.") if all(
                f"{p}{n}" in params for n in self.names)), None)
            raise StateError(f"{type(model).__name__} lacks {', '.join(missing[:5])}"
                             f"{' ...' if len(missing) > 5 else ''}: it is not the model this EMA tracks"
                             + (f" (its names carry the prefix {prefix!r} of a wrapper: pass the inner model)"
                                if prefix else ""))
        found = [params[n] for n in self.names] + [named_buffers[n] for n in self._buffer_names]
        wrong = [f"{n}: {tuple(t.shape)} vs {tuple(s.shape)}" for n, t, s in zip(
            self.names + self._buffer_names, found, self.shadow + self.shadow_buffers) if t.shape != s.shape]
        if wrong:
            raise StateError(f"{type(model).__name__} has other shapes than this EMA: {'; '.join(wrong[:5])}")
        return [local(t.detach()) for t in found]

    def _shadow_locals(self) -> list[torch.Tensor]:
        return [local(s) for s in self.shadow + self.shadow_buffers]

    @contextlib.contextmanager
    def swapped(self, model: nn.Module | None = None) -> Iterator[nn.Module | None]:
        """Put the averaged weights into ``model`` (default: the tracked one) for the block, then
        restore the training weights exactly. Gradients are not touched; a sharded model stays sharded."""
        live = self._targets(model)
        with torch.no_grad():
            saved = [t.clone() for t in live]
            _copy(live, self._shadow_locals())
        try:
            yield model
        finally:
            with torch.no_grad():
                _copy(live, saved)
            reshard(model or self.model)  # the next forward gathers the training shards again

    @torch.no_grad()
    def copy_to(self, model: nn.Module | None = None) -> None:
        """Load the averaged weights into ``model`` for good (e.g. before saving the EMA model)."""
        _copy(self._targets(model), self._shadow_locals())
        reshard(model or self.model)

    # ----------------------------------------------------------------------- saving and resuming

    def state_dict(self) -> dict[str, Any]:
        """Options, counters and the shadows (by parameter and buffer name); sharded shadows stay DTensors,
        so ``torch.distributed.checkpoint.save(ema.state_dict(), ...)`` saves them in parallel."""
        return {"decay": self.decay, "warmup": self.warmup, "every": self.every, "num_updates": self.num_updates,
                "calls": self._calls, "shadow": dict(zip(self.names, self.shadow)),
                "buffers": dict(zip(self._buffer_names, self.shadow_buffers))}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict` (or from ``torch.distributed.checkpoint.load`` into one).
        A sharded EMA also loads the full tensors of an unsharded one (each rank takes its slice).

        Everything is checked first (options, counters, every name, shape, dtype and sharding) and
        every problem reported in one :class:`~layerwise.StateError`; on error nothing changes.
        """
        problems = _state_problems(self, state)
        if problems:
            raise StateError(f"this state dict does not fit this EMA ({len(problems)} problem"
                             f"{'s' * (len(problems) > 1)}): " + "; ".join(problems))
        sources = [state["shadow"][n] for n in self.names] + [state["buffers"][n] for n in self._buffer_names]
        _copy(self._shadow_locals(), [_local_part(t, mine) for t, mine in zip(sources, self.shadow + self.shadow_buffers)])
        self.decay, self.warmup, self.every = float(state["decay"]), int(state["warmup"]), int(state["every"])
        self.num_updates, self._calls = int(state["num_updates"]), int(state["calls"])


def _local_part(saved: torch.Tensor, mine: torch.Tensor) -> torch.Tensor:
    """What this rank loads of a saved tensor: its local shard, or, for a full tensor (saved by one
    process) loaded into a sharded shadow, this rank's slice of it (no collective)."""
    if hasattr(mine, "_local_tensor") and not hasattr(saved, "_local_tensor"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(saved.to(local(mine).device), mine.device_mesh, mine.placements,
                                 src_data_rank=None).to_local()
    return local(saved)


def _slots(model: nn.Module) -> list[dict]:
    """Every module's parameter, buffer and child dicts: what replacing a parameter or module changes."""
    return [d for m in model.modules() for d in (m._parameters, m._buffers, m._modules)]


def _copy(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    if dst:
        torch._foreach_copy_(dst, src)


def _state_problems(ema: EMA, state: Any) -> list[str]:
    if not isinstance(state, Mapping):
        return [f"expected the dict of EMA.state_dict(), got {type(state).__name__}"]
    keys = ("decay", "warmup", "every", "num_updates", "calls", "shadow", "buffers")
    problems = [f"it lacks {k!r}" for k in keys if k not in state]
    if problems:
        return problems
    checks = (("decay", _check_decay), ("warmup", lambda v: _check_int("warmup", v, 0)),
              ("every", lambda v: _check_int("every", v, 1)), ("num_updates", lambda v: _check_int("num_updates", v, 0)),
              ("calls", lambda v: _check_int("calls", v, 0)))
    for key, check in checks:
        try:
            check(state[key])
        except OptionError as e:
            problems.append(str(e))
    for part, names, ours in (("shadow", ema.names, ema.shadow), ("buffers", ema._buffer_names, ema.shadow_buffers)):
        given = state[part]
        if not isinstance(given, Mapping):
            problems.append(f"{part!r} is a {type(given).__name__}, not a dict of tensors")
            continue
        problems += [f"{part} lacks {n}" for n in names if n not in given]
        problems += [f"{part} has {n}, which this EMA does not track" for n in given if n not in names]
        for n, mine in [(n, mine) for n, mine in zip(names, ours) if n in given]:  # the missing are named above
            t = given[n]
            if not isinstance(t, torch.Tensor):
                problems.append(f"{part}[{n!r}] is a {type(t).__name__}, not a tensor")
            elif t.shape != mine.shape or t.dtype != mine.dtype:
                problems.append(f"{n}: {tuple(t.shape)} {t.dtype} in the state dict, {tuple(mine.shape)} {mine.dtype} here")
            elif hasattr(t, "_local_tensor") and (local(t).shape != local(mine).shape or getattr(
                    mine, "placements", None) != t.placements):
                problems.append(f"{n}: sharded differently ({tuple(local(t).shape)} locally vs "
                                f"{tuple(local(mine).shape)} here); load it with torch.distributed.checkpoint")
    return problems
