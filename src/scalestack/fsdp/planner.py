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
LOCAL_SEARCH_MOVES = 48  # trial searches the local search may spend on one unit
LINEAR_SCAN_STEPS = 256  # then gallop + bisect (feasibility is nearly monotone in S)
MOVABLE_TENSORS = 12  # the largest tensors of a unit that the multi-buffer search moves one by one

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
    spans = cuts.spans(S)
    if not spans and numel > 2 * S:  # would contain two boundaries S apart wherever it starts
        return None
    while numel and (bad := _first_bad_boundary(off, numel, cuts, S)) is not None:
        # two boundaries inside cannot both be cuts: start at the first one; else shift to a cut
        two_inside = not spans and (off + numel - 1) // S > off // S + 1
        off = bad if two_inside else _earliest_fix(off, bad, cuts, align)
        if off + numel > capacity:
            return None
    return off if off + numel <= capacity else None


def _walk(key: _Key, order: Sequence[int], S: int, W: int, align: int) -> tuple[list[int], float]:
    """Earliest offsets in ``order`` with shard size S and twice the room, and where the last one ends.

    Placement never depends on the room left, so one walk answers both "does it fit in W*S?" and "by
    how much does it miss?".
    """
    cursor, offsets, limit = 0, [0] * len(key), 2 * S * W  # past twice the room the answer is "far"
    for i in order:
        numel, cuts = key[i]
        off = _place(numel, cuts, cursor, S, limit, align)
        if off is None:
            return offsets, math.inf
        offsets[i], cursor = off, off + numel
    return offsets, cursor


def _offsets_in_order(key: _Key, order: Sequence[int], S: int, W: int, align: int) -> list[int] | None:
    offsets, end = _walk(key, order, S, W, align)
    return offsets if end <= S * W else None


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


def _grid(S: int, key: _Key, align: int, strict: bool = False) -> int:
    """The smallest candidate >= S: a multiple of every granule of a tensor that then spans two boundaries.

    ``strict`` also takes the granules of tensors longer than one window: they may then span boundaries
    anywhere, which large units need in practice though it is not required for feasibility.
    """
    while True:
        step, reach = align, S if strict else 2 * S
        for n, c in key:
            # uniform cuts: required; blocks that restart per expert: sufficient (every boundary then
            # falls on the same residue), and the only practical choice once a tensor spans many windows
            if n > reach and (len(c.offsets) == 1 or strict):
                step = math.lcm(step, c.period)
        nxt = _round_up(S, step)
        if nxt == S:
            return S
        S = nxt


