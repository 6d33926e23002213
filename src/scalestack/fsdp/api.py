"""``fully_shard`` and ``FSDPModule``: FSDP2's entry point and module methods, same names and meanings.

``from scalestack import fully_shard, MixedPrecisionPolicy, FSDPModule`` is the switch from
``torch.distributed.fsdp``. Two keywords are ours: ``granularity`` (where tensors may be cut) and
``max_buffers`` (let the planner split a unit into several flat buffers when that lowers padding).
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh

from ..planner.granularity import GranularityRule, resolve_granularity
from ..planner.search import Plan
from .init import build_unit
from .mesh import ShardGroups, post_forward_group, shard_groups
from .mixed_precision import MixedPrecisionPolicy
from .state import STATE_ATTR, FSDPState, state_of
from .state_dict_hooks import ASSIGN_REFUSED
from .unit import ShardedUnit, ShardState

_NO_MIXED_PRECISION = MixedPrecisionPolicy()
_applying: contextvars.ContextVar[bool] = contextvars.ContextVar("scalestack_applying", default=False)


class UnshardHandle:
    """Returned by ``unshard(async_op=True)``: ``wait()`` makes the full parameters usable."""

    def __init__(self, unit: ShardedUnit | None):
        self._unit = unit

    def wait(self) -> None:
        if self._unit is not None:
            self._unit.wait_for_unshard()


class FSDPModule:
    """Mixed into the class of every module passed to ``fully_shard`` (FSDP2's method names and meanings)."""

    def unshard(self, async_op: bool = False) -> UnshardHandle | None:
        """All-gather this unit's parameters; with ``async_op`` return a handle to ``wait()`` on."""
        unit = state_of(self).unit
        if unit is not None:
            if unit.state is ShardState.PARTLY_SHARDED:  # partial copies serve backward only: maybe stale now
                unit.reshard()
            unit.unshard(async_op=True)
        handle = UnshardHandle(unit)
        if async_op:
            return handle
        handle.wait()
        return None

    def reshard(self) -> None:
        """Free the full parameters; the module shows its sharded pieces again."""
        unit = state_of(self).unit
        if unit is not None:
            unit.reshard()

    def set_requires_gradient_sync(self, requires_gradient_sync: bool, *, recurse: bool = True) -> None:
        """False: accumulate full gradients locally (no reduce-scatter) until it is set back to True."""
        for unit in _units_under(self, recurse):
            unit.requires_gradient_sync = bool(requires_gradient_sync)

    def set_reshard_after_forward(self, reshard_after_forward: bool, *, recurse: bool = True) -> None:
        """False: keep the full parameters from forward to backward (no re-gather, more memory); True: reshard
        fully (also replacing an int given to fully_shard, as in FSDP2)."""
        if not isinstance(reshard_after_forward, bool):
            raise ValueError(f"reshard_after_forward must be a bool, got {reshard_after_forward!r}")
        for m in self.modules() if recurse else [self]:
            if (s := state_of(m)) is not None:
                s.reshard_after_forward = reshard_after_forward
                s.post_forward_group = None

    def set_reshard_after_backward(self, reshard_after_backward: bool, *, recurse: bool = True) -> None:
        """False: keep the full parameters after backward, so the next micro-batch's forward needs no gather.
        Set it back to True for the last micro-batch: the optimizer step changes the shards."""
        for unit in _units_under(self, recurse):
            unit.reshard_after_backward = bool(reshard_after_backward)

    def set_is_last_backward(self, is_last_backward: bool) -> None:
        """False: the end of backward does not wait for reduce-scatters still in flight (micro-batching)."""
        state = state_of(self)
        state.is_last_backward = bool(is_last_backward)
        if state.ctx is not None:
            state.ctx.is_last_backward = state.is_last_backward

    def set_modules_to_forward_prefetch(self, modules: list[FSDPModule]) -> None:
        """Units whose all-gather is issued when this unit's forward starts (replaces the implicit order)."""
        state_of(self).forward_prefetch = _prefetch_states(modules, "set_modules_to_forward_prefetch")

    def set_modules_to_backward_prefetch(self, modules: list[FSDPModule]) -> None:
        """Units whose all-gather is issued when this unit's backward starts (replaces the implicit order)."""
        state_of(self).backward_prefetch = _prefetch_states(modules, "set_modules_to_backward_prefetch")

    def reset_iter_state(self) -> None:
        """After an exception in forward or backward: wait for what is in flight, reshard, forget the step."""
        ctx = state_of(self).ctx
        if ctx is not None:
            ctx.reset()

    def _apply(self, fn: Callable, recurse: bool = True):  # .to(), .half(), .cuda(), to_empty() (nn.Module._apply)
        if _applying.get():  # a unit nested in one being converted: the outermost call did the work
            return super()._apply(fn, recurse)
        units = _units_under(self, recurse)
        for unit in units:
            if unit.on_meta:  # to_empty(device=...) gives real, uninitialized shards; .to() of meta data raises
                out = fn(torch.empty(1, dtype=unit.dtype, device="meta"))
                if out.device.type != "meta" and out.dtype == unit.dtype:
                    unit.allocate(out.device)
                    continue
            else:
                probe = torch.empty(1, dtype=unit.dtype, device=unit.device)
                out = fn(probe)
                if out is not probe and out.dtype == unit.dtype and out.device == unit.device:
                    raise RuntimeError(
                        f"{fn} makes new tensors for the sharded parameters of unit {unit.name!r}, detaching them "
                        "from their shards (training would update tensors that are never gathered); apply it before "
                        "fully_shard (to_empty is for a model built on the meta device)"
                    )
            if out.dtype != unit.dtype or out.device != unit.device:
                raise RuntimeError(
                    f"this module was sharded in {unit.dtype} on {unit.device}; changing the dtype or device of "
                    f"sharded parameters (to {out.dtype} on {out.device}) would detach them from their shards. Call "
                    ".to()/.half()/.cuda() before fully_shard, or use MixedPrecisionPolicy(param_dtype=...) "
                    "to compute in another dtype"
                )
        # the units' parameters are not nn.Module's to convert: hidden (None keeps the registration order)
        shown = [(m, attr, m._parameters[attr]) for u in units for p in u.params for m, attr in p.uses]
        for m, attr, _ in shown:
            m._parameters[attr] = None
        token = _applying.set(True)
        try:
            return super()._apply(fn, recurse)
        finally:
            _applying.reset(token)
            for m, attr, t in shown:
                m._parameters[attr] = t

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False):
        if assign:  # refused before anything is assigned (the hooks refuse it for submodules too)
            raise ValueError(ASSIGN_REFUSED.format(where=type(self).__bases__[-1].__name__))
        return super().load_state_dict(state_dict, strict=strict)


