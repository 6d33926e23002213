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

Speed (a whole 671B model plans in well under a second), with the answers of the scans it replaces:

* An S that one tensor alone cannot take is rejected before any walk or DP: a tensor spanning m window
  boundaries needs m allowed cuts S apart, and a periodic cut set has chains of bounded length for most S.
* A tensor whose cuts are rows (or blocks of rows) finds its earliest offset in closed form, without a scan.
* The multi-buffer search bounds each grouping's padding from below and plans only groupings that can win.

Plans depend only on shapes and granules, so identical blocks are planned once (memoized).
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from . import granularity
from .granularity import Cuts
from .layout import Layout, TensorSlot, TensorSpec

EXACT_TENSORS = 9  # subset DP up to 2^9 states per S
LOCAL_SEARCH_TENSORS = 48  # single-move local search on units up to this size
LOCAL_SEARCH_MOVES = 48  # trial searches the local search may spend on one unit
LINEAR_SCAN_STEPS = 256  # then gallop + bisect (feasibility is nearly monotone in S)
MOVABLE_TENSORS = 12  # the largest tensors of a unit that the multi-buffer search moves one by one

_Key = tuple[tuple[int, Cuts], ...]  # (numel, cuts) per tensor: all the planner looks at
_INF = math.inf


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


class _Cut:
    """One ``Cuts`` prepared for the hot loops: membership in a set, chains of cuts, closed-form shifts."""

    __slots__ = ("period", "offsets", "single", "granule", "offset_set", "steps", "_chains", "_tables")

    def __init__(self, cuts: Cuts) -> None:
        self.period = p = cuts.period
        self.single = len(cuts.offsets) == 1
        # the residues ``Cuts.allows`` accepts
        self.offsets = (0,) if self.single else tuple(sorted({o for o in cuts.offsets if 0 <= o < p}))
        self.granule = cuts.largest_granule
        self.offset_set = frozenset(self.offsets)
        self.steps = frozenset((b - a) % p for a in self.offsets for b in self.offsets)
        self._chains: dict[int, float] = {}
        self._tables: dict[tuple[int, int], tuple[int, list[int]]] = {}

    def allows(self, position: int) -> bool:
        r = position % self.period
        return r == 0 if self.single else r in self.offset_set

    def spans(self, S: int) -> bool:
        """Whether two window boundaries S apart can both be allowed cuts."""
        return S % self.period == 0 if self.single else S % self.period in self.steps

    def chain(self, d: int) -> float:
        """The longest run of allowed cuts c, c+d, c+2d, ... (d != 0 mod period); inf when it never ends."""
        got = self._chains.get(d)
        if got is None:
            p, allowed, longest = self.period, self.offset_set, 0
            for start in allowed:
                length, x = 0, start
                while x in allowed and length <= len(allowed):
                    length, x = length + 1, (x + d) % p
                longest = max(longest, length)
            got = self._chains[d] = _INF if longest > len(allowed) else longest
        return got

    def viable(self, numel: int, S: int) -> bool:
        """Whether one tensor of ``numel`` can sit anywhere in windows of S (necessary for a walk or the DP
        to place it; without this test ``_place_scan`` would scan to the end of the buffer)."""
        if not self.chains(numel, S):
            return False
        if numel <= S or self.spans(S):
            return True
        # S < numel <= 2*S and no two boundaries S apart are cuts: one boundary inside, at a cut y that
        # leaves the previous and the next boundary outside (numel - S <= y <= S)
        lo, hi = max(numel - S, 1), min(S, numel - 1)
        if lo > hi:
            return False
        p, offsets = self.period, self.offsets
        q, r = divmod(lo, p)
        k = bisect.bisect_left(offsets, r)
        return (q * p + offsets[k] if k < len(offsets) else (q + 1) * p + offsets[0]) <= hi

    def chains(self, numel: int, S: int) -> bool:
        """Whether allowed cuts S apart can fill the boundaries that any placement puts inside the tensor."""
        m = (numel - 1) // S  # boundaries strictly inside, wherever it starts
        d = S % self.period
        return m < 2 or d == 0 or (not self.single and d in self.steps and self.chain(d) >= m)

    def next_chains(self, numel: int, S: int) -> int:
        """The smallest S' >= S for which ``chains(numel, S')`` holds."""
        if self.chains(numel, S):
            return S
        p = self.period
        best = min((numel - 1) // 2 + 1, S + -S % p)  # at most one boundary inside, or S a multiple of p
        if not self.single:
            for d in self.steps:
                if d:
                    ch = self.chain(d)
                    lo = S if ch == _INF else max(S, (numel - 1) // (ch + 1) + 1)
                    best = min(best, lo + (d - lo) % p)
        return best

    def fix(self, offset: int, boundary: int, align: int) -> int:
        """Smallest aligned x >= offset that puts ``boundary`` on an allowed cut, or ``boundary`` itself.

        Closed form: the cut position y = boundary - x is the largest y <= boundary - offset among the cut
        residues modulo lcm(period, align) that keep x aligned.
        """
        key = (align, boundary % align)
        got = self._tables.get(key)
        if got is None:
            p = self.period
            lcm = p * align // math.gcd(p, align)
            table = sorted(r for o in self.offsets for r in range(o % p, lcm, p) if r % align == key[1])
            got = self._tables[key] = (lcm, table)
        lcm, table = got
        if not table:
            return boundary
        q, t = divmod(boundary - offset, lcm)
        k = bisect.bisect_right(table, t) - 1
        y = q * lcm + table[k] if k >= 0 else (q - 1) * lcm + table[-1]
        return boundary - y if y > 0 else boundary


@functools.lru_cache(maxsize=4096)
def _prepare(cuts: Cuts) -> _Cut:
    return _Cut(cuts)


class _Unit:
    """One buffer's tensors as the planner reads them, with the summaries that bound S from below."""

    __slots__ = ("numel", "cut", "total", "granule", "grid_classes", "cut_classes", "shapes", "_sums")

    def __init__(self, numel: list[int], cut: list[_Cut]) -> None:
        self.numel, self.cut = numel, cut
        self.total = sum(numel)
        distinct = set(zip(numel, cut))  # units repeat a few shapes hundreds of times
        self.granule = max((min(c.granule, n) for n, c in distinct), default=1)
        grid: dict[tuple[int, bool], int] = {}
        largest: dict[_Cut, int] = {}
        for n, c in distinct:
            grid[c.period, c.single] = max(grid.get((c.period, c.single), 0), n)
            largest[c] = max(largest.get(c, 0), n)

        def ranked(pairs: Iterable[tuple[int, _Cut]]) -> list[tuple[int, _Cut]]:
            return sorted(pairs, key=lambda nc: (nc[0], nc[1].period, nc[1].offsets), reverse=True)

        # largest tensor first: bounds stop at the first class small enough not to matter
        self.grid_classes = sorted(((n, p, s) for (p, s), n in grid.items()), reverse=True)
        self.cut_classes = ranked((n, c) for c, n in largest.items())
        self.shapes = ranked(distinct)
        self._sums: list[int] | None = None

    @classmethod
    def of(cls, key: _Key) -> _Unit:
        return cls([n for n, _ in key], [_prepare(c) for _, c in key])

    def sub(self, members: Sequence[int]) -> _Unit:
        return _Unit([self.numel[i] for i in members], [self.cut[i] for i in members])

    def mask_sums(self) -> list[int]:
        """Elements placed per subset of tensors (bit i: tensor i), for the DP's dead-state test."""
        if self._sums is None:
            sums = [0] * (1 << len(self.numel))
            for mask in range(1, len(sums)):
                low = mask & -mask
                sums[mask] = sums[mask ^ low] + self.numel[low.bit_length() - 1]
            self._sums = sums
        return self._sums


def _viable(u: _Unit, S: int) -> bool:
    """A necessary condition for S: every tensor alone fits somewhere (a walk or DP would fail otherwise)."""
    for numel, c in u.shapes:
        if numel <= S:
            return True
        if not c.viable(numel, S):
            return False
    return True


def _next_viable(u: _Unit, S: int, align: int) -> int:
    """An aligned S' >= S below which ``_viable`` fails: the smallest that passes every class's chain test
    (each class jumps to its next pass until all agree)."""
    while True:
        start = S = round_up(S, align)
        for numel, c in u.cut_classes:
            if (numel - 1) // S < 2:
                break
            S = c.next_chains(numel, S)
        if start == S:
            return S


def _place(numel: int, c: _Cut, cursor: int, S: int, capacity: int, align: int) -> int | None:
    """Earliest valid offset of one tensor placed at or after ``cursor``; None if it does not fit."""
    off = -(-cursor // align) * align
    p = c.period
    if numel and p > 1:
        if c.single and p % align == 0 and numel % align == 0:
            off = _place_rows(numel, p, off, S)
            if off is None:
                return None
        else:
            off = _place_scan(numel, c, off, S, capacity, align)
            if off is None:
                return None
    return off if off + numel <= capacity else None


def _place_rows(n: int, p: int, off: int, S: int) -> int | None:
    """``_place`` in O(1) for one cut residue (rows, k-row blocks) with p and n aligned, from aligned ``off``.

    The first boundary inside sits at t = S - off % S. If n <= S, or S is a multiple of p (every boundary
    then has the same residue), moving the start by t % p puts it (and every later one) on a row start.
    Otherwise the tensor must hold exactly one boundary, at a row start y in [n - S, S]: the largest such
    y <= t for the first boundary, else the largest one for the next boundary (None: no such y).
    """
    t = S - off % S
    if t >= n:
        return off
    if n <= S or S % p == 0:
        return off + t % p
    if n > 2 * S:
        return None
    y = t // p * p  # here S < n and t <= S: the range is [n - S, S]
    if y < n - S:
        y = S // p * p
        if y < n - S:
            return None
        t += S
    return off + t - y


def _place_scan(numel: int, c: _Cut, off: int, S: int, capacity: int, align: int) -> int | None:
    """``_place`` for any periodic cuts: fix the first bad boundary, recheck, until none is left."""
    spans = c.spans(S)
    if not spans and numel > 2 * S:  # would contain two boundaries S apart wherever it starts
        return None
    p = c.period
    uniform = S % p == 0  # every boundary has the same residue: the first decides
    while True:
        first, last = off // S + 1, (off + numel - 1) // S
        if first > last:
            return off
        bad = None
        if uniform:
            if not c.allows(first * S - off):
                bad = first * S
        else:
            for k in range(first, last + 1):
                if not c.allows(k * S - off):
                    bad = k * S
                    break
        if bad is None:
            return off
        # two boundaries inside cannot both be cuts: no start before the first one works; else shift to a cut
        off = first * S if not spans and last > first else c.fix(off, bad, align)
        if off + numel > capacity:
            return None


class _Seq:
    """A tensor order prepared for walks: sizes and cuts in order, prefix sums, runs of aligned sizes, and
    the period of the tensors that ``_place_rows`` takes (0 for the others)."""

    __slots__ = ("order", "numel", "cut", "rows", "pre", "aligned_to")

    def __init__(self, u: _Unit, order: Sequence[int], align: int) -> None:
        self.order = order = list(order)
        self.numel = ns = [u.numel[i] for i in order]
        self.cut = [u.cut[i] for i in order]
        self.rows = [
            c.period if c.single and c.period > 1 and c.period % align == 0 and n % align == 0 else 0
            for n, c in zip(ns, self.cut)
        ]
        self.pre = list(itertools.accumulate(ns, initial=0))
        self.aligned_to = aligned_to = [len(ns)] * (len(ns) + 1)  # first position >= i with an unaligned size
        for i in range(len(ns) - 1, -1, -1):
            aligned_to[i] = aligned_to[i + 1] if ns[i] % align == 0 else i


def _walk(sq: _Seq, S: int, W: int, align: int, offsets: list[int] | None = None) -> float:
    """Where the last tensor ends when each takes its earliest offset in ``sq``'s order (inf: past 2*S*W).

    Placement never depends on the room left, so one walk answers both "does it fit in W*S?" and "by how
    much does it miss?". Fills ``offsets`` (input order) when given. Tensors that end before the next window
    boundary go back to back in one step (a bisection of the prefix sums), so a walk costs about one step
    per boundary crossed, not one per tensor.
    """
    limit = 2 * S * W
    order, ns, cs, rows, pre, aligned_to = sq.order, sq.numel, sq.cut, sq.rows, sq.pre, sq.aligned_to
    i, end, cursor = 0, len(ns), 0
    while i < end:
        n = ns[i]
        off = -(-cursor // align) * align
        room = (off // S + 1) * S - off  # up to the next boundary
        if n <= room:  # no boundary inside: the aligned cursor is valid, and so for the aligned run after it
            j = max(i + 1, bisect.bisect_right(pre, pre[i] + room, i, aligned_to[i] + 1) - 1)
            if offsets is not None:
                for k in range(i, j):
                    offsets[order[k]] = off + pre[k] - pre[i]
            cursor = off + pre[j] - pre[i]
            if cursor > limit:
                return _INF
            i = j
            continue
        p = rows[i]
        if p:  # ``_place`` without its dispatch: most tensors of a model come here
            off = _place_rows(n, p, off, S)
            if off is None or off + n > limit:
                return _INF
        else:
            off = _place(n, cs[i], cursor, S, limit, align)
            if off is None:
                return _INF
        if offsets is not None:
            offsets[order[i]] = off
        cursor = off + n
        i += 1
    return cursor


def _offsets_in_order(u: _Unit, order: Sequence[int], S: int, W: int, align: int) -> list[int] | None:
    if not _viable(u, S):
        return None
    offsets = [0] * len(u.numel)
    return offsets if _walk(_Seq(u, order, align), S, W, align, offsets) <= S * W else None


def _order_any(u: _Unit, S: int, W: int, align: int) -> list[int] | None:
    """An order that fits with shard size S, if any order does (exact DP over subsets)."""
    if not _viable(u, S):
        return None
    n, capacity, numel, cut = len(u.numel), S * W, u.numel, u.cut
    left = u.total
    sums = u.mask_sums()
    best: dict[int, tuple[int, int, int]] = {0: (0, -1, -1)}  # subset -> (cursor, last tensor, previous subset)
    for mask in range(1 << n):
        state = best.get(mask)
        if state is None:
            continue
        cursor = state[0]
        if cursor + left - sums[mask] > capacity:  # the rest cannot fit even back to back
            continue
        for i in range(n):
            if mask >> i & 1:
                continue
            off = _place(numel[i], cut[i], cursor, S, capacity, align)
            if off is None:
                continue
            nxt, end = mask | 1 << i, off + numel[i]
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


def _lower_bound(u: _Unit, W: int, align: int) -> int:
    return round_up(max(-(-u.total // W), u.granule, 1), align)


def _grid(S: int, u: _Unit, align: int, strict: bool = False) -> int:
    """The smallest candidate >= S: a multiple of every granule of a tensor that then spans two boundaries.

    ``strict`` also takes the granules of tensors longer than one window: they may then span boundaries
    anywhere, which large units need in practice though it is not required for feasibility.
    """
    while True:
        step, reach = align, S if strict else 2 * S
        for numel, period, single in u.grid_classes:
            if numel <= reach:
                break
            # uniform cuts: required; blocks that restart per expert: sufficient (every boundary then
            # falls on the same residue), and the only practical choice once a tensor spans many windows
            if single or strict:
                step = math.lcm(step, period)
        nxt = round_up(S, step)
        if nxt == S:
            return S
        S = nxt


def _shard_floor(u: _Unit, W: int, align: int) -> int:
    """No S that ``_plan_key`` can return is below this: every search starts at the first point of one of
    the two grids and only climbs, and every answer is viable."""
    lower = _lower_bound(u, W, align)
    return _next_viable(u, min(_grid(lower, u, align), _grid(lower, u, align, strict=True)), align)


def _search(
    fits: Callable[[int], object],
    u: _Unit,
    W: int,
    align: int,
    upper: int | None = None,
    hint: Callable[[int], int] | None = None,
    strict: bool = False,
) -> tuple[int, object] | None:
    """Smallest S on the grid (below ``upper`` if given) for which ``fits(S)`` returns a plan.

    ``hint(S)``, when given, is an estimate of the next S worth trying after S failed: large units skip
    ahead by the padding they are short of, at the price of exactness.
    """
    S = _grid(_lower_bound(u, W, align), u, align, strict)
    for _ in range(LINEAR_SCAN_STEPS):
        if upper is not None and upper <= S:
            return None
        found = fits(S)
        if found is not None:
            return S, found
        S = _grid(max(S + align, hint(S) if hint else 0), u, align, strict)
    lo, step = S, align  # gallop to a feasible S, then bisect between the last failure and it
    while (found := fits(S)) is None:
        lo, step = S, step * 2
        S = _grid(S + step, u, align, strict)
        if upper is not None and upper <= S:
            return None
    hi, hi_found = S, found
    while True:
        mid = _grid(round_up((lo + hi) // 2, align), u, align, strict)
        if mid <= lo or mid >= hi:
            return hi, hi_found
        found = fits(mid)
        if found is None:
            lo = mid
        else:
            hi, hi_found = mid, found


def _candidate_orders(u: _Unit) -> list[list[int]]:
    idx = list(range(len(u.numel)))
    numel, cut = u.numel, u.cut
    orders = [
        idx,
        sorted(idx, key=lambda i: (-cut[i].granule, i)),
        sorted(idx, key=lambda i: (-numel[i], i)),
        sorted(idx, key=lambda i: (-cut[i].granule, -numel[i], i)),
    ]
    unique = []
    for o in orders:
        if o not in unique:
            unique.append(o)
    return unique


def _order_fits(u: _Unit, order: Sequence[int], W: int, align: int) -> Callable[[int], bool | None]:
    """``fits(S)`` for one order: True when the walk ends within W*S."""
    sq = _Seq(u, order, align)

    def fits(s: int) -> bool | None:
        return True if _viable(u, s) and _walk(sq, s, W, align) <= s * W else None

    return fits


@functools.lru_cache(maxsize=4096)
def _plan_key(key: _Key, W: int, align: int) -> tuple[int, tuple[int, ...]]:
    """(S, offsets) for one buffer; offsets in the input's order."""
    u = _Unit.of(key)
    model_order = list(range(len(key)))
    if len(key) <= EXACT_TENSORS:
        S, order = _search(lambda s: _order_any(u, s, W, align), u, W, align)
        offsets = _offsets_in_order(u, model_order, S, W, align) or _offsets_in_order(u, order, S, W, align)
        return S, tuple(offsets)
    best: tuple[int, list[int]] | None = None
    orders = _candidate_orders(u)
    seqs = [_Seq(u, o, align) for o in orders]
    walked: list[dict[int, float]] = [{} for _ in orders]  # the strict and loose searches share walks
    for strict, (order, sq, ends) in itertools.product((True, False), zip(orders, seqs, walked)):

        def fits(s: int, sq: _Seq = sq, ends: dict = ends) -> bool | None:
            if s not in ends:
                ends[s] = _walk(sq, s, W, align) if _viable(u, s) else _INF
            return True if ends[s] <= s * W else None

        def hint(s: int, ends: dict = ends) -> int:  # the S that the failed walk's length asks for
            return round_up(-(-ends[s] // W), align) if ends[s] < _INF else 2 * s

        found = _search(fits, u, W, align, best and best[0], hint=hint, strict=strict)
        if found is not None:
            best = (found[0], order)
    S, order = best
    if len(key) <= LOCAL_SEARCH_TENSORS and _lower_bound(u, W, align) < S:
        order, S = _improve(u, order, S, W, align)
    offsets = _offsets_in_order(u, model_order, S, W, align) or _offsets_in_order(u, order, S, W, align)
    return S, tuple(offsets)


def _improve(u: _Unit, order: list[int], S: int, W: int, align: int) -> tuple[list[int], int]:
    """Single-tensor moves that let the order fit a smaller S on the grid, while they help and the budget
    of ``LOCAL_SEARCH_MOVES`` trial searches lasts."""
    budget = LOCAL_SEARCH_MOVES
    target = _grid(_lower_bound(u, W, align), u, align)
    improved = True
    while improved and target < S and budget > 0:
        improved = False
        for i, j in itertools.permutations(range(len(order)), 2):
            budget -= 1
            if budget < 0:
                break
            trial = order[:i] + order[i + 1 :]
            trial.insert(j, order[i])
            found = _search(_order_fits(u, trial, W, align), u, W, align, S, strict=True)
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
    u = _Unit.of(tuple((t.numel, t.cuts) for t in tensors))
    order = list(range(len(tensors)))
    S, offsets = _search(lambda s: _offsets_in_order(u, order, s, world_size, align), u, world_size, align)
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

    @property
    def shard_size(self) -> int:
        """Elements one rank holds over all buffers."""
        return sum(b.shard_size for b in self.buffers)


def _groupings(classes: list[int], max_buffers: int) -> Iterator[list[list[int]]]:
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
    # ints and tuples hash in C: identical blocks of a model find their plan without touching Cuts
    shape_key = tuple((t.numel, t.cuts.period, t.cuts.offsets) for t in tensors)
    layouts = []
    for members, S, offsets in _plan_buffers_key(shape_key, world_size, align, max_buffers):
        slots = []
        for i, o in zip(members, offsets):
            t = tensors[i]
            slots.append(TensorSlot(t.name, t.shape, t.cuts, o))
        layouts.append(Layout(world_size, S, tuple(slots), members))
    return Plan(tuple(layouts))


@functools.lru_cache(maxsize=1024)
def _plan_buffers_key(
    shape_key: tuple[tuple[int, int, tuple[int, ...]], ...], W: int, align: int, max_buffers: int
) -> tuple[tuple[tuple[int, ...], int, tuple[int, ...]], ...]:
    """(members, S, offsets) per buffer."""
    key = tuple((n, Cuts(p, o)) for n, p, o in shape_key)
    out = []
    for members in _best_grouping(key, W, align, max_buffers):
        S, offsets = _plan_key(tuple(key[i] for i in members), W, align)
        out.append((members, S, offsets))
    return tuple(out)


@functools.lru_cache(maxsize=1024)
def _best_grouping(key: _Key, W: int, align: int, max_buffers: int) -> tuple[tuple[int, ...], ...]:
    whole = _Unit.of(key)
    floors: dict[tuple[int, ...], int] = {}

    def floor(members: tuple[int, ...]) -> int:  # padding no plan of these tensors can go below
        got = floors.get(members)
        if got is None:
            sub = whole.sub(members)
            got = floors[members] = _shard_floor(sub, W, align) * W - sub.total
        return got

    def bound(groups: list[list[int]]) -> tuple[int, int]:
        return sum(floor(tuple(m)) for m in groups), len(groups)

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
    # Plan groupings in the order of their padding floor and stop once no floor can beat the best plan:
    # (padding, buffers, enumeration index) decides, so the answer is the one a full scan would give.
    ranked = []
    for index, grouping in enumerate(_groupings(list(range(len(classes))), max_buffers)):
        groups = [sorted(i for c in block for i in classes[c]) for block in grouping]
        ranked.append((*bound(groups), index, groups))
    ranked.sort(key=lambda r: r[:3])
    best_groups, best, best_rank = [], (0, 0), None
    for floor_padding, buffers, index, groups in ranked:
        if best_rank is not None and (floor_padding, buffers, index) > best_rank:
            break
        score = cost(groups)
        if best_rank is None or (*score, index) < best_rank:
            best_groups, best, best_rank = groups, score, (*score, index)
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
            if bound(trial) >= best:  # its floor already loses: it cannot be strictly better
                continue
            score = cost(trial)
            if score < best:
                best_groups, best, improved = trial, score, True
                break
    return tuple(tuple(m) for m in sorted(best_groups))


def clear_caches() -> None:
    """Forget every memoized plan and cut set (benchmarks time planning from cold caches)."""
    for cache in (_plan_key, _best_grouping, _plan_buffers_key, _prepare, granularity._cuts_for):
        cache.cache_clear()
