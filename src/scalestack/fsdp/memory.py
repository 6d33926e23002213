"""What each unit holds in memory: ``scalestack.memory_summary(model)`` and the layout log at lazy init.

Per unit: its shard (persistent, master dtype), its gather and grad buffers (W*S in the compute dtype, only
while gathered / in backward), the partial copy kept under ``reshard_after_forward=n``, and its padding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch.nn as nn

from .unit import ShardedUnit

logger = logging.getLogger("scalestack")


@dataclass(frozen=True)
class UnitMemory:
    name: str
    params: int  # elements of the unit's tensors (all ranks together)
    padding: int  # elements of padding over all ranks (W*S - params, summed over buffers)
    shard_bytes: int  # this rank's persistent shard
    gather_bytes: int  # the full parameters while gathered; the full gradients take as much during backward
    allocated_bytes: int  # what the unit holds right now (shard, and whatever is gathered or in flight)
    state: str


def unit_memory(unit: ShardedUnit) -> UnitMemory:
    shard = sum(b.shard.numel() * b.shard.element_size() for b in unit.buffers)
    gather = sum(b.gather.numel() * b.gather.element_size() for b in unit.buffers)
    now = sum(
        t.untyped_storage().nbytes()
        for b in unit.buffers
        for t in (b.shard, b.gather, b.grad, b.accum, b.partial)
        if t is not None
    )
    return UnitMemory(
        unit.name,
        sum(b.layout.numel for b in unit.buffers),
        sum(b.layout.padding for b in unit.buffers),
        shard,
        gather,
        now,
        unit.state.name,
    )


def memory_summary(model: nn.Module) -> str:
    """A table of every unit's memory on this rank (MiB) and its padding, with totals: a report, not a
    collective."""
    from .api import units  # these import this module
    from .init import name_units

    if not isinstance(model, nn.Module):
        raise TypeError(f"memory_summary takes an nn.Module, got {type(model).__name__}")
    name_units(model)  # by place in the model, also before the first forward
    rows = [unit_memory(u) for u in units(model)]
    if not rows:
        raise ValueError(f"{type(model).__name__} holds no unit: call fully_shard (or apply_fsdp) on it first")
    mib = 2**20
    lines = [
        f"{'unit':<32} {'params':>14} {'padding':>9} {'shard MiB':>10} {'gather MiB':>11} {'grad MiB':>9} "
        f"{'now MiB':>9}  state"
    ]
    for r in rows:
        pad = 100 * r.padding / max(r.params, 1)
        lines.append(
            f"{r.name[:32]:<32} {r.params:>14,} {pad:>8.3f}% {r.shard_bytes / mib:>10.2f} "
            f"{r.gather_bytes / mib:>11.2f} {r.gather_bytes / mib:>9.2f} {r.allocated_bytes / mib:>9.2f}  {r.state}"
        )
    params, padding = sum(r.params for r in rows), sum(r.padding for r in rows)
    lines.append(
        f"{'total':<32} {params:>14,} {100 * padding / max(params, 1):>8.3f}% "
        f"{sum(r.shard_bytes for r in rows) / mib:>10.2f} {'':>11} {'':>9} "
        f"{sum(r.allocated_bytes for r in rows) / mib:>9.2f}"
    )
    largest = 2 * max(r.gather_bytes for r in rows) / mib
    lines.append(f"a unit gathered with its gradients adds up to {largest:.2f} MiB to the shards")
    return "\n".join(lines)


def log_layouts(units: list[ShardedUnit]) -> None:
    """At lazy init, one INFO line per unit: what it holds and how it is cut (``logging`` name "scalestack")."""
    if not logger.isEnabledFor(logging.INFO):
        return
    for u in units:
        m = unit_memory(u)
        shards = "+".join(str(b.layout.shard_size) for b in u.buffers)
        logger.info(
            "unit %s: %d tensors, %d elements in %d buffer(s), S=%s per rank of %d, padding %d (%.3f%%), "
            "shard %.2f MiB, gathered %.2f MiB",
            u.name, len(u.params), m.params, len(u.buffers), shards, u.buffers[0].layout.world_size, m.padding,
            100 * m.padding / max(m.params, 1), m.shard_bytes / 2**20, m.gather_bytes / 2**20,
        )  # fmt: skip