def _units_under(module: nn.Module, recurse: bool) -> list[ShardedUnit]:
    states = [state_of(m) for m in (module.modules() if recurse else [module])]
    return list(dict.fromkeys(s.unit for s in states if s is not None and s.unit is not None))


def _prefetch_states(modules: list[FSDPModule], method: str) -> list[FSDPState]:
    if not isinstance(modules, (list, tuple)):
        raise TypeError(f"{method} takes a list of modules passed to fully_shard, got {type(modules).__name__}")
    for m in modules:
        if not isinstance(m, FSDPModule):
            raise ValueError(f"{method}: {type(m).__name__} was not passed to fully_shard, so it cannot be prefetched")
    return [state_of(m) for m in modules]


def _check_options(mp_policy: Any, shard_placement_fn: Any, offload_policy: Any, granularity: Any,
                   max_buffers: Any) -> None:  # fmt: skip
    if not isinstance(mp_policy, MixedPrecisionPolicy):
        raise TypeError(
            f"mp_policy must be a scalestack.MixedPrecisionPolicy, got {type(mp_policy).__name__}; import it "
            "from scalestack (same fields as torch.distributed.fsdp.MixedPrecisionPolicy)"
        )
    if shard_placement_fn is not None:
        raise ValueError(
            "shard_placement_fn is not supported: scalestack cuts tensors by granularity= ('element', 'row', "
            "k rows, 'tensor' or a callable (name, param) -> one of these), never on a chosen dim"
        )
    if offload_policy is not None and type(offload_policy).__name__ != "OffloadPolicy":
        raise ValueError(f"offload_policy {type(offload_policy).__name__} is not supported (CPU offload is not built)")
    if granularity is not None and not callable(granularity):
        resolve_granularity(granularity, "", torch.empty(0))  # fail now on an unknown value
    if not isinstance(max_buffers, int) or isinstance(max_buffers, bool):
        raise TypeError(f"max_buffers must be a positive int (1: one flat buffer per unit), got {max_buffers!r}")
    if max_buffers < 1:
        raise ValueError(f"max_buffers must be a positive int (1: one flat buffer per unit), got {max_buffers}")


def _resolve_reshard(reshard_after_forward: Any, groups: ShardGroups) -> tuple[bool | None, ProcessGroup | None]:
    """(reshard fully after forward, the post-forward group when resharding to blocks of n ranks)."""
    if reshard_after_forward is None or isinstance(reshard_after_forward, bool):
        return reshard_after_forward, None
    world = groups.shard_size
    n = reshard_after_forward
    if isinstance(n, int) and n in (1, world):
        return n == world, None  # 1: keep everything gathered; W: reshard fully
    if isinstance(n, int) and 1 < n < world and world % n == 0:
        return True, post_forward_group(groups, n)
    raise ValueError(
        f"reshard_after_forward must be None, a bool or an int n dividing the shard group size {world} (keep a "
        f"copy sharded over n ranks between forward and backward, e.g. the devices of one node), got {n!r}"
    )


