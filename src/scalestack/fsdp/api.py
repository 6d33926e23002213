"""``fully_shard``: the FSDP2-shaped entry point, the module mixin and the hooks that drive the units.

Hooks are thin: they find the module's ``FSDPState`` and call into its ``ShardedUnit`` and the shared
``_Iteration`` of the root, which owns the order of units (for prefetch) and the end of backward.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh
from torch.utils._pytree import tree_flatten, tree_map

from . import collectives as comm
from .granularity import GranularityRule, cuts_for, resolve_granularity
from .layout import Layout, TensorSpec
from .mixed_precision import MixedPrecision
from .planner import Plan, plan_buffers, plan_unit
from .unit import FlatBuffer, ManagedParam, ShardedUnit

_OWNER = "_scalestack_unit"  # set on every parameter a unit owns (original and sharded objects)
_STATE = "_scalestack_state"
_ALIGN_BYTES = 16


class TrainingState(Enum):
    IDLE = auto()
    FORWARD = auto()
    BACKWARD = auto()


class UnshardHandle:
    """Returned by ``unshard(async_op=True)``: ``wait()`` makes the full parameters usable."""

    def __init__(self, units: list[ShardedUnit]):
        self._units = units

    def wait(self) -> None:
        for unit in self._units:
            unit.wait_for_unshard()


@dataclass(eq=False)
class FSDPState:
    module: nn.Module
    unit: ShardedUnit | None
    group: ProcessGroup
    mixed_precision: MixedPrecision | None
    forward_prefetch: list[FSDPState] | None = None
    backward_prefetch: list[FSDPState] | None = None
    iteration: _Iteration | None = None  # set at lazy init, shared by every state under one root
    is_root: bool = False


@dataclass(eq=False)
class _Iteration:
    """What the root knows of one step: unit order (for implicit prefetch) and the end of backward."""

    states: list[FSDPState]
    state: TrainingState = TrainingState.IDLE
    # insertion-ordered sets (states hash by identity): the hooks add to them on every forward
    forward_order: dict[FSDPState, None] = field(default_factory=dict)
    post_forward_order: dict[FSDPState, None] = field(default_factory=dict)
    in_flight: list[ShardedUnit] = field(default_factory=list)
    _forward_next: dict[FSDPState, FSDPState] = field(default_factory=dict)  # from the previous step
    _backward_next: dict[FSDPState, FSDPState] = field(default_factory=dict)  # reverse post-forward order

    def begin_forward(self) -> None:
        if self.state is TrainingState.BACKWARD:  # a backward that never reached its end
            self.end_backward()
        if self.forward_order:
            self._forward_next = _successors(list(self.forward_order))
        self.forward_order, self.post_forward_order = {}, {}
        self.state = TrainingState.FORWARD

    def forward_prefetch_targets(self, state: FSDPState) -> list[FSDPState]:
        if state.forward_prefetch is not None:
            return state.forward_prefetch
        nxt = self._forward_next.get(state)
        return [nxt] if nxt is not None else []

    def backward_prefetch_targets(self, state: FSDPState) -> list[FSDPState]:
        if state.backward_prefetch is not None:
            return state.backward_prefetch
        nxt = self._backward_next.get(state)
        return [nxt] if nxt is not None else []

    def on_reduce_issued(self, unit: ShardedUnit) -> None:
        """Keep one reduce-scatter in flight behind the newest: finishing it frees its grad buffer."""
        self.in_flight.append(unit)
        while len(self.in_flight) > 1:
            self.in_flight.pop(0).finish_reduce()

    def free_finished_reduces(self) -> None:
        """Between gradient arrivals: hand out reduce-scatters that are done, freeing their grad buffers."""
        while self.in_flight and self.in_flight[0].reduce_completed():
            self.in_flight.pop(0).finish_reduce()

    def begin_backward(self) -> None:
        if self.state is not TrainingState.BACKWARD:
            self.state = TrainingState.BACKWARD
            self._backward_next = _successors(list(reversed(self.post_forward_order)))
            torch.autograd.Variable._execution_engine.queue_callback(self.end_backward)

    def end_backward(self) -> None:
        """Flush units whose gradients did not all arrive, wait for every reduce-scatter, free all."""
        units = [s.unit for s in self.states if s.unit is not None]
        for unit in units:
            unit.end_backward()
        for unit in units:
            unit.finish_reduce()
            unit.reshard()
        self.in_flight.clear()
        self.state = TrainingState.IDLE


def _successors(order: list[FSDPState]) -> dict[FSDPState, FSDPState]:
    return dict(zip(order, order[1:]))


def _state(module: nn.Module) -> FSDPState:
    return getattr(module, _STATE)


class FSDPModule:
    """Mixed into the class of every module passed to ``fully_shard`` (FSDP2's method names)."""

    def unshard(self, async_op: bool = False) -> UnshardHandle | None:
        """All-gather this unit's parameters; with ``async_op`` return a handle to ``wait()`` on."""
        unit = _state(self).unit
        units = [unit] if unit is not None else []
        for u in units:
            u.unshard(async_op=True)
        handle = UnshardHandle(units)
        if async_op:
            return handle
        handle.wait()
        return None

    def reshard(self) -> None:
        """Free the full parameters; the module shows its sharded pieces again."""
        unit = _state(self).unit
        if unit is not None:
            unit.reshard()

    def set_requires_gradient_sync(self, requires_gradient_sync: bool, *, recurse: bool = True) -> None:
        """False: accumulate full gradients locally (no reduce-scatter) until it is set back to True."""
        for state in _states_under(self, recurse):
            if state.unit is not None:
                state.unit.requires_gradient_sync = bool(requires_gradient_sync)

    def set_reshard_after_forward(self, reshard_after_forward: bool, *, recurse: bool = True) -> None:
        """False: keep the full parameters from forward to backward (no re-gather, more memory)."""
        for state in _states_under(self, recurse):
            if state.unit is not None:
                state.unit.reshard_after_forward = bool(reshard_after_forward)

    def set_modules_to_forward_prefetch(self, modules: list[FSDPModule]) -> None:
        """Units whose all-gather is issued when this unit's forward starts (replaces implicit order)."""
        _state(self).forward_prefetch = _prefetch_states(modules, "set_modules_to_forward_prefetch")

    def set_modules_to_backward_prefetch(self, modules: list[FSDPModule]) -> None:
        """Units whose all-gather is issued during this unit's backward (replaces implicit order)."""
        _state(self).backward_prefetch = _prefetch_states(modules, "set_modules_to_backward_prefetch")


def _states_under(module: nn.Module, recurse: bool) -> list[FSDPState]:
    modules = module.modules() if recurse else [module]
    return [_state(m) for m in modules if isinstance(m, FSDPModule)]


def _prefetch_states(modules: list[FSDPModule], method: str) -> list[FSDPState]:
    if not isinstance(modules, (list, tuple)):
        raise TypeError(f"{method} takes a list of modules passed to fully_shard, got {type(modules).__name__}")
    for m in modules:
        if not isinstance(m, FSDPModule):
            raise ValueError(f"{method}: {type(m).__name__} was not passed to fully_shard, so it cannot be prefetched")
    return [_state(m) for m in modules]


# ------------------------------------------------------------------------------------------ hooks
def _pre_forward(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    state = _state(module)
    if state.iteration is None:
        _lazy_init(state)
    it = state.iteration
    if state.is_root:
        it.begin_forward()
    it.forward_order[state] = None
    if state.unit is not None:
        with torch.profiler.record_function("scalestack::pre_forward"):
            state.unit.wait_for_unshard()
    for target in it.forward_prefetch_targets(state):
        if target.unit is not None:
            target.unit.unshard(async_op=True)
    mp = state.mixed_precision
    if mp is not None and mp.cast_forward_inputs and mp.param_dtype is not None:
        cast = lambda t: t.to(mp.param_dtype) if torch.is_tensor(t) and t.is_floating_point() else t
        args, kwargs = tree_map(cast, args), tree_map(cast, kwargs)
    return args, kwargs


def _post_forward(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    state = _state(module)
    it = state.iteration
    it.post_forward_order[state] = None
    if torch.is_grad_enabled():
        tensors = [t for t in tree_flatten(output)[0] if torch.is_tensor(t) and t.requires_grad]
        if tensors:
            torch.autograd.graph.register_multi_grad_hook(tensors, lambda grads: _pre_backward(state), mode="any")
        if state.unit is not None and state.unit.reshard_after_forward and not state.is_root:
            state.unit.reshard()
    elif state.is_root:  # evaluation: nothing will come back for the full parameters
        for s in it.states:
            if s.unit is not None:
                s.unit.reshard()
        it.state = TrainingState.IDLE
    elif state.unit is not None and state.unit.reshard_after_forward:
        state.unit.reshard()
    return output


def _pre_backward(state: FSDPState) -> None:
    it = state.iteration
    it.begin_backward()
    if state.unit is not None:
        with torch.profiler.record_function("scalestack::pre_backward"):
            state.unit.wait_for_unshard()
            state.unit.begin_backward()
    targets = [t.unit for t in it.backward_prefetch_targets(state) if t.unit is not None and not t.unit.in_backward]
    if state.unit is not None:
        state.unit.prefetch_during_backward(targets)
    else:
        for unit in targets:
            unit.unshard(async_op=True)


# ------------------------------------------------------------------------------------------ lazy init
def _lazy_init(root: FSDPState) -> None:
    """At the first forward: the outermost unit becomes the root and ranks check they agree on shapes."""
    names = {m: name for name, m in root.module.named_modules()}
    states = [_state(m) for m in root.module.modules() if isinstance(m, FSDPModule)]
    for s in states:
        if s.iteration is not None:
            raise RuntimeError(
                f"unit {names[s.module] or '<root>'} already ran forward under another root; run the outermost "
                "fully_shard module's forward first (it becomes the root)"
            )
        if s.group is not root.group:
            raise ValueError("all units under one root must use the same process group / mesh")
    it = _Iteration(states=states)
    for s in states:
        s.iteration = it
        s.is_root = s is root
        if s.unit is not None:
            s.unit.name = names[s.module] or "<root>"
            s.unit.on_reduce_issued = it.on_reduce_issued
            s.unit.on_grad_ready = it.free_finished_reduces
    if root.unit is not None:  # its parameters are needed again as soon as backward starts
        root.unit.reshard_after_forward = False
    _check_ranks_agree(states, root.group)


def _describe(states: list[FSDPState]) -> list[str]:
    out = []
    for s in states:
        if s.unit is None:
            continue
        params = ", ".join(f"{p.fqn}{list(p.slot.shape)}" for p in s.unit.params)
        shards = "+".join(str(b.layout.shard_size) for b in s.unit.buffers)
        out.append(f"unit {s.unit.name}: S={shards} dtype={s.unit.dtype} [{params}]")
    return out


def _gather_text(text: str, group: ProcessGroup, device: torch.device) -> str:
    """Every rank's ``text``, joined by NUL, with two all-gathers of bytes (no pickling, no numpy)."""
    data = torch.tensor(list(text.encode()), dtype=torch.uint8, device=device)
    world = dist.get_world_size(group)
    lengths = torch.empty(world, dtype=torch.int64, device=device)
    comm.all_gather_blocking(lengths, torch.tensor([data.numel()], device=device), group)
    longest = int(lengths.max())
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    everyone = torch.empty(world * longest, dtype=torch.uint8, device=device)
    comm.all_gather_blocking(everyone, padded, group)
    chunks = everyone.view(world, longest).cpu()
    return "\0".join(bytes(chunks[r, : int(lengths[r])].tolist()).decode() for r in range(world))


def _check_ranks_agree(states: list[FSDPState], group: ProcessGroup) -> None:
    """One small all-gather of a digest of every unit's shapes; on mismatch every rank raises."""
    lines = _describe(states)
    digest = int.from_bytes(hashlib.sha256("\n".join(lines).encode()).digest()[:8], "little", signed=True)
    device = next((s.unit.device for s in states if s.unit is not None), torch.device("cpu"))
    if device.type == "meta":
        device = torch.device("cpu")
    world = dist.get_world_size(group)
    mine = torch.tensor([digest], dtype=torch.int64, device=device)
    everyone = torch.empty(world, dtype=torch.int64, device=device)
    comm.all_gather_blocking(everyone, mine, group)
    if bool((everyone == everyone[0]).all()):
        return
    descriptions = _gather_text("\n".join(lines), group, device).split("\0")
    descriptions = [d.split("\n") if d else [] for d in descriptions]
    rank = dist.get_rank(group)
    other = next(r for r in range(world) if descriptions[r] != lines)
    diff = next(
        (f"rank {rank}: {a}\nrank {other}: {b}" for a, b in zip(lines, descriptions[other]) if a != b),
        f"rank {rank} has {len(lines)} units, rank {other} has {len(descriptions[other])}",
    )
    raise RuntimeError(
        "ranks disagree on the model's parameters, so their shards cannot line up:\n"
        f"{diff}\nBuild the same model (same config and the same fully_shard calls) on every rank."
    )


# ------------------------------------------------------------------------------------------ fully_shard
def _group_of(mesh: DeviceMesh | ProcessGroup | None) -> ProcessGroup:
    if mesh is None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "fully_shard needs an initialized process group: call "
                "torch.distributed.init_process_group(backend) first (torchrun sets the environment), "
                "or pass mesh=DeviceMesh/ProcessGroup"
            )
        return dist.group.WORLD
    if isinstance(mesh, DeviceMesh):
        if mesh.ndim != 1:
            raise ValueError(
                f"fully_shard takes a 1-D mesh, got a {mesh.ndim}-D mesh {tuple(mesh.shape)}; pass the "
                "data-parallel dimension, e.g. mesh['dp']"
            )
        return mesh.get_group()
    if isinstance(mesh, ProcessGroup):
        return mesh
    raise TypeError(f"mesh must be None, a 1-D DeviceMesh or a ProcessGroup, got {type(mesh).__name__}")


def _owned_params(module: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Parameter]]:
    """(fqn, owning module, attribute, parameter) in model order, skipping sub-units and shared modules."""
    seen: set[int] = set()

    def visit(prefix: str, m: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Parameter]]:
        if id(m) in seen:
            return
        seen.add(id(m))
        for attr, p in m._parameters.items():
            if p is not None:
                yield prefix + attr, m, attr, p
        for name, child in m._modules.items():
            if child is not None and not isinstance(child, FSDPModule):
                yield from visit(f"{prefix}{name}.", child)

    yield from visit("", module)


