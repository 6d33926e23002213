"""The process groups of one ``fully_shard`` call: sharding, replication (HSDP) and the post-forward groups.

A 1-D mesh or a process group shards over all its ranks. A 2-D mesh named ``("replicate", "shard")`` (FSDP2's
HSDP convention) shards within each row and keeps one replica per row: gradients are reduce-scattered within
the row, then all-reduced across rows. ``reshard_after_forward=n`` keeps, between forward and backward, a copy
sharded over blocks of n consecutive ranks of the shard group, so backward's all-gather stays inside a block
(a node, when n is the number of devices per node).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh

HSDP_DIM_NAMES = ("replicate", "shard")


@dataclass(frozen=True)
class ShardGroups:
    shard: ProcessGroup  # all-gathers and reduce-scatters
    replicate: ProcessGroup | None  # HSDP with more than one replica: gradients are averaged across it
    everyone: ProcessGroup  # every rank of the mesh: checkpoints, agreeing on errors
    shard_rows: tuple[tuple[int, ...], ...] | None = None  # every shard group's ranks, when they cover the world

    @property
    def shard_size(self) -> int:
        return dist.get_world_size(self.shard)


def _world_group() -> ProcessGroup:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "fully_shard needs an initialized process group: call torch.distributed.init_process_group(backend) "
            "first (torchrun sets the environment), or pass mesh=DeviceMesh/ProcessGroup"
        )
    return dist.group.WORLD


def shard_groups(mesh: DeviceMesh | ProcessGroup | None) -> ShardGroups:
    """The groups ``fully_shard(mesh=...)`` communicates over; a 2-D mesh must be named ("replicate", "shard")."""
    if mesh is None:
        group = _world_group()
        return ShardGroups(group, None, group, (tuple(range(dist.get_world_size())),))
    if isinstance(mesh, ProcessGroup):
        return ShardGroups(mesh, None, mesh, _whole_world(dist.get_process_group_ranks(mesh)))
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"mesh must be None, a DeviceMesh or a ProcessGroup, got {type(mesh).__name__}")
    rows = _whole_world(*mesh.mesh.reshape(-1, mesh.mesh.shape[-1]).tolist())
    if mesh.ndim == 1:
        group = mesh.get_group()
        return ShardGroups(group, None, group, rows)
    if mesh.ndim != 2 or tuple(mesh.mesh_dim_names or ()) != HSDP_DIM_NAMES:
        raise ValueError(
            f"fully_shard takes a 1-D mesh or, for hybrid sharding (HSDP), a 2-D mesh with mesh_dim_names="
            f"{HSDP_DIM_NAMES}; got a {mesh.ndim}-D mesh {tuple(mesh.shape)} named {mesh.mesh_dim_names}. Build it "
            f"with init_device_mesh(device, (replicas, shard_size), mesh_dim_names={HSDP_DIM_NAMES}), or pass "
            "mesh['dp'] to shard over one dimension"
        )
    shard = mesh["shard"].get_group()
    if mesh.size(0) == 1:
        return ShardGroups(shard, None, shard, rows)
    replicate = mesh["replicate"].get_group()
    everyone = dist.group.WORLD if mesh.size() == dist.get_world_size() else mesh._flatten().get_group()
    return ShardGroups(shard, replicate, everyone, rows)


def _whole_world(*rows: list[int]) -> tuple[tuple[int, ...], ...] | None:
    """``rows`` when together they are every rank of the default group (so every rank calls fully_shard)."""
    if sorted(r for row in rows for r in row) != list(range(dist.get_world_size())):
        return None
    return tuple(tuple(row) for row in rows)


_blocks_of: dict[tuple, dict[tuple[int, ...], ProcessGroup]] = {}  # (shard rows, n) -> every block's group
_local_blocks: dict[tuple[int, ...], ProcessGroup] = {}  # blocks created by their members only


def _alive(group: ProcessGroup) -> bool:
    """Still registered (a group outlives nothing: destroy_process_group clears them all)."""
    return group in getattr(dist.distributed_c10d._world, "pg_group_ranks", {})


def _existing_group(ranks: tuple[int, ...], backend: str) -> ProcessGroup | None:
    table = getattr(dist.distributed_c10d._world, "pg_group_ranks", {})
    for group, members in table.items():
        if tuple(sorted(members)) == ranks and str(dist.get_backend(group)) == backend:
            return group
    return None


def post_forward_group(groups: ShardGroups, n: int) -> ProcessGroup:
    """The block of n consecutive ranks of this rank's shard group that holds it. When the shard groups cover
    the world, every rank creates every block in one order (torch's usual rule for new groups), once per
    (rows, n); otherwise only a block's members create it."""
    ranks = sorted(dist.get_process_group_ranks(groups.shard))
    first = ranks.index(dist.get_rank()) // n * n
    mine = tuple(ranks[first : first + n])
    if groups.shard_rows is None:  # torch names such a group by its ranks: reuse one that exists
        group = _local_blocks.get(mine)
        if group is None or not _alive(group):
            backend = str(dist.get_backend(groups.shard))
            group = _existing_group(tuple(sorted(mine)), backend) or dist.new_group(
                list(mine), backend=backend, use_local_synchronization=True
            )
            _local_blocks[mine] = group
        return group
    key = (groups.shard_rows, n)
    blocks = _blocks_of.get(key)
    if blocks is None or not all(_alive(g) for g in blocks.values()):  # the same on every rank: all call it
        blocks = {}
        backend = str(dist.get_backend(groups.shard))
        for row in groups.shard_rows:
            ranked = tuple(sorted(row))  # a group's ranks in order, as torch gives them
            for i in range(0, len(ranked), n):
                blocks[ranked[i : i + n]] = dist.new_group(list(ranked[i : i + n]), backend=backend)
        _blocks_of[key] = blocks
    return blocks[mine]
