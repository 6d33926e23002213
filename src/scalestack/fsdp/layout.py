"""Layout of one unit's flat buffer: where each tensor lives and which rank holds which piece.

Every rank holds the window ``[r*S, (r+1)*S)`` of a buffer of ``W*S`` elements. A window boundary may
fall outside a tensor or on one of its granule boundaries, never inside a granule, so each rank's piece
of a tensor is a whole number of granules. Padding lives only between tensors and at the end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TensorSpec:
    """What the planner needs to know of a tensor."""

    name: str
    shape: tuple[int, ...]
    granule: int  # elements that must stay on one rank, counted from the tensor's first element

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class TensorSlot:
    """A tensor placed in the flat buffer at ``[offset, offset + numel)``."""

    name: str
    shape: tuple[int, ...]
    granule: int
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def end(self) -> int:
        return self.offset + self.numel


@dataclass(frozen=True)
class Piece:
    """The part ``[start, end)`` of a flattened tensor that one rank holds at ``local_offset`` of its shard."""

    name: str
    start: int
    end: int
    local_offset: int

    @property
    def numel(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Layout:
    """A unit's plan: tensor slots (in the order given to the planner), shard size S and world size W."""

    world_size: int
    shard_size: int
    slots: tuple[TensorSlot, ...]

    @property
    def total_size(self) -> int:
        return self.world_size * self.shard_size

    @property
    def numel(self) -> int:
        return sum(s.numel for s in self.slots)

    @property
    def padding(self) -> int:
        return self.total_size - self.numel

    @property
    def offsets(self) -> list[int]:
        return [s.offset for s in self.slots]

    def window(self, rank: int) -> tuple[int, int]:
        self._check_rank(rank)
        return rank * self.shard_size, (rank + 1) * self.shard_size

    def pieces(self, rank: int) -> list[Piece]:
        """One piece per slot (empty where the rank holds nothing of that tensor)."""
        lo, hi = self.window(rank)
        out = []
        for s in self.slots:
            a, b = max(s.offset, lo), min(s.end, hi)
            if a < b:
                out.append(Piece(s.name, a - s.offset, b - s.offset, a - lo))
            else:
                out.append(Piece(s.name, 0, 0, 0))
        return out

    def check(self) -> None:
        """Raise if the layout breaks an invariant (overlap, out of bounds, a boundary inside a granule)."""
        S = self.shard_size
        cursor = 0
        for s in sorted(self.slots, key=lambda s: s.offset):
            if s.offset < cursor or s.end > self.total_size:
                raise AssertionError(f"slot {s.name!r} at [{s.offset}, {s.end}) overlaps or leaves the buffer")
            for k in range(s.offset // S + 1, (s.end - 1) // S + 1 if s.numel else 0):
                if (k * S - s.offset) % s.granule:
                    raise AssertionError(f"window boundary {k * S} cuts a granule of {s.name!r}")
            cursor = max(cursor, s.end)

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside this layout's world of {self.world_size} ranks")

    def __str__(self) -> str:
        pct = 100.0 * self.padding / max(self.total_size, 1)
        lines = [
            f"Layout: W={self.world_size} S={self.shard_size} numel={self.numel} padding={self.padding} ({pct:.2f}%)"
        ]
        for s in self.slots:
            lines.append(f"  [{s.offset:>10}, {s.end:>10})  {s.name}  shape={list(s.shape)} granule={s.granule}")
        return "\n".join(lines)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _aligned_congruent(lo: int, target: int, granule: int, align: int) -> int | None:
    """Smallest x >= lo with x % align == 0 and (target - x) % granule == 0, or None if none exists."""
    x = lo + (target - lo) % granule
    for _ in range(align // math.gcd(granule, align)):
        if x % align == 0:
            return x
        x += granule
    return None


def _first_cut(offset: int, numel: int, granule: int, S: int) -> int | None:
    """The first window boundary strictly inside [offset, offset+numel) that is not on a granule edge."""
    first, last = offset // S + 1, (offset + numel - 1) // S
    if first > last:
        return None
    if S % granule == 0:  # all boundaries are congruent: checking the first one decides
        return first * S if (first * S - offset) % granule else None
    for k in range(first, last + 1):
        if (k * S - offset) % granule:
            return k * S
    return None


def place_in_order(tensors: Sequence[TensorSpec], S: int, world_size: int, align: int) -> list[int] | None:
    """Offsets for ``tensors`` in the given order with shard size S, or None if they do not fit."""
    capacity = S * world_size
    offsets, cursor = [], 0
    for t in tensors:
        n, g = t.numel, max(t.granule, 1)
        off = _round_up(cursor, align)
        while n and (cut := _first_cut(off, n, g, S)) is not None:
            # Either shift the tensor so the boundary lands on a granule edge, or start it at the boundary.
            shifted = _aligned_congruent(off, cut, g, align)
            off = cut if shifted is None else min(shifted, cut)
            if off + n > capacity:
                return None
        if off + n > capacity:
            return None
        offsets.append(off)
        cursor = off + n
    return offsets


def plan_in_order(tensors: Sequence[TensorSpec], world_size: int, align: int = 1) -> Layout:
    """The smallest S (a multiple of ``align``) for which the tensors fit in the given order."""
    if world_size <= 0:
        raise ValueError(f"world_size must be positive, got {world_size}")
    if align <= 0:
        raise ValueError(f"align must be positive, got {align}")
    total = sum(t.numel for t in tensors)
    biggest_granule = max((min(t.granule, t.numel) for t in tensors), default=0)
    S = _round_up(max(-(-total // world_size), biggest_granule, 1), align)
    while (offsets := place_in_order(tensors, S, world_size, align)) is None:
        S += align
    slots = tuple(TensorSlot(t.name, t.shape, t.granule, o) for t, o in zip(tensors, offsets))
    return Layout(world_size, S, slots)