def fully_shard(
    module: nn.Module,
    *,
    mesh: DeviceMesh | ProcessGroup | None = None,
    reshard_after_forward: bool = True,
    mixed_precision: MixedPrecision | None = None,
    granularity: GranularityRule = None,
    max_buffers: int = 1,
) -> nn.Module:
    """Shard ``module``'s parameters (those not in an already sharded submodule) as one unit.

    Call it on submodules first (each becomes a unit) and then on the root. Returns ``module``, whose class
    gains the ``FSDPModule`` methods. ``granularity`` is ``"element"`` (default), ``"row"``, an int k
    (blocks of k rows), ``"tensor"`` or a callable ``(name, param) -> one of these``.

    ``max_buffers`` > 1 lets the planner (``plan_buffers``) split the unit into up to that many flat
    buffers, each with its own shard size and its own all-gather / reduce-scatter, when that lowers padding
    (e.g. tensors whose row lengths force a large common S); the unit still gathers and frees as one.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"fully_shard takes an nn.Module, got {type(module).__name__}")
    if isinstance(module, FSDPModule):
        raise ValueError(f"fully_shard was already applied to this {type(module).__bases__[-1].__name__}; call it once")
    if mixed_precision is not None and not isinstance(mixed_precision, MixedPrecision):
        raise TypeError("mixed_precision must be a scalestack.MixedPrecision")
    if granularity is not None and not callable(granularity):
        resolve_granularity(granularity, "", torch.empty(0))  # fail now on an unknown value
    if not isinstance(max_buffers, int) or isinstance(max_buffers, bool):
        raise TypeError(f"max_buffers must be a positive int (1: one flat buffer per unit), got {max_buffers!r}")
    if max_buffers < 1:
        raise ValueError(f"max_buffers must be a positive int (1: one flat buffer per unit), got {max_buffers}")
    group = _group_of(mesh)
    unit = _build_unit(module, group, mixed_precision, granularity, bool(reshard_after_forward), max_buffers)
    setattr(module, _STATE, FSDPState(module, unit, group, mixed_precision))
    module.register_forward_pre_hook(_pre_forward, prepend=True, with_kwargs=True)
    module.register_forward_hook(_post_forward, with_kwargs=True)
    module.__class__ = _fsdp_class(type(module))
    return module


_CLASSES: dict[type, type] = {}


def _fsdp_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"FSDP{cls.__name__}", (FSDPModule, cls), {})
    return _CLASSES[cls]


def _build_unit(
    module: nn.Module,
    group: ProcessGroup,
    mp: MixedPrecision | None,
    granularity: GranularityRule,
    reshard_after_forward: bool,
    max_buffers: int,
) -> ShardedUnit | None:
    by_id: dict[int, tuple[str, nn.Parameter, list[tuple[nn.Module, str]]]] = {}
    for fqn, owner, attr, p in _owned_params(module):
        if hasattr(p, _OWNER):
            raise ValueError(
                f"parameter {fqn!r} is already sharded by unit {getattr(p, _OWNER)!r}: a parameter cannot "
                "be shared across units. Call fully_shard on submodules first (bottom-up), and put every "
                "module that uses a shared parameter in the same unit"
            )
        if not p.is_floating_point():
            raise TypeError(f"parameter {fqn!r} has dtype {p.dtype}; fully_shard shards floating-point parameters only")
        if p.device.type == "meta":
            raise ValueError(f"parameter {fqn!r} is on the meta device; materialize the module before fully_shard")
        by_id.setdefault(id(p), (fqn, p, []))[2].append((owner, attr))
    if not by_id:
        return None
    entries = list(by_id.values())
    first_fqn, first, _ = entries[0]
    for fqn, p, _ in entries:
        if p.dtype != first.dtype or p.device != first.device:
            raise TypeError(
                f"parameters {first_fqn!r} ({first.dtype}, {first.device}) and {fqn!r} ({p.dtype}, {p.device}) "
                "differ in dtype or device; one unit holds one dtype on one device: cast the module first"
            )
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    master = first.dtype
    compute = (mp.param_dtype if mp and mp.param_dtype else None) or master
    reduce = (mp.reduce_dtype if mp and mp.reduce_dtype else None) or compute
    specs = [
        TensorSpec(fqn, tuple(p.shape), cuts_for(resolve_granularity(granularity, fqn, p), p.shape))
        for fqn, p, _ in entries
    ]
    align = max(1, _ALIGN_BYTES // first.element_size())
    plan = plan_unit(specs, world, align) if max_buffers == 1 else plan_buffers(specs, world, align, max_buffers)
    unit_name = type(module).__name__
    buffers = []
    by_entry: dict[int, ManagedParam] = {}
    for lay in [plan] if isinstance(plan, Layout) else plan.buffers:
        buf = FlatBuffer(
            lay,
            shard=torch.zeros(lay.shard_size, dtype=master, device=first.device),
            gather=torch.empty(lay.total_size, dtype=compute, device=first.device),
            grad=torch.empty(lay.total_size, dtype=compute, device=first.device),
        )
        buffers.append(buf)
        indices = lay.tensor_indices or range(len(lay.slots))
        for slot_index, (entry, slot, piece) in enumerate(zip(indices, lay.slots, lay.pieces(rank))):
            fqn, p, uses = entries[entry]
            local = buf.shard[piece.local_offset : piece.local_offset + piece.numel]
            with torch.no_grad():
                local.copy_(p.detach().reshape(-1)[piece.start : piece.end])
            sharded = nn.Parameter(local, requires_grad=p.requires_grad)
            full = nn.Parameter(buf.gather[slot.offset : slot.end].view(slot.shape), requires_grad=p.requires_grad)
            for t in (p, sharded):
                setattr(t, _OWNER, unit_name)
            by_entry[entry] = ManagedParam(fqn, uses, buf, slot_index, piece, sharded, full)
    params = [by_entry[i] for i in range(len(entries))]  # model order, whatever buffer holds them
    unit = ShardedUnit(
        name=unit_name,
        plan=plan,
        buffers=buffers,
        group=group,
        rank=rank,
        params=params,
        reduce_dtype=reduce,
        reshard_after_forward=reshard_after_forward,
    )
    unit.show(unsharded=False)
    return unit


def layout(module: nn.Module) -> Layout | Plan:
    """The plan of the unit that ``fully_shard(module)`` created: what the planner returned for it.

    With ``max_buffers=1`` (the default) a ``Layout`` (shard size, padding, offsets, pieces). With
    ``max_buffers`` > 1 always a ``Plan`` (as ``scalestack.plan`` returns), even when the planner kept one
    buffer: ``Plan.buffers`` holds one ``Layout`` per flat buffer (its slots are named after the
    parameters it holds); ``Plan.padding`` and ``Plan.total_size`` sum over the buffers.
    """
    if not isinstance(module, FSDPModule):
        raise ValueError(f"{type(module).__name__} was not passed to fully_shard, so it has no layout")
    unit = _state(module).unit
    if unit is None:
        raise ValueError(f"{type(module).__name__} is a unit with no parameters of its own, so it has no layout")
    return unit.plan


def units(module: nn.Module) -> list[ShardedUnit]:
    """Every unit in ``module``'s tree (outermost first)."""
    return [_state(m).unit for m in module.modules() if isinstance(m, FSDPModule) and _state(m).unit is not None]
