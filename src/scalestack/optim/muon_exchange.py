"""Who orthogonalizes which matrix, and how pieces travel there and back: Muon's exchange plan.

Newton–Schulz needs whole matrices, and a sharded rank holds pieces. Every matrix (a 2-D parameter, or one
matrix of a 3-D expert stack) gets one owner rank; every rank sends its part of each matrix to the owner and
gets its part of the update back. All of it is planned once from the layout, which every rank knows
(``ShardInfo.range_of``), so each step is one ``all_to_all_single`` there and one back, whatever the number
of matrices.

Owners: a matrix that one rank holds whole stays there (no traffic: a whole-matrix layout exchanges
nothing). The rest go, largest Newton–Schulz cost ``m * n * min(m, n)`` first, to the least loaded rank,
preferring the one that holds most of the matrix.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Matrix:
    """Matrix ``index`` of parameter ``param``: elements ``[first, first + rows * cols)`` of its flat tensor."""

    param: int
    first: int
    rows: int
    cols: int
    key: object  # matrices with equal keys are orthogonalized together (same shape, same hyperparameters)

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    @property
    def cost(self) -> int:
        return self.rows * self.cols * min(self.rows, self.cols)


@dataclass(frozen=True)
class Segment:
    """Elements ``[lo, hi)`` of this rank's piece of parameter ``param`` (piece-local offsets)."""

    param: int
    lo: int
    hi: int


@dataclass
class ExchangePlan:
    """Everything rank ``rank`` needs for one step's exchange (see the module doc)."""

    owners: list[int]
    needs_exchange: bool  # False: every matrix is orthogonalized where it lives, no collective at all
    send_segments: list[Segment]  # input of the first all-to-all, grouped by destination rank
    send_splits: list[int]
    recv_splits: list[int]
    recv_sizes: list[int]  # the first all-to-all's output cut into (source, matrix) parts, in arrival order
    assemble: list[int]  # parts in owned-matrix order, each matrix's parts by source rank
    owned: list[tuple[object, int, int, int]]  # (key, count, rows, cols) runs of owned matrices
    back_sizes: list[int]  # the owned update cut into (matrix, source) parts, in assemble order
    back_order: list[int]  # those parts in the second all-to-all's input order, grouped by destination
    local_order: list[int]  # send_segments in parameter order: the received update, piece by piece


def plan_exchange(matrices: list[Matrix], ranges: list[list[tuple[int, int]]], rank: int,
                  world_size: int) -> ExchangePlan:  # fmt: skip
    """``ranges[p][r]`` is rank r's ``[start, end)`` of parameter p's flat tensor (empty: equal ends)."""
    W = world_size
    parts = [[_overlap(ranges[m.param][r], m) for r in range(W)] for m in matrices]
    for j, m in enumerate(matrices):
        held = sum(b - a for a, b in parts[j])
        if held != m.numel:
            raise ValueError(
                f"parameter #{m.param}'s matrix at element {m.first} is held {held} times of {m.numel} elements "
                "over the ranks; every rank must give the optimizer the same parameters of the same sharded model"
            )
    owners = _choose_owners(matrices, parts, W)
    order = [sorted((j for j in range(len(matrices)) if owners[j] == o), key=lambda j: (str(matrices[j].key), j))
             for o in range(W)]  # fmt: skip

    def length(r: int, j: int) -> int:
        a, b = parts[j][r]
        return b - a

    start = {m.param: ranges[m.param][rank][0] for m in matrices}
    send_segments, send_splits = [], []
    for o in range(W):
        total = 0
        for j in order[o]:
            a, b = parts[j][rank]
            if b > a:
                p = matrices[j].param
                send_segments.append(Segment(p, a - start[p], b - start[p]))
                total += b - a
        send_splits.append(total)
    recv_sizes, recv_splits, where = [], [], {}
    for r in range(W):
        total = 0
        for j in order[rank]:
            if length(r, j):
                where[(r, j)] = len(recv_sizes)
                recv_sizes.append(length(r, j))
                total += length(r, j)
        recv_splits.append(total)
    assemble = [where[(r, j)] for j in order[rank] for r in range(W) if length(r, j)]
    back_index = {(r, j): k for k, (j, r) in enumerate((j, r) for j in order[rank] for r in range(W) if length(r, j))}
    back_sizes = [length(r, j) for j in order[rank] for r in range(W) if length(r, j)]
    back_order = [back_index[(r, j)] for r in range(W) for j in order[rank] if length(r, j)]
    owned: list[tuple[object, int, int, int]] = []
    for j in order[rank]:
        m = matrices[j]
        if owned and owned[-1][0] == m.key:
            key, count, rows, cols = owned[-1]
            owned[-1] = (key, count + 1, rows, cols)
        else:
            owned.append((m.key, 1, m.rows, m.cols))
    local_order = sorted(range(len(send_segments)), key=lambda k: (send_segments[k].param, send_segments[k].lo))
    needs_exchange = any(length(owners[j], j) != m.numel for j, m in enumerate(matrices))
    return ExchangePlan(owners, needs_exchange, send_segments, send_splits, recv_splits, recv_sizes, assemble,
                        owned, back_sizes, back_order, local_order)  # fmt: skip


def _overlap(held: tuple[int, int], m: Matrix) -> tuple[int, int]:
    a, b = max(held[0], m.first), min(held[1], m.first + m.numel)
    return (a, b) if a < b else (0, 0)


def _choose_owners(matrices: list[Matrix], parts: list[list[tuple[int, int]]], W: int) -> list[int]:
    owners = [-1] * len(matrices)
    load = [0] * W
    for j, m in enumerate(matrices):
        whole = [r for r in range(W) if parts[j][r][1] - parts[j][r][0] == m.numel]
        if whole:
            owners[j] = whole[0]
            load[whole[0]] += m.cost
    for j in sorted((j for j in range(len(matrices)) if owners[j] < 0), key=lambda j: (-matrices[j].cost, j)):
        held = [parts[j][r][1] - parts[j][r][0] for r in range(W)]
        owners[j] = min(range(W), key=lambda r: (load[r], -held[r], r))
        load[owners[j]] += matrices[j].cost
    return owners
