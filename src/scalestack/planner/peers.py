"""How much the peer systems pad one unit, from their documented sharding rules (no peer code runs here).

Each function returns the elements a unit occupies over all W ranks (W times the per-rank shard).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .search import round_up as _round_up

Shape = tuple[int, ...]

RULES = {
    "FSDP2": "each parameter padded on dim 0 to a multiple of W (torch.chunk(dim=0) shards)",
    "FSDP1": "one flat buffer per unit, each parameter aligned to 16 bytes, the buffer padded to a multiple of W",
    "DeepSpeed ZeRO-3": "each parameter flattened and padded to a multiple of W (ceil(numel/W) per rank)",
    "Megatron-FSDP": "one flat buffer per unit, padded to a multiple of W x LCM(row sizes) (row-aligned slices)",
}


def fsdp2(shapes: Sequence[Shape], world: int) -> int:
    return sum(_round_up(s[0], world) * math.prod(s[1:]) if s else world for s in shapes)


def fsdp1(shapes: Sequence[Shape], world: int, align_elems: int = 4) -> int:
    return _round_up(sum(_round_up(math.prod(s), align_elems) for s in shapes), world)


def deepspeed_zero3(shapes: Sequence[Shape], world: int) -> int:
    return sum(_round_up(math.prod(s), world) for s in shapes)


def megatron_fsdp(shapes: Sequence[Shape], world: int) -> int:
    rows = math.lcm(*(s[-1] if len(s) > 1 else 1 for s in shapes)) if shapes else 1
    return _round_up(sum(math.prod(s) for s in shapes), world * rows)


PEERS = {"FSDP2": fsdp2, "FSDP1": fsdp1, "DeepSpeed ZeRO-3": deepspeed_zero3, "Megatron-FSDP": megatron_fsdp}
