"""Until distributed checkpoints of ragged pieces exist, ``torch.distributed.checkpoint`` refuses them.

``model.state_dict()`` returns this rank's pieces. DCP would key each by its name at offset 0 on every rank
and keep one rank's piece, silently losing the rest. The pieces come out of ``state_dict()`` as
``ShardPiece``: a plain tensor to every op and to ``torch.save`` (it pickles as a ``torch.Tensor``, so
``torch.load(weights_only=True)`` reads it), whose ``__create_write_items__`` (what DCP's save planner
asks of tensors that describe their own chunks) raises.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .param import ManagedParam
from .unit import ShardedUnit


class ShardPiece(torch.Tensor):
    __torch_function__ = torch._C._disabled_torch_function_impl  # ops see, and return, plain tensors

    def __create_write_items__(self, fqn: str, obj: object) -> list:
        raise RuntimeError(
            f"{fqn!r} is this rank's piece of a sharded parameter; torch.distributed.checkpoint would keep one "
            "rank's piece and lose the rest. Save scalestack.full_state_dict(model) instead"
        )

    def __reduce_ex__(self, protocol: int):
        return self.as_subclass(torch.Tensor).__reduce_ex__(protocol)


def guard_dcp(unit: ShardedUnit) -> None:
    """Return the unit's sharded pieces from every ``state_dict()`` as ``ShardPiece`` views (no copy)."""
    by_module: dict[nn.Module, list[tuple[str, ManagedParam]]] = {}
    for p in unit.params:
        for module, attr in p.uses:
            by_module.setdefault(module, []).append((attr, p))
    for module, entries in by_module.items():

        def hook(m: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, entries=entries) -> None:
            for attr, p in entries:
                value = state_dict.get(prefix + attr)
                # keep_vars=True returns the parameter itself: leave it (full_state_dict finds it by identity)
                if value is not None and value is not p.sharded and m._parameters.get(attr) is p.sharded:
                    state_dict[prefix + attr] = value.as_subclass(ShardPiece)

        module.register_state_dict_post_hook(hook)
