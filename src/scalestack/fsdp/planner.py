"""The planner: tensor order, gaps and shard size S for a unit, so that no window boundary cuts a granule.

Minimizing S is NP-hard (Partition reduces to it), but units are small and repetitive, so:

* For a fixed order and S, placing every tensor at its earliest valid offset is optimal (a smaller cursor
  leaves every later choice open), and finding that offset takes a few modular steps per boundary.
* For small units (<= ``EXACT_TENSORS`` tensors) a dynamic program over subsets of placed tensors (the
  state is the smallest cursor) decides feasibility over *all* orders exactly.
* Larger units try model order, granule-major and size-major orders and a local search of single moves.
* S is scanned upward from the lower bound over multiples of the alignment; once a tensor spans two window
  boundaries S must be a multiple of its granule, so the scan jumps along those multiples; a long scan
  switches to galloping plus bisection.
* Several buffers per unit (each its own S and collective) when grouping tensors by granule pays.

Plans depend only on shapes and granules, so identical blocks are planned once (memoized).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from .granularity import Cuts
from .layout import Layout, TensorSlot, TensorSpec

EXACT_TENSORS = 9  # subset DP up to 2^9 states per S
LOCAL_SEARCH_TENSORS = 48  # single-move local search on units up to this size
LINEAR_SCAN_STEPS = 256  # then gallop + bisect (feasibility is nearly monotone in S)

_Key = tuple[tuple[int, Cuts], ...]  # (numel, cuts) per tensor: all the planner looks at


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _first_bad_boundary(offset: int, numel: int, cuts: Cuts, S: int) -> int | None:
    """The first window boundary strictly inside [offset, offset+numel) that is not an allowed cut."""
    first, last = offset // S + 1, (offset + numel - 1) // S
    if first > last:
        return None
    if S % cuts.period == 0:  # every boundary has the same residue: the first decides
        return None if cuts.allows(first * S - offset) else first * S
    for k in range(first, last + 1):
        if not cuts.allows(k * S - offset):
            return k * S
    return None


def _earliest_fix(offset: int, boundary: int, cuts: Cuts, align: int) -> int:
    """Smallest aligned x >= offset that puts ``boundary`` on an allowed cut, or ``boundary`` itself."""
    best = boundary
    step = align // math.gcd(cuts.period, align)
    for r in cuts.offsets:
        x = offset + (boundary - r - offset) % cuts.period
        for _ in range(step):
            if x >= best:
                break
            if x % align == 0:
                best = x
                break
            x += cuts.period
    return best


def _place(numel: int, cuts: Cuts, cursor: int, S: int, capacity: int, align: int) -> int | None:
    """Earliest valid end of one tensor placed at or after ``cursor``; None if it does not fit."""
    off = _round_up(cursor, align)
    while numel and (bad := _first_bad_boundary(off, numel, cuts, S)) is not None:
        off = _earliest_fix(off, bad, cuts, align)
        if off + numel > capacity:
            return None
    return off if off + numel <= capacity else None


def _offsets_in_order(key: _Key, order: Sequence[int], S: int, W: int, align: int) -> list[int] | None:
    capacity, cursor = S * W, 0
    offsets = [0] * len(key)
    for i in order:
        numel, cuts = key[i]
        off = _place(numel, cuts, cursor, S, capacity, align)
        if off is None:
            return None
        offsets[i], cursor = off, off + numel
    return offsets


def _order_any(key: _Key, S: int, W: int, align: int) -> list[int] | None:
    """An order that fits with shard size S, if any order does (exact DP over subsets)."""
    n, capacity = len(key), S * W
    best: dict[int, tuple[int, int, int]] = {0: (0, -1, -1)}  # subset -> (cursor, last tensor, previous subset)
    for mask in range(1 << n):
        if mask not in best:
            continue
        cursor = best[mask][0]
        for i in range(n):
            if mask >> i & 1:
                continue
            off = _place(key[i][0], key[i][1], cursor, S, capacity, align)
            if off is None:
                continue
            nxt, end = mask | 1 << i, off + key[i][0]
            if nxt not in best or end < best[nxt][0]:
                best[nxt] = (end, i, mask)
    full = (1 << n) - 1
    if full not in best:
        return None
    order, mask = [], full
    while mask:
        _, i, prev = best[mask]
        order.append(i)
        mask = prev
    return order[::-1]


def _lower_bound(key: _Key, W: int, align: int) -> int:
    total = sum(n for n, _ in key)
    granule = max((min(c.largest_granule, n) for n, c in key), default=1)
    return _round_up(max(-(-total // W), granule, 1), align)


def _grid(S: int, key: _Key, align: int) -> int:
    """The smallest candidate >= S: a multiple of every granule of a tensor that then spans two boundaries."""
    while True:
        step = align
        for n, c in key:
            if n > 2 * S and len(c.offsets) == 1:
                step = math.lcm(step, c.period)
        nxt = _round_up(S, step)
        if nxt == S:
            return S
        S = nxt


def _search(fits, key: _Key, W: int, align: int, upper: int | None = None) -> tuple[int, object] | None:
    """Smallest S on the grid (below ``upper`` if given) for which ``fits(S)`` returns a plan."""
    S = _grid(_lower_bound(key, W, align), key, align)
    for _ in range(LINEAR_SCAN_STEPS):
        if upper is not None and upper <= S:
            return None
        found = fits(S)
        if found is not None:
            return S, found
        S = _grid(S + align, key, align)
    lo, step = S, align  # gallop to a feasible S, then bisect between the last failure and it
    while (found := fits(S)) is None:
        lo, step = S, step * 2
        S = _grid(S + step, key, align)
        if upper is not None and upper <= S:
            return None
    hi, hi_found = S, found
    while True:
        mid = _grid(_round_up((lo + hi) // 2, align), key, align)
        if mid <= lo or mid >= hi:
            return hi, hi_found
        found = fits(mid)
        if found is None:
            lo = mid
        else:
            hi, hi_found = mid, found


def _candidate_orders(key: _Key) -> list[list[int]]:
    idx = list(range(len(key)))
    orders = [
        idx,
        sorted(idx, key=lambda i: (-key[i][1].largest_granule, i)),
        sorted(idx, key=lambda i: (-key[i][0], i)),
        sorted(idx, key=lambda i: (-key[i][1].largest_granule, -key[i][0], i)),
    ]
    unique = []
    for o in orders:
        if o not in unique:
            unique.append(o)
    return unique


@functools.lru_cache(maxsize=4096)
def _plan_key(key: _Key, W: int, align: int) -> tuple[int, tuple[int, ...]]:
    """(S, offsets) for one buffer; offsets in the input's order."""
    model_order = list(range(len(key)))
    if len(key) <= EXACT_TENSORS:
        S, order = _search(lambda s: _order_any(key, s, W, align), key, W, align)
        offsets = _offsets_in_order(key, model_order, S, W, align) or _offsets_in_order(key, order, S, W, align)
        return S, tuple(offsets)
    best: tuple[int, list[int]] | None = None
    for order in _candidate_orders(key):
        found = _search(lambda s, o=order: _offsets_in_order(key, o, s, W, align), key, W, align, best and best[0])
        if found is not None:
            best = (found[0], order)
    S, order = best
    if len(key) <= LOCAL_SEARCH_TENSORS and _lower_bound(key, W, align) < S:
        order = _improve(key, order, S, W, align)
        S = _search(lambda s: _offsets_in_order(key, order, s, W, align), key, W, align)[0]
    offsets = _offsets_in_order(key, model_order, S, W, align) or _offsets_in_order(key, order, S, W, align)
    return S, tuple(offsets)


