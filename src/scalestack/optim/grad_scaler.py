"""fp16 loss scaling on sharded gradients: every rank must agree on skipping a step.

``torch.amp.GradScaler`` checks for inf/NaN in the gradients it sees. A rank sees only its pieces, so an
overflow in one rank's piece would make that rank skip the step while the others take it, and the replicas
drift apart. ``ShardedGradScaler`` sums ``found_inf`` over the process group before the step decision
(PyTorch FSDP1 ships the same idea for its flat parameters).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from ..fsdp.param import is_sharded, shard_info


class ShardedGradScaler(torch.amp.GradScaler):
    """``torch.amp.GradScaler`` whose ``found_inf`` is the same on every rank of the shards' group."""

    def __init__(self, device: str = "cuda", *args, process_group: ProcessGroup | None = None, **kwargs) -> None:
        super().__init__(device, *args, **kwargs)
        self.process_group = process_group

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        super().unscale_(optimizer)
        if not self._enabled:
            return
        group = self.process_group or _group_of(optimizer)
        if group is None:
            return
        found = self._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        for t in found.values():  # one small all-reduce per device: any rank's overflow skips every rank
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)


def _group_of(optimizer: torch.optim.Optimizer) -> ProcessGroup | None:
    for g in optimizer.param_groups:
        for p in g["params"]:
            if is_sharded(p):
                return shard_info(p).group
    return None
