"""One sharded parameter: where it lives in its unit's flat buffers, and what user code may ask of it.

``ManagedParam`` is the only place that slices flat buffers into parameters, so the gather views, gradient
views, sharded pieces, sharded gradients and state dicts all agree. ``ShardInfo`` is its public face
(``scalestack.shard_info(param)``): optimizers and checkpoints read it, never the private fields.

A piece keeps its tensor's number of dimensions, so code that selects parameters by ``p.dim()`` selects the
same ones sharded and unsharded: a piece of whole rows of a ``[R, C]`` weight is a ``[rows, C]`` view, whole
experts of ``[E, O, I]`` are ``[e, O, I]``, rows inside one expert ``[1, rows, I]``; any other run of
elements ``[1, ..., 1, n]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.distributed import ProcessGroup

from ..planner.layout import Piece, TensorSlot

_INFO = "_scalestack_shard_info"


def piece_shape(start: int, end: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of elements ``[start, end)`` of a flattened ``shape`` tensor, with ``len(shape)`` dims when
    possible: the largest trailing block of dimensions that the range holds whole, prefixed by ones."""
    n = end - start
    if len(shape) <= 1:
        return (n,) if shape or n != 1 else ()
    for d in range(1, len(shape)):
        block = math.prod(shape[d:])
        if block and start % block == 0 and n % block == 0:
            return (1,) * (d - 1) + (n // block, *shape[d:])
    return (1,) * (len(shape) - 1) + (n,)


@dataclass(frozen=True, eq=False)
class ShardInfo:
    """What one rank holds of one parameter (``scalestack.shard_info(param)``).

    The rank holds elements ``[start, end)`` of the flattened global tensor, a view shaped ``local_shape``.
    ``rows`` is ``[first, last)`` of the rows (last dimension; 1-D tensors: elements) it touches;
    ``full_rows`` says whether it holds those rows whole. ``group``/``rank``/``world_size`` are the unit's.
    ``range_of(r)`` is what rank r holds, known on every rank without communication (optimizers that move
    pieces between ranks, such as Muon, plan their exchanges from it).
    """

    global_shape: tuple[int, ...]
    start: int
    end: int
    local_shape: tuple[int, ...]
    group: ProcessGroup
    rank: int
    world_size: int
    buffer_offset: int  # where the tensor sits in its unit's flat buffer of world_size * shard_size elements
    shard_size: int

    def range_of(self, rank: int) -> tuple[int, int]:
        """``[start, end)`` of the flattened global tensor that ``rank`` holds (empty: ``(0, 0)``)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside this unit's world of {self.world_size} ranks")
        numel = math.prod(self.global_shape)
        lo = max(rank * self.shard_size - self.buffer_offset, 0)
        hi = min((rank + 1) * self.shard_size - self.buffer_offset, numel)
        return (lo, hi) if lo < hi else (0, 0)

    @property
    def numel(self) -> int:
        return self.end - self.start

    @property
    def row_length(self) -> int:
        return int(self.global_shape[-1]) if len(self.global_shape) > 1 else 1

    @property
    def rows(self) -> tuple[int, int]:
        if self.numel == 0:
            return (0, 0)
        return self.start // self.row_length, -(-self.end // self.row_length)

    @property
    def full_rows(self) -> bool:
        return self.start % self.row_length == 0 and self.end % self.row_length == 0

    def __repr__(self) -> str:
        return (
            f"ShardInfo(global_shape={list(self.global_shape)}, range=[{self.start}, {self.end}), "
            f"local_shape={list(self.local_shape)}, rank={self.rank} of {self.world_size})"
        )


def is_sharded(param: torch.Tensor) -> bool:
    return hasattr(param, _INFO)


def shard_info(param: torch.Tensor) -> ShardInfo:
    """Where this rank's piece of ``param`` sits in the global tensor (for a parameter of a sharded unit)."""
    info = getattr(param, _INFO, None)
    if info is None:
        raise ValueError(
            f"this {type(param).__name__} of shape {list(param.shape)} is not a parameter of a fully_shard unit; "
            "pass a parameter from model.parameters() after fully_shard(model)"
        )
    return info


class ManagedParam:
    """A parameter of a unit: where it is registered, its piece of the shard and its slot in the gather."""

    def __init__(self, fqn: str, uses: list[tuple[nn.Module, str]], buffer_index: int, slot: TensorSlot,
                 piece: Piece) -> None:  # fmt: skip
        self.fqn = fqn
        self.uses = uses  # every (module, attribute) that registers it (tied weights)
        self.buffer_index = buffer_index  # which of the unit's flat buffers holds it
        self.slot = slot
        self.piece = piece
        self.local_shape = piece_shape(piece.start, piece.end, slot.shape)
        self.sharded: nn.Parameter | None = None
        self.unsharded: nn.Parameter | None = None
        self.synced_requires_grad = False  # requires_grad of both tensors at their last sync

    def in_full(self, flat: torch.Tensor) -> torch.Tensor:
        """This tensor's slot of a W*S buffer (gather, grad), in the parameter's shape."""
        return flat[self.slot.offset : self.slot.end].view(self.slot.shape)

    def in_shard(self, local: torch.Tensor) -> torch.Tensor:
        """This rank's piece of an S-element buffer (shard, reduced gradient), in ``local_shape``."""
        return local[self.piece.local_offset : self.piece.local_offset + self.piece.numel].view(self.local_shape)

    def in_global(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's piece of the full tensor (a state dict entry), flattened."""
        return full.reshape(-1)[self.piece.start : self.piece.end]

    @property
    def info(self) -> ShardInfo:
        return getattr(self.sharded, _INFO)

    def attach(self, sharded: nn.Parameter, unsharded: nn.Parameter, info: ShardInfo) -> None:
        self.sharded, self.unsharded = sharded, unsharded
        self.synced_requires_grad = sharded.requires_grad
        for t in (sharded, unsharded):
            setattr(t, _INFO, info)

    def __repr__(self) -> str:
        piece = f"[{self.piece.start}, {self.piece.end})"
        return f"ManagedParam({self.fqn!r}, shape={list(self.slot.shape)}, piece={piece})"
