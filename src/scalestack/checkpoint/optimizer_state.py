"""Optimizer state keyed by parameter name, each tensor registered as its piece of a global tensor.

torch's optimizers key their state by position; a checkpoint that must load into another world size, layout
or an unsharded model keys it by the parameter's name (as ``torch.distributed.checkpoint.state_dict`` does
for FSDP2). A state tensor of a sharded parameter is one of:

- shaped like the parameter's piece (AdamW's moments, Muon's momentum, AdamW8bit's codes): a piece of a
  global tensor shaped like the parameter, the same elements the parameter's piece holds;
- per block (AdamW8bit's scales, named by the optimizer's ``block_state_keys``): one value per
  ``block_size`` elements of the global tensor, a piece of a 1-D tensor of blocks;
- a scalar (step counts): the same on every rank, saved once.

Anything else cannot be resharded and is refused by name.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from ..fsdp.api import units
from ..fsdp.param import is_sharded, shard_info
from ..fsdp.piece_tensor import PieceTensor


def param_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> its name in ``model`` (the first name of a tied parameter). A unit kept gathered shows
    its full tensors, while the optimizer holds the pieces: both are named."""
    names = {id(p): name for name, p in reversed(list(model.named_parameters()))}
    for unit in units(model):
        for mp in unit.params:
            for t in (mp.sharded, mp.unsharded):
                if id(t) in names:
                    names[id(mp.sharded)] = names[id(mp.unsharded)] = names[id(t)]
    return names


def names_in(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> list[list[str]]:
    """Each param group's parameter names (every parameter must be in the model)."""
    out = []
    for g, group in enumerate(optimizer.param_groups):
        group_names = []
        for i, p in enumerate(group["params"]):
            if id(p) not in names:
                raise ValueError(
                    f"the optimizer's param group {g} holds a parameter (#{i}, shape {list(p.shape)}) that is not in "
                    "the model; build the optimizer from model.parameters() after fully_shard"
                )
            group_names.append(names[id(p)])
        out.append(group_names)
    return out


def _global(value: Any, p: torch.Tensor, key: str, name: str, block: int | None) -> Any:
    """A state value as a checkpoint stores it: a piece of a global tensor, or as it is."""
    if not torch.is_tensor(value) or not is_sharded(p) or value.dim() == 0:
        return value
    if block is not None:
        return PieceTensor(value, shard_info(p), block)
    if value.shape == p.shape and value.is_contiguous():  # a copy would not be loaded into: no copies
        return PieceTensor(value, shard_info(p))
    raise ValueError(
        f"optimizer state {key!r} of parameter {name!r} has shape {list(value.shape)}, neither its piece's "
        f"{list(p.shape)} (contiguous) nor a scalar, so it cannot be resharded; declare per-block states in the "
        "optimizer's block_state_keys"
    )


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``{"state": {name: {key: value}}, "param_groups": [{..., "params": [name, ...]}]}``; sharded states are
    ``PieceTensor`` views of the optimizer's own tensors (no copy), so ``dcp.load`` fills them in place."""
    names = param_names(model)
    group_names = names_in(optimizer, names)
    block_keys = set(getattr(optimizer, "block_state_keys", ()))
    state: dict[str, dict[str, Any]] = {}
    for group, pnames in zip(optimizer.param_groups, group_names):
        for p, name in zip(group["params"], pnames):
            entry = optimizer.state.get(p)
            if not entry:
                continue
            block = group.get("block_size")
            state[name] = {k: _global(v, p, k, name, block if k in block_keys else None) for k, v in entry.items()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": n} for g, n in
              zip(optimizer.param_groups, group_names)]  # fmt: skip
    return {"state": state, "param_groups": groups}


def init_optimizer_state(optimizer: torch.optim.Optimizer, group: dist.ProcessGroup | None) -> set[int]:
    """Create the state that optimizers build lazily at their first step, so a checkpoint can be loaded into
    it in place: one step with zero gradients and a learning rate of 0, which changes no parameter (what
    ``torch.distributed.checkpoint.state_dict`` does too). Returns the ids of the parameters it gave state.

    A collective when ``group`` is given: every rank takes the step if any rank needs it (Muon's step
    exchanges pieces between ranks)."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    missing = [p for p in params if not optimizer.state.get(p)]
    device = params[0].device if params else torch.device("cpu")
    need = torch.tensor([1 if missing else 0], device=device)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(need, op=dist.ReduceOp.MAX, group=group)
    if not need.item():
        return set()
    kept_grads = {p: p.grad for p in params}
    lrs = [g["lr"] for g in optimizer.param_groups]
    try:
        lacking = set(missing)
        for p in params:  # an expanded zero allocates nothing; a state is created at its full size anyway
            p.grad = torch.zeros((), dtype=p.dtype, device=p.device).expand(p.shape) if p in lacking else None
        for g in optimizer.param_groups:
            g["lr"] = torch.zeros_like(g["lr"]) if torch.is_tensor(g["lr"]) else 0.0
        optimizer.step()
    finally:
        for g, lr in zip(optimizer.param_groups, lrs):
            g["lr"] = lr
        for p, grad in kept_grads.items():
            p.grad = grad
    return {id(p) for p in missing}


def check_groups(optimizer: torch.optim.Optimizer, names: dict[int, str], saved_groups: list[dict[str, Any]]) -> None:
    """The saved param groups hold the same parameters, by name (``param_names``) and order, as ``optimizer``'s."""
    current = names_in(optimizer, names)
    if len(saved_groups) != len(current):
        raise ValueError(
            f"the checkpoint's optimizer has {len(saved_groups)} param groups and this one {len(current)}; build the "
            "optimizer with the same param groups as the saved one"
        )
    for g, (saved, pnames) in enumerate(zip(saved_groups, current)):
        if list(saved["params"]) != pnames:
            diff = sorted(set(saved["params"]) ^ set(pnames))[:5] or "the same names in another order"
            raise ValueError(
                f"param group {g} of the checkpoint's optimizer holds other parameters than this one's ({diff}); "
                "build the optimizer over the same parameters, in the same groups and order"
            )


def apply_loaded(optimizer: torch.optim.Optimizer, names: dict[int, str], saved_groups: list[dict[str, Any]] | None,
                 loaded_names: set[str], created: set[int]) -> None:  # fmt: skip
    """After the tensors were loaded in place: the saved hyperparameters (``check_groups`` passed), and no
    state for the parameters that had none when saved (it was only made to load into)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) in created and names[id(p)] not in loaded_names:
                optimizer.state.pop(p, None)
    for group, saved in zip(optimizer.param_groups, saved_groups or []):
        for key, value in saved.items():
            if key != "params":
                group[key] = value