def _improve(key: _Key, order: list[int], S: int, W: int, align: int) -> list[int]:
    """Single-tensor moves that let the order fit a smaller S on the grid, repeated while they help."""
    while True:
        target = _grid(_lower_bound(key, W, align), key, align)
        if target >= S:
            return order
        improved = False
        for i, j in itertools.permutations(range(len(order)), 2):
            trial = order[:i] + order[i + 1 :]
            trial.insert(j, order[i])
            found = _search(lambda s, t=trial: _offsets_in_order(key, t, s, W, align), key, W, align, S)
            if found is not None:
                order, S, improved = trial, found[0], True
                break
        if not improved:
            return order


def plan_unit(tensors: Sequence[TensorSpec], world_size: int, align: int = 1) -> Layout:
    """The layout of one buffer holding ``tensors`` with the smallest S the planner finds."""
    _check(world_size, align)
    key = tuple((t.numel, t.cuts) for t in tensors)
    S, offsets = _plan_key(key, world_size, align)
    slots = tuple(TensorSlot(t.name, t.shape, t.cuts, o) for t, o in zip(tensors, offsets))
    return Layout(world_size, S, slots, tuple(range(len(tensors))))


def plan_in_order(tensors: Sequence[TensorSpec], world_size: int, align: int = 1) -> Layout:
    """Model order only (the first planner): the smallest S for which the tensors fit as given."""
    _check(world_size, align)
    key = tuple((t.numel, t.cuts) for t in tensors)
    order = list(range(len(key)))
    S, offsets = _search(lambda s: _offsets_in_order(key, order, s, world_size, align), key, world_size, align)
    slots = tuple(TensorSlot(t.name, t.shape, t.cuts, o) for t, o in zip(tensors, offsets))
    return Layout(world_size, S, slots, tuple(order))


