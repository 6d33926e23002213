"""At lazy init: ranks check that they built the same units, and a mismatch names the first difference."""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from . import collectives as comm
from .unit import ShardedUnit


def _describe(units: list[ShardedUnit]) -> list[str]:
    out = []
    for u in units:
        params = ", ".join(f"{p.fqn}{list(p.slot.shape)}" for p in u.params)
        shards = "+".join(str(b.layout.shard_size) for b in u.buffers)
        out.append(f"unit {u.name}: S={shards} dtype={u.dtype} [{params}]")
    return out


def _gather_text(text: str, group: ProcessGroup, device: torch.device) -> list[str]:
    """Every rank's ``text``, with two all-gathers of bytes (no pickling, no numpy)."""
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
    return [bytes(chunks[r, : int(lengths[r])].tolist()).decode() for r in range(world)]


def check_ranks_agree(units: list[ShardedUnit], group: ProcessGroup, device: torch.device) -> None:
    """One small all-gather of a digest of every unit's shapes; on mismatch every rank raises."""
    lines = _describe(units)
    digest = int.from_bytes(hashlib.sha256("\n".join(lines).encode()).digest()[:8], "little", signed=True)
    world = dist.get_world_size(group)
    mine = torch.tensor([digest], dtype=torch.int64, device=device)
    everyone = torch.empty(world, dtype=torch.int64, device=device)
    comm.all_gather_blocking(everyone, mine, group)
    if bool((everyone == everyone[0]).all()):
        return
    descriptions = [d.split("\n") if d else [] for d in _gather_text("\n".join(lines), group, device)]
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
