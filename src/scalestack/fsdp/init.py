"""Building a unit (``fully_shard``) and the lazy init at the first forward (root, step context, rank check).

``build_unit`` does its jobs in order: find the parameters, choose the dtypes, plan, allocate, copy in,
make the sharded and full parameter objects.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from ..planner.granularity import GranularityRule, cuts_for, resolve_granularity
from ..planner.layout import TensorSpec
from ..planner.search import Plan, plan_buffers
from .memory import log_layouts
from .mesh import ShardGroups
from .mixed_precision import MixedPrecisionPolicy
from .param import ManagedParam, ShardInfo, is_sharded
from .rank_check import check_ranks_agree
from .state import FSDPState, StepContext, state_of
from .state_dict_hooks import register_state_dict_hooks
from .unit import FlatBuffer, ShardedUnit

_SHARDED_ORIGINAL = "_scalestack_replaced"  # on the parameter objects fully_shard replaced with pieces
ALIGN_BYTES = 16  # every compute view starts 16-byte aligned, in the master and in the compute dtype


def owned_params(modules: list[nn.Module], ignored: set[int]) -> Iterator[tuple[str, nn.Module, str, nn.Parameter]]:
    """(fqn, owning module, attribute, parameter) in model order, skipping sub-units, shared modules and
    ignored parameters."""
    seen: set[int] = set()

    def visit(prefix: str, m: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Parameter]]:
        if id(m) in seen:
            return
        seen.add(id(m))
        for attr, p in m._parameters.items():
            if p is not None and id(p) not in ignored:
                yield prefix + attr, m, attr, p
        for name, child in m._modules.items():
            if child is not None and state_of(child) is None:
                yield from visit(f"{prefix}{name}.", child)

    for i, module in enumerate(modules):
        yield from visit(f"[{i}]." if len(modules) > 1 else "", module)


_Entry = tuple[str, nn.Parameter, list[tuple[nn.Module, str]]]  # first name, parameter, every registration


def _collect(modules: list[nn.Module], ignored: set[int]) -> list[_Entry]:
    by_id: dict[int, _Entry] = {}
    for fqn, owner, attr, p in owned_params(modules, ignored):
        if is_sharded(p) or hasattr(p, _SHARDED_ORIGINAL):
            raise ValueError(
                f"parameter {fqn!r} is already sharded by another unit: a parameter cannot be shared "
                "across units. Call fully_shard on submodules first (bottom-up), and put every module that uses "
                "a shared parameter in the same unit"
            )
        if not p.is_floating_point():
            raise TypeError(f"parameter {fqn!r} has dtype {p.dtype}; fully_shard shards floating-point parameters only")
        by_id.setdefault(id(p), (fqn, p, []))[2].append((owner, attr))
    entries = list(by_id.values())
    first_fqn, first, _ = entries[0] if entries else (None, None, None)
    for fqn, p, _ in entries:
        if p.dtype != first.dtype or p.device != first.device:
            raise TypeError(
                f"parameters {first_fqn!r} ({first.dtype}, {first.device}) and {fqn!r} ({p.dtype}, {p.device}) "
                "differ in dtype or device; one unit holds one dtype on one device: cast the module first"
            )
    return entries


def build_unit(modules: list[nn.Module], groups: ShardGroups, mp_policy: MixedPrecisionPolicy,
               granularity: GranularityRule, ignored: set[int], max_buffers: int) -> ShardedUnit | None:  # fmt: skip
    entries = _collect(modules, ignored)
    group = groups.shard
    if not entries:
        return None
    first = entries[0][1]
    master = first.dtype
    compute, reduce = mp_policy.dtypes(master)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    specs = [
        TensorSpec(fqn, tuple(p.shape), cuts_for(resolve_granularity(granularity, fqn, p), p.shape))
        for fqn, p, _ in entries
    ]
    smallest = min(first.element_size(), torch.empty((), dtype=compute).element_size())
    plan: Plan = plan_buffers(specs, world, max(1, ALIGN_BYTES // smallest), max_buffers)
    name = type(modules[0]).__name__
    buffers: list[FlatBuffer] = []
    by_entry: dict[int, ManagedParam] = {}
    for index, lay in enumerate(plan.buffers):
        buf = FlatBuffer(lay, torch.zeros(lay.shard_size, dtype=master, device=first.device), compute)
        buffers.append(buf)
        for entry, slot, piece in zip(lay.tensor_indices, lay.slots, lay.pieces(rank)):
            fqn, p, uses = entries[entry]
            mp = ManagedParam(fqn, uses, index, slot, piece)
            local = mp.in_shard(buf.shard)
            with torch.no_grad():
                local.copy_(mp.in_global(p.detach()).view(local.shape))
            sharded = nn.Parameter(local, requires_grad=p.requires_grad)
            full = nn.Parameter(mp.in_full(buf.gather), requires_grad=p.requires_grad)
            info = ShardInfo(
                slot.shape, piece.start, piece.end, local.shape, group, rank, world, slot.offset, lay.shard_size
            )
            mp.attach(sharded, full, info)
            setattr(p, _SHARDED_ORIGINAL, True)
            by_entry[entry] = mp
    params = [by_entry[i] for i in range(len(entries))]  # model order, whatever buffer holds them
    unit = ShardedUnit(name, plan, buffers, params, groups, reduce)
    unit._to_sharded()  # the module shows its sharded pieces
    register_state_dict_hooks(unit)
    return unit


def name_units(top: nn.Module) -> None:
    """Name every unit under ``top`` by its module's place in the model (errors and profiles use it)."""
    for name, m in top.named_modules():
        if (s := state_of(m)) is not None and s.unit is not None and m is s.modules[0]:  # a list: its first
            s.unit.name = name or "<root>"


def lazy_init(root: FSDPState) -> None:
    """At the first forward: the outermost unit becomes the root and ranks check they agree on shapes."""
    top = root.modules[0]
    names = {m: name for name, m in top.named_modules()}
    states = list(dict.fromkeys(s for m in top.modules() if (s := state_of(m)) is not None))
    on_meta = [n for n, t in (*top.named_parameters(), *top.named_buffers()) if t.is_meta]
    if on_meta:
        raise RuntimeError(
            f"{', '.join(repr(n) for n in on_meta[:3])}{' ...' if len(on_meta) > 3 else ''} "
            "are still on the meta device: call scalestack.materialize(model) (or model.to_empty(device=...) and "
            "your init functions, or scalestack.checkpoint.load) before the first forward"
        )
    for s in states:
        if s.ctx is not None:
            raise RuntimeError(
                f"unit {names.get(s.modules[0]) or '<root>'} already ran forward under another root; run the "
                "outermost fully_shard module's forward first (it becomes the root)"
            )
        if s.group is not root.group:
            raise ValueError("all units under one root must use the same process group / mesh")
    ctx = StepContext(states)
    ctx.is_last_backward = root.is_last_backward
    name_units(top)
    for s in states:
        s.ctx = ctx
        s.is_root = s is root
        if s.unit is not None:
            s.unit.on_gradient = ctx.free_finished_reduces
            s.unit.advance_reduces = ctx.issue_replica_reduces
    units = [s.unit for s in states if s.unit is not None]
    device = units[0].device if units else torch.device("cpu")
    check_ranks_agree(units, units[0].mesh_group if units else root.group, device)  # HSDP: replicas too
    log_layouts(units)