def fully_shard(
    module: nn.Module | list[nn.Module],
    *,
    mesh: DeviceMesh | ProcessGroup | None = None,
    reshard_after_forward: bool | int | None = None,
    shard_placement_fn: Callable | None = None,
    mp_policy: MixedPrecisionPolicy = _NO_MIXED_PRECISION,
    offload_policy: Any = None,
    ignored_params: set[nn.Parameter] | None = None,
    granularity: GranularityRule = None,
    max_buffers: int = 1,
) -> nn.Module | list[nn.Module]:
    """Shard ``module``'s parameters (those not in an already sharded submodule) as one unit.

    ``mesh``: None (the default group), a process group, a 1-D DeviceMesh, or for hybrid sharding (HSDP) a
    2-D DeviceMesh named ("replicate", "shard"): sharded within each shard group, gradients averaged across
    replicas. ``reshard_after_forward=n`` (an int dividing the shard group size) keeps a copy sharded over n
    ranks between forward and backward, so backward's all-gather spans n ranks (one node).

    As in FSDP2: call it on submodules first (each becomes a unit), then on the root; a list of modules
    becomes one unit; the module's class gains the ``FSDPModule`` methods; ``reshard_after_forward=None``
    means True except for the root. ``ignored_params`` stay unsharded and unsynchronized.

    ``granularity`` says where a tensor may be cut between ranks: ``"element"``, ``"row"``, an int k
    (blocks of k rows), ``"tensor"`` or a callable ``(name, param) -> one of these``; the default,
    ``"element"``, never pads. Under every granularity a piece keeps its tensor's dimensions. ``max_buffers``
    > 1 lets the planner split the unit into up to that many flat buffers (each its own collective) when
    that lowers padding; the unit still gathers and frees as one.
    """
    modules = list(module) if isinstance(module, (list, tuple)) else [module]
    if not modules or not all(isinstance(m, nn.Module) for m in modules):
        raise TypeError(f"fully_shard takes an nn.Module or a non-empty list of them, got {module!r:.80}")
    for m in modules:
        if isinstance(m, FSDPModule):
            raise ValueError(f"fully_shard was already applied to this {type(m).__bases__[-1].__name__}; call it once")
    _check_options(mp_policy, shard_placement_fn, offload_policy, granularity, max_buffers)
    groups = shard_groups(mesh)
    reshard, post_forward = _resolve_reshard(reshard_after_forward, groups)
    ignored = {id(p) for p in ignored_params or ()}
    unit = build_unit(modules, groups, mp_policy, granularity, ignored, max_buffers)
    state = FSDPState(modules, unit, groups.shard, mp_policy, reshard, post_forward)
    for m in modules:
        m.__dict__[STATE_ATTR] = state
        m.register_forward_pre_hook(state.pre_forward, prepend=True, with_kwargs=True)
        m.register_forward_hook(state.post_forward, with_kwargs=True)
        m.__class__ = _fsdp_class(type(m))
    return module


@functools.cache
def _fsdp_class(cls: type) -> type:
    return type(f"FSDP{cls.__name__}", (FSDPModule, cls), {})


def register_fsdp_forward_method(module: nn.Module, method_name: str) -> None:
    """Run ``module.<method_name>`` (e.g. ``generate``) between the unit's pre- and post-forward hooks, so it
    sees full parameters. A no-op for a module not passed to ``fully_shard`` (as in FSDP2)."""
    if not isinstance(module, FSDPModule):
        return
    if not callable(getattr(module, method_name, None)):
        raise ValueError(f"{type(module).__name__} has no method {method_name!r}")
    method = getattr(module, method_name)
    state = state_of(module)

    @functools.wraps(method)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        args, kwargs = state.pre_forward(module, args, kwargs)
        return state.post_forward(module, args, kwargs, method(*args, **kwargs))

    setattr(module, method_name, wrapped)


def layout(module: nn.Module) -> Plan:
    """The plan of the unit that ``fully_shard(module)`` created: ``Plan.buffers`` holds one ``Layout`` per
    flat buffer (one unless ``max_buffers`` > 1 and splitting paid), each naming the tensors it holds."""
    if not isinstance(module, FSDPModule):
        raise ValueError(f"{type(module).__name__} was not passed to fully_shard, so it has no layout")
    unit = state_of(module).unit
    if unit is None:
        raise ValueError(f"{type(module).__name__} is a unit with no parameters of its own, so it has no layout")
    return unit.plan


def units(module: nn.Module) -> list[ShardedUnit]:
    """Every unit in ``module``'s tree (outermost first)."""
    return _units_under(module, True)


__all__ = ["FSDPModule", "ShardState", "UnshardHandle", "fully_shard", "layout", "register_fsdp_forward_method"]