def _search(
    fits, key: _Key, W: int, align: int, upper: int | None = None, hint=None, strict: bool = False
) -> tuple[int, object] | None:
    """Smallest S on the grid (below ``upper`` if given) for which ``fits(S)`` returns a plan.

    ``hint(S)``, when given, is an estimate of the next S worth trying after S failed: large units skip
    ahead by the padding they are short of, at the price of exactness.
    """
    S = _grid(_lower_bound(key, W, align), key, align, strict)
    for _ in range(LINEAR_SCAN_STEPS):
        if upper is not None and upper <= S:
            return None
        found = fits(S)
        if found is not None:
            return S, found
        S = _grid(max(S + align, hint(S) if hint else 0), key, align, strict)
    lo, step = S, align  # gallop to a feasible S, then bisect between the last failure and it
    while (found := fits(S)) is None:
        lo, step = S, step * 2
        S = _grid(S + step, key, align, strict)
        if upper is not None and upper <= S:
            return None
    hi, hi_found = S, found
    while True:
        mid = _grid(_round_up((lo + hi) // 2, align), key, align, strict)
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
    for strict, order in itertools.product((True, False), _candidate_orders(key)):
        ends: dict[int, float] = {}

        def fits(s: int, o: list[int] = order, ends: dict = ends) -> list[int] | None:
            offsets, ends[s] = _walk(key, o, s, W, align)
            return offsets if ends[s] <= s * W else None

        def hint(s: int, ends: dict = ends) -> int:  # the S that the failed walk's length asks for
            return _round_up(-(-ends[s] // W), align) if ends[s] < math.inf else 2 * s

        found = _search(fits, key, W, align, best and best[0], hint=hint, strict=strict)
        if found is not None:
            best = (found[0], order)
    S, order = best
    if len(key) <= LOCAL_SEARCH_TENSORS and _lower_bound(key, W, align) < S:
        order, S = _improve(key, order, S, W, align)
    offsets = _offsets_in_order(key, model_order, S, W, align) or _offsets_in_order(key, order, S, W, align)
    return S, tuple(offsets)


def _improve(key: _Key, order: list[int], S: int, W: int, align: int) -> tuple[list[int], int]:
    """Single-tensor moves that let the order fit a smaller S on the grid, while they help and the budget
    of ``LOCAL_SEARCH_MOVES`` trial searches lasts."""
    budget = LOCAL_SEARCH_MOVES
    target = _grid(_lower_bound(key, W, align), key, align)
    improved = True
    while improved and target < S and budget > 0:
        improved = False
        for i, j in itertools.permutations(range(len(order)), 2):
            budget -= 1
            if budget < 0:
                break
            trial = order[:i] + order[i + 1 :]
            trial.insert(j, order[i])
            found = _search(lambda s, t=trial: _offsets_in_order(key, t, s, W, align), key, W, align, S, strict=True)
            if found is not None:
                order, S, improved = trial, found[0], True
                break
    return order, S


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

    Ties go to fewer buffers (fewer collectives). Every grouping of granule classes is tried (classes beyond
    seven are merged by size first), then single large tensors move between buffers while that helps.
    """
    _check(world_size, align)
    if not isinstance(max_buffers, int) or max_buffers < 1:
        raise ValueError(f"max_buffers must be a positive int, got {max_buffers!r}")
    key = tuple((t.numel, t.cuts) for t in tensors)
    layouts = []
    for members in _best_grouping(key, world_size, align, max_buffers):
        lay = plan_unit([tensors[i] for i in members], world_size, align)
        layouts.append(Layout(lay.world_size, lay.shard_size, lay.slots, members))
    return Plan(tuple(layouts))


@functools.lru_cache(maxsize=1024)
def _best_grouping(key: _Key, W: int, align: int, max_buffers: int) -> tuple[tuple[int, ...], ...]:
    def cost(groups: list[list[int]]) -> tuple[int, int]:
        padding = 0
        for members in groups:
            sub = tuple(key[i] for i in members)
            padding += _plan_key(sub, W, align)[0] * W - sum(n for n, _ in sub)
        return padding, len(groups)

    by_class: dict[Cuts, list[int]] = {}
    for i, (_, cuts) in enumerate(key):
        by_class.setdefault(cuts, []).append(i)
    classes = list(by_class.values())
    if len(classes) > 7:  # keep the 6 largest classes apart, merge the rest into one
        classes.sort(key=lambda idx: -sum(key[i][0] for i in idx))
        classes = classes[:6] + [sorted(i for c in classes[6:] for i in c)]
    best_groups, best = None, None
    for grouping in _groupings(list(range(len(classes))), max_buffers):
        groups = [sorted(i for c in block for i in classes[c]) for block in grouping]
        score = cost(groups)
        if best is None or score < best:
            best_groups, best = groups, score
    # Then move single large tensors between buffers (a tensor with a coarse granule can share a buffer
    # with tensors of another granule when that buffer's S suits both).
    movable = sorted(range(len(key)), key=lambda i: -key[i][0])[:MOVABLE_TENSORS]
    improved = best[0] > 0
    while improved:
        improved = False
        for i, dst in itertools.product(movable, range(max_buffers)):
            src = next(g for g, members in enumerate(best_groups) if i in members)
            if dst == src or dst > len(best_groups) or (dst == len(best_groups) and len(best_groups[src]) == 1):
                continue
            trial = [list(m) for m in best_groups] + ([[]] if dst == len(best_groups) else [])
            trial[src].remove(i)
            trial[dst] = sorted([*trial[dst], i])
            trial = [m for m in trial if m]
            score = cost(trial)
            if score < best:
                best_groups, best, improved = trial, score, True
                break
    return tuple(tuple(m) for m in sorted(best_groups))
