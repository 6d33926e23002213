"""Until distributed checkpoints of ragged pieces exist, ``torch.distributed.checkpoint`` refuses them.

``model.state_dict()`` returns this rank's pieces. DCP would key each by its name at offset 0 on every rank
and keep one rank's piece, silently losing the rest; tagged pieces make its save planner raise instead.
"""

from __future__ import annotations

import torch.nn as nn

from .param import ManagedParam
from .unit import ShardedUnit


def _refuse_dcp(fqn: str, obj: object) -> list:
    raise RuntimeError(
        f"{fqn!r} is this rank's piece of a sharded parameter; torch.distributed.checkpoint would keep one "
        "rank's piece and lose the rest. Save scalestack.full_state_dict(model) instead"
    )


def guard_dcp(unit: ShardedUnit) -> None:
    """Tag the unit's sharded pieces in every ``state_dict()`` so that DCP's save planner raises on them
    (``__create_write_items__`` is what DCP calls on objects that describe their own chunks)."""
    by_module: dict[nn.Module, list[ManagedParam]] = {}
    for p in unit.params:
        for module, _ in p.uses:
            by_module.setdefault(module, []).append(p)
    for module, params in by_module.items():

        def hook(m: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, params=params) -> None:
            for p in params:
                for owner, attr in p.uses:
                    value = state_dict.get(prefix + attr)
                    if owner is m and value is not None and m._parameters.get(attr) is p.sharded:
                        value.__create_write_items__ = _refuse_dcp

        module.register_state_dict_post_hook(hook)
