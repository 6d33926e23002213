"""The ranks that write and read a checkpoint: their group, agreeing on errors, and DCP calls over them.

``group=None`` without an initialized process group means one process (DCP's ``no_dist``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.nn as nn

from ..fsdp import collectives as comm
from ..fsdp.api import units
from . import contents
from .directory import CheckpointError


def group_of(model: nn.Module, process_group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """The units' group, else the default group (None: one process when torch.distributed is not set up)."""
    if process_group is not None:
        return process_group
    groups = list({id(u.mesh_group): u.mesh_group for u in units(model)}.values())
    if len(groups) > 1:
        raise ValueError("the model's units use different process groups; pass process_group= (all ranks that save)")
    return groups[0] if groups else None


def rank_world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if comm.single_process(group):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def agree(error: str | None, group: dist.ProcessGroup | None) -> None:
    """Raise on every rank when any rank failed (so no rank goes on into a collective the others skip)."""
    errors = [e for e in comm.all_gather_objects(error, group) if e]
    if errors:
        raise CheckpointError(errors[0])


def dcp_call(fn: Callable, *args: Any, group: dist.ProcessGroup | None, **kwargs: Any) -> Any:
    """``fn`` (``dcp.save``, ``dcp.load``, ``dcp.async_save``) over ``group``; its failures as CheckpointError."""
    try:
        with warnings.catch_warnings():  # one process by intent: DCP need not warn that it assumed so
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            return fn(*args, process_group=group, no_dist=comm.single_process(group), **kwargs)
    except BaseException as e:  # DCP raises CheckpointException, a BaseException, with every rank's failure
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise CheckpointError(f"torch.distributed.checkpoint failed: {e}") from e


def check_arguments(path: Any, model: Any, optimizer: Any) -> Path:
    """What save and load both take: a path, a model, optimizers; returns the absolute path."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike naming the checkpoint directory, got {type(path).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    contents.optimizers(optimizer)  # checks the type
    final = Path(path).absolute()
    if final.name.startswith("."):
        raise ValueError(f"checkpoint names starting with '.' are reserved for saves in progress, got {final.name!r}")
    return final