def _check(world_size: int, align: int) -> None:
    if not isinstance(world_size, int) or world_size <= 0:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not isinstance(align, int) or align <= 0:
        raise ValueError(f"align must be a positive int, got {align!r}")


@dataclass(frozen=True)
class Plan:
    """A unit split into several buffers, each with its own S and its own collective."""

    buffers: tuple[Layout, ...]

    @property
    def padding(self) -> int:
        return sum(b.padding for b in self.buffers)

    @property
    def numel(self) -> int:
        return sum(b.numel for b in self.buffers)

    @property
    def total_size(self) -> int:
        return sum(b.total_size for b in self.buffers)

    @property
    def collectives(self) -> int:
        """All-gathers per gather of the unit (and reduce-scatters per reduction)."""
        return len(self.buffers)

    def shard_size(self) -> int:
        """Elements one rank holds over all buffers."""
        return sum(b.shard_size for b in self.buffers)


def _groupings(classes: list[int], max_buffers: int):
    """Set partitions of ``classes`` into at most ``max_buffers`` blocks (few classes: enumerate)."""
    if not classes:
        yield []
        return
    first, rest = classes[0], classes[1:]
    for partial in _groupings(rest, max_buffers):
        for i in range(len(partial)):
            yield partial[:i] + [[first, *partial[i]]] + partial[i + 1 :]
        if len(partial) < max_buffers:
            yield [[first], *partial]


def plan_buffers(tensors: Sequence[TensorSpec], world_size: int, align: int = 1, max_buffers: int = 1) -> Plan:
    """Split ``tensors`` into at most ``max_buffers`` buffers by granule, minimizing total padding.

    Ties go to fewer buffers (fewer collectives). Tensors of one granule stay together; with more granule
    classes than can be enumerated, classes are merged by size first.
    """
    _check(world_size, align)
    if not isinstance(max_buffers, int) or max_buffers < 1:
        raise ValueError(f"max_buffers must be a positive int, got {max_buffers!r}")
    by_class: dict[Cuts, list[int]] = {}
    for i, t in enumerate(tensors):
        by_class.setdefault(t.cuts, []).append(i)
    classes = list(by_class.values())
    if len(classes) > 7:  # keep the 6 largest classes apart, merge the rest into one
        classes.sort(key=lambda idx: -sum(tensors[i].numel for i in idx))
        classes = classes[:6] + [sorted(i for c in classes[6:] for i in c)]
    best: tuple[int, int, Plan] | None = None
    for grouping in _groupings(list(range(len(classes))), max_buffers):
        layouts = []
        for block in grouping:
            members = sorted(i for c in block for i in classes[c])
            lay = plan_unit([tensors[i] for i in members], world_size, align)
            layouts.append(Layout(lay.world_size, lay.shard_size, lay.slots, tuple(members)))
        plan = Plan(tuple(sorted(layouts, key=lambda b: b.tensor_indices[0] if b.tensor_indices else 0)))
        score = (plan.padding, plan.collectives)
        if best is None or score < best[:2]:
            best = (*score, plan)
    return best[2]
