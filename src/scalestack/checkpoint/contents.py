"""What a checkpoint holds: the nested state dict that DCP saves and loads in place, and its flat keys.

    model.<name>                    the model's state_dict(): PieceTensors for sharded parameters
    optimizer.state.<name>.<key>    optimizer state keyed by parameter name (optimizer_state.py)
    optimizer.param_groups          hyperparameters and parameter names per group (pickled)
                                    (several optimizers, e.g. Muon and AdamW: optimizer.<i>.state..., ...)
    scheduler                       the LR scheduler's state_dict() (pickled)
    extra.rank_<r>                  each rank's ``extra`` (pickled: data position, RNG states, ...)

The model's keys sit under ``model`` so that ``dcp_to_torch_save`` gives ``{"model": ...}`` whose value loads
into the unsharded model with ``strict=True``. DCP flattens nested dicts by joining keys with dots.
"""

from __future__ import annotations

import pickle
from typing import Any

import torch
import torch.nn as nn

from .optimizer_state import optimizer_state_dict

MODEL, OPTIMIZER, SCHEDULER, EXTRA = "model", "optimizer", "scheduler", "extra"


def blob(obj: Any) -> bytes:
    """Non-tensor state as one opaque value (DCP would otherwise flatten dicts and lists into many)."""
    return pickle.dumps(obj)


def unblob(data: bytes) -> Any:
    return pickle.loads(data)


def rank_key(rank: int) -> str:
    return f"rank_{rank}"


Optimizers = torch.optim.Optimizer | list[torch.optim.Optimizer] | tuple[torch.optim.Optimizer, ...] | None


def class_name(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def optimizers(optimizer: Optimizers) -> list[tuple[str, torch.optim.Optimizer]]:
    """(key prefix, optimizer) of each: ``optimizer`` for one, ``optimizer.<i>`` for a list."""
    if optimizer is None:
        return []
    if isinstance(optimizer, torch.optim.Optimizer):
        return [(OPTIMIZER, optimizer)]
    many = isinstance(optimizer, (list, tuple)) and optimizer
    if many and all(isinstance(o, torch.optim.Optimizer) for o in optimizer):
        return [(f"{OPTIMIZER}.{i}", o) for i, o in enumerate(optimizer)]
    raise TypeError(
        f"optimizer must be a torch.optim.Optimizer, a non-empty list of them (e.g. Muon and AdamW) or None, "
        f"got {type(optimizer).__name__}"
    )


def build(model: nn.Module, optimizer: Optimizers, scheduler: Any, extra: bytes | None,
          extra_rank: int) -> dict[str, Any]:  # fmt: skip
    """The nested state dict; its tensors are the model's and optimizer's own (views, no copies)."""
    sd: dict[str, Any] = {MODEL: model.state_dict()}
    for prefix, opt in optimizers(optimizer):
        osd = optimizer_state_dict(model, opt)
        node = sd
        for key in prefix.split(".")[:-1]:
            node = node.setdefault(key, {})
        node[prefix.split(".")[-1]] = {"state": osd["state"], "param_groups": blob(osd["param_groups"])}
    if scheduler is not None:
        sd[SCHEDULER] = blob(scheduler.state_dict())
    if extra is not None:
        sd[EXTRA] = {rank_key(extra_rank): extra}
    return sd


def flatten(sd: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[str, tuple[tuple[str, ...], Any]]:
    """DCP's flat key of every leaf -> (its path in ``sd``, the leaf)."""
    out: dict[str, tuple[tuple[str, ...], Any]] = {}
    for key, value in sd.items():
        path = (*prefix, str(key))
        if isinstance(value, dict):
            out.update(flatten(value, path))
        else:
            out[".".join(path)] = (path, value)
    return out


def nest(leaves: list[tuple[tuple[str, ...], Any]]) -> dict[str, Any]:
    """The nested dict holding ``leaves`` (path, value), the inverse of ``flatten``."""
    out: dict[str, Any] = {}
    for path, value in leaves:
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out
