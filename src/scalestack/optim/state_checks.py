"""Checks the optimizers share: parameter names in errors, the form of a state dict, foreign tensors."""

from __future__ import annotations

from typing import Any

import torch


def param_name(group: dict[str, Any], index: int, p: torch.Tensor) -> str:
    """A parameter's name for error messages: its name when the optimizer got named parameters."""
    names = group.get("param_names")
    return repr(names[index]) if names else f"#{index} (shape {list(p.shape)}) of its param group"


def check_not_dtensor(optimizer: str, group: dict[str, Any], index: int, p: torch.Tensor) -> None:
    """DTensor parameters come from PyTorch FSDP2: their pieces do not follow the structure these need."""
    if type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor":
        raise TypeError(
            f"{optimizer}: parameter {param_name(group, index, p)} is a DTensor (PyTorch FSDP2 or tensor "
            "parallel); shard the model with scalestack.fully_shard instead, or use torch.optim on DTensors"
        )


def check_grad(optimizer: str, group: dict[str, Any], index: int, p: torch.Tensor) -> None:
    """A gradient these optimizers can use: dense, shaped like its parameter (piece)."""
    if p.grad.is_sparse or p.grad.shape != p.shape:
        what = "sparse" if p.grad.is_sparse else f"shaped {list(p.grad.shape)}, not {list(p.shape)}"
        raise RuntimeError(f"{optimizer}: the gradient of parameter {param_name(group, index, p)} is {what}")


def check_state_dict_form(state_dict: object, groups: list[dict[str, Any]]) -> tuple[list[dict], dict]:
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("load_state_dict expects an optimizer state dict with 'state' and 'param_groups'")
    saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
    if len(saved_groups) != len(groups):
        raise ValueError(f"the state dict has {len(saved_groups)} param groups and this optimizer {len(groups)}")
    for g, (saved, group) in enumerate(zip(saved_groups, groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"param group {g} of the state dict has {len(saved['params'])} parameters and this optimizer's "
                f"{len(group['params'])}; build the optimizer over the same parameters as the saved one"
            )
    return saved_groups, saved_state
